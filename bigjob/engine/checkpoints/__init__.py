"""Checkpoint formats: safetensors read and written by hand, torch files, indexes and key checks."""
