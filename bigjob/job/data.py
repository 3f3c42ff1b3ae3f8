"""Input data: token-id sequences from a JSONL file, a tensor file, prompts or a seeded generator.

Text (``data.source=text``, or ``{"text": ...}`` lines in a JSONL file) is encoded with the
model's tokenizer (see :mod:`bigjob.job.text`). Every source gives a list of token-id lists;
:func:`make_batches` cuts it into right-padded batches with an attention mask. All inputs are read and checked before a job touches the
cache or loads weights, so a malformed line fails fast with its file and line number.

>>> from bigjob.job.schema import DataConfig
>>> samples = load_samples(DataConfig(num_samples=3, seq_len=4, seed=1), vocab_size=10)
>>> [len(s) for s in samples]
[4, 4, 4]
>>> batches = make_batches([[5, 6, 7], [8]], batch_size=2, pad_id=0)
>>> batches[0].input_ids.tolist(), batches[0].attention_mask.tolist()
([[5, 6, 7], [8, 0, 0]], [[1, 1, 1], [1, 0, 0]])
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from bigjob.errors import DataError
from bigjob.job.schema import DataConfig
from bigjob.job.text import TokenizerRef, encode, parse_json_sample, read_prompts

__all__ = ["Batch", "check_pad_id", "load_samples", "make_batches"]


@dataclass(frozen=True)
class Batch:
    """One batch: sample indices, token ids (B, T) and attention mask (B, T), 1 on real tokens."""

    index: int
    sample_ids: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


# Token ids become int64 tensors: a larger integer cannot be an id of any vocabulary.
_ID_LIMIT = 2**63


def _shown(value: int) -> str:
    """An integer as a message shows it: a huge one by its first digits and its length."""
    text = str(value)
    return text if len(text) <= 24 else f"{text[:12]}... ({len(text)} digits)"


def _check_ids(ids: list[int], vocab_size: int | None, where: str) -> None:
    if not ids:
        raise DataError(f"{where}: empty token sequence; every sample needs at least one token id")
    limit = _ID_LIMIT if vocab_size is None else vocab_size
    bad = [i for i in ids if not 0 <= i < limit]
    if bad:
        if vocab_size is None:
            raise DataError(f"{where}: token id {_shown(bad[0])} is not a token id (ids are 0 <= id < 2**63)")
        raise DataError(f"{where}: token id {_shown(bad[0])} is outside the model's vocabulary [0, {vocab_size})")


def check_pad_id(pad_id: int, vocab_size: int | None) -> None:
    """A DataError, before any batch runs, for a ``data.pad_id`` the model's embedding cannot look up.

    >>> check_pad_id(0, 32)
    >>> check_pad_id(9999, 32)
    Traceback (most recent call last):
    ...
    bigjob.errors.DataError: data.pad_id=9999 is outside the model's vocabulary [0, 32); set data.pad_id to an id below 32
    """
    limit = _ID_LIMIT if vocab_size is None else vocab_size
    if not 0 <= pad_id < limit:
        span = f"the model's vocabulary [0, {vocab_size})" if vocab_size is not None else "the token ids (0 <= id < 2**63)"
        fix = f"an id below {vocab_size}" if vocab_size is not None else "a token id of the model, such as 0"
        raise DataError(f"data.pad_id={_shown(pad_id)} is outside {span}; set data.pad_id to {fix}")


def _read_jsonl(path: Path, vocab_size: int | None, tokenizer: TokenizerRef | None = None) -> list[list[int]]:
    samples: list[list[int]] = []
    try:
        handle = path.open("rb")
    except OSError as err:
        raise DataError(f"cannot read data.path '{path}' ({err.strerror}); set data.path to a JSONL file of token-id lists") from None
    with handle:
        for lineno, raw in enumerate(handle, start=1):
            where = f"data.path '{path}' line {lineno}"
            line = _decoded(raw, where)
            if not line.strip():
                continue
            value = _parsed(line, where)
            if isinstance(value, dict) and "input_ids" in value:
                value = value["input_ids"]
            elif isinstance(value, (str, dict)):  # text, or {"text": ...}: encoded by the model's tokenizer
                value = encode(parse_json_sample(value, where), tokenizer, where)
            if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
                raise DataError(f"{where}: expected a list of integer token ids, got {line.strip()[:60]!r}")
            _check_ids(value, vocab_size, where)
            samples.append(value)
    if not samples:
        raise DataError(f"data.path '{path}' holds no samples; add one JSON list of token ids per line")
    return samples


def _decoded(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{where}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}); save data.path as UTF-8"
        ) from None


def _parsed(line: str, where: str) -> object:
    try:
        return json.loads(line)
    except ValueError as err:  # JSONDecodeError, and int() refusing a number of too many digits
        why = getattr(err, "msg", None) or str(err).split(";")[0]
        raise DataError(f"{where}: not valid JSON ({why}); each line must be a list of token ids or {{\"input_ids\": [...]}}") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply to be a sample; each line must be a list of token ids or {{\"input_ids\": [...]}}") from None


def _read_text(path: Path, vocab_size: int | None, tokenizer: TokenizerRef | None) -> list[list[int]]:
    samples = []
    for index, sample in enumerate(read_prompts(path)):
        where = f"data.path '{path}' prompt {index}"
        ids = encode(sample, tokenizer, where)
        _check_ids(ids, vocab_size, where)
        samples.append(ids)
    return samples


def _read_tensor_file(path: Path, key: str, vocab_size: int | None) -> list[list[int]]:
    where = f"data.path '{path}'"
    mask: torch.Tensor | None = None
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
        else:
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
            tensors = loaded if isinstance(loaded, dict) else {key: loaded}
    except FileNotFoundError:
        raise DataError(f"{where} does not exist; set data.path to a .safetensors or .pt file of token ids") from None
    except Exception as err:  # safetensors / pickle errors have no common base class
        raise DataError(f"{where} cannot be read as a tensor file ({type(err).__name__}: {err})") from None
    if key not in tensors or not isinstance(tensors[key], torch.Tensor):
        raise DataError(f"{where} has no tensor '{key}' (found {sorted(map(str, tensors))[:5]}); set data.key")
    ids = tensors[key]
    if "attention_mask" in tensors and isinstance(tensors["attention_mask"], torch.Tensor):
        mask = tensors["attention_mask"]
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise DataError(f"{where}: tensor '{key}' must be a (N, T) integer tensor, got {tuple(ids.shape)} {ids.dtype}")
    if mask is not None and mask.shape != ids.shape:
        raise DataError(f"{where}: attention_mask {tuple(mask.shape)} does not match '{key}' {tuple(ids.shape)}")
    samples = []
    for row in range(ids.shape[0]):
        seq = ids[row] if mask is None else ids[row][mask[row].bool()]
        values = [int(v) for v in seq.tolist()]
        _check_ids(values, vocab_size, f"{where} row {row}")
        samples.append(values)
    if not samples:
        raise DataError(f"{where} holds no samples")
    return samples


def _synthetic(cfg: DataConfig, vocab_size: int | None) -> list[list[int]]:
    vocab = cfg.vocab_size or vocab_size
    if not vocab:
        raise DataError("data.source=synthetic needs a vocabulary size; set data.vocab_size")
    gen = torch.Generator().manual_seed(cfg.seed)
    samples = []
    for _ in range(cfg.num_samples):
        length = cfg.seq_len
        if cfg.min_seq_len is not None:
            length = int(torch.randint(cfg.min_seq_len, cfg.seq_len + 1, (1,), generator=gen))
        samples.append(torch.randint(0, vocab, (length,), generator=gen).tolist())
    return samples


def load_samples(cfg: DataConfig, vocab_size: int | None, tokenizer: TokenizerRef | None = None) -> list[list[int]]:
    """Every sample of the configured source as token-id lists, checked against ``vocab_size``.

    ``tokenizer`` encodes text samples; without one, text is a DataError.
    """
    if cfg.source == "synthetic":
        samples = _synthetic(cfg, vocab_size)
    else:
        if not cfg.path:
            raise DataError(f"data.source={cfg.source} needs data.path")
        path = Path(cfg.path).expanduser()
        if not path.exists():
            raise DataError(f"data.path '{path}' does not exist; set data.path to an existing file")
        if cfg.source == "jsonl":
            samples = _read_jsonl(path, vocab_size, tokenizer)
        elif cfg.source == "text":
            samples = _read_text(path, vocab_size, tokenizer)
        else:
            samples = _read_tensor_file(path, cfg.key, vocab_size)
    if cfg.limit is not None:
        samples = samples[: cfg.limit]
    return samples


def make_batches(samples: list[list[int]], batch_size: int, pad_id: int) -> list[Batch]:
    """Consecutive samples in batches of ``batch_size``, right-padded with ``pad_id``."""
    batches = []
    for index, start in enumerate(range(0, len(samples), batch_size)):
        chunk = samples[start : start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        batches.append(Batch(index, list(range(start, start + len(chunk))), ids, mask))
    return batches
