"""The text side of a Transformers model: its saved tokenizer, end-of-sequence and padding ids, context length.

>>> from types import SimpleNamespace
>>> context_length(SimpleNamespace(n_positions=1024)), context_length(SimpleNamespace())
(1024, None)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from bigjob.errors import DataError
from bigjob.models.hf_folder import transformers_module

__all__ = ["TOKENIZER_FILES", "context_length", "generation_ids", "load_tokenizer"]

# Files a saved tokenizer consists of (any one of them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.txt", "vocab.json")


def context_length(config: Any) -> int | None:
    """The most positions the model takes (``max_position_embeddings``, ``n_positions`` ...), or None."""
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def generation_ids(model: nn.Module, tokenizer: Any = None) -> tuple[list[int], int | None]:
    """``(end-of-sequence ids, padding id)`` from the generation config, the model config, then the tokenizer."""
    eos: list[int] = []
    pad: int | None = None
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        if source is None:
            continue
        value = getattr(source, "eos_token_id", None)
        if not eos and value is not None:
            eos = [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        value = getattr(source, "pad_token_id", None)
        if pad is None and value is not None:
            pad = int(value[0] if isinstance(value, (list, tuple)) else value)
    return eos, pad


def load_tokenizer(path: str | os.PathLike[str], key: str = "path") -> Any:
    """The tokenizer saved in the model folder; a DataError naming ``key`` when the folder has none."""
    transformers = transformers_module()

    def missing(reason: str) -> DataError:
        return DataError(
            f"{key} '{path}' has no usable tokenizer ({reason}); save the tokenizer into that folder "
            "(tokenizer.save_pretrained), or give token ids instead of text (lines such as [1, 2, 3])"
        )

    found = [name for name in TOKENIZER_FILES if (Path(path) / name).is_file()]
    if not found:
        # Some Transformers releases build an empty tokenizer from config.json alone: never use one.
        raise missing(f"none of {', '.join(TOKENIZER_FILES)}")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - Transformers raises OSError, ValueError, TypeError ... for a broken tokenizer
        raise missing((str(err).splitlines()[0] if str(err) else type(err).__name__)[:200]) from None
    if len(tokenizer) < 2:
        raise missing(f"the tokenizer built from {', '.join(found)} has an empty vocabulary")
    return tokenizer
