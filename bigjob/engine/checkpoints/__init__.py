"""Checkpoint formats: safetensors read and written by hand, torch files, indexes and key checks.

The opened checkpoint's interface (:mod:`.checkpoint`) and its two formats
(:mod:`.safetensors_checkpoint`, :mod:`.torch_checkpoint`); the index of a
sharded checkpoint (:mod:`.index`) and the choice of file, format and shards
(:mod:`.opening`); the comparison of a model's keys with a checkpoint's
(:mod:`.keys`); and the safetensors format itself: its header
(:mod:`.safetensors_header`), a mapped file (:mod:`.safetensors_mapping`) and
the writer (:mod:`.safetensors_writer`).
"""
