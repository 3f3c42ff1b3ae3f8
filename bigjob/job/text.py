"""Text inputs: prompts read from a file and turned into token ids by the model folder's tokenizer.

``data=prompts data.path=FILE`` (``data.source=text``) reads

* a ``.jsonl`` / ``.json`` file: one sample per line, a JSON string, ``{"text": "..."}``, or
  token ids (``[1, 2, 3]`` or ``{"input_ids": [...]}``), so exact ids can be mixed with text;
* any other file: one prompt per line, as written (blank lines are skipped; use JSONL for
  prompts that span lines).

Text is encoded with the tokenizer saved in the model folder (special tokens such as BOS
or ``[CLS]`` added as the tokenizer does by default). A sample longer than the model's
context (with room for ``task.max_new_tokens`` when generating) is an error naming it.

>>> import tempfile
>>> path = Path(tempfile.mkdtemp()) / "prompts.jsonl"
>>> _ = path.write_text('"hello world"\\n{"text": "bye"}\\n[5, 6]\\n')
>>> read_prompts(path)
['hello world', 'bye', [5, 6]]
>>> check_context([[1, 2, 3]], context=4, reserve=2, reserve_key="task.max_new_tokens")
Traceback (most recent call last):
...
bigjob.errors.DataError: sample 0 has 3 tokens, and with task.max_new_tokens=2 needs 5 positions, more than the model's context of 4; shorten that prompt or lower task.max_new_tokens
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Union

from bigjob.errors import DataError

__all__ = ["Sample", "TokenizerRef", "check_context", "encode", "parse_json_sample", "read_prompts"]

Sample = Union[str, list[int]]
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")


class TokenizerRef:
    """The tokenizer of a model folder, loaded on first use (a folder without one fails only if text needs it)."""

    def __init__(self, path: str | os.PathLike[str], key: str = "model.path") -> None:
        self.path = Path(path)
        self.key = key
        self._tokenizer: Any = None
        self._error: DataError | None = None

    def get(self) -> Any:
        """The tokenizer, or a DataError naming the key of the folder that lacks it."""
        if self._tokenizer is None and self._error is None:
            from bigjob.models.hf_tokens import load_tokenizer

            try:
                self._tokenizer = load_tokenizer(self.path, key=self.key)
            except DataError as err:
                self._error = err
        if self._error is not None:
            raise self._error
        return self._tokenizer

    def maybe(self) -> Any:
        """The tokenizer, or None when the folder has none."""
        try:
            return self.get()
        except DataError:
            return None


def parse_json_sample(value: Any, where: str) -> Sample:
    """One JSON value as a sample: a string, ``{"text": ...}``, a list of ids or ``{"input_ids": [...]}``."""
    if isinstance(value, dict):
        if "text" in value:
            value = value["text"]
        elif "input_ids" in value:
            value = value["input_ids"]
        else:
            raise DataError(f"{where}: an object needs a 'text' string or an 'input_ids' list; keys found: {sorted(value)[:5]}")
    if isinstance(value, str):
        if not value:
            raise DataError(f"{where}: empty text; every sample needs at least one token")
        return value
    if isinstance(value, list) and value and all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        return value
    raise DataError(f"{where}: expected a string, {{\"text\": ...}} or a non-empty list of integer token ids, got {json.dumps(value)[:60]}")


def read_prompts(path: str | os.PathLike[str], key: str = "data.path") -> list[Sample]:
    """Every sample of a prompts file, in order (see the module doc for the formats)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{key} '{path}' does not exist; set {key} to a JSONL or text file of prompts") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {key} '{path}' as UTF-8 text ({err}); set {key} to a JSONL or text file of prompts") from None
    samples: list[Sample] = []
    as_json = path.suffix.lower() in JSON_SUFFIXES
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if not as_json:
            samples.append(line)
            continue
        where = f"{key} '{path}' line {lineno}"
        try:
            value = json.loads(line)
        except ValueError as err:
            raise DataError(f"{where}: not valid JSON ({err.msg}); each line must be a JSON string, {{\"text\": ...}} or a list of token ids") from None
        samples.append(parse_json_sample(value, where))
    if not samples:
        raise DataError(f"{key} '{path}' holds no prompts; write one prompt per line")
    return samples


def encode(sample: Sample, tokenizer: TokenizerRef | None, where: str) -> list[int]:
    """Token ids of one sample (ids pass through unchanged)."""
    if not isinstance(sample, str):
        return sample
    if tokenizer is None:
        raise DataError(f"{where}: a text sample needs a tokenizer and this model has none; give token ids ([1, 2, 3]) or use model=hf")
    ids = list(tokenizer.get().encode(sample))
    if not ids:
        raise DataError(f"{where}: the text {sample[:40]!r} encodes to no tokens")
    return [int(i) for i in ids]


def check_context(
    samples: list[list[int]], context: int | None, reserve: int = 0, reserve_key: str = "task.max_new_tokens", synthetic: bool = False
) -> None:
    """A DataError naming the first sample that, with ``reserve`` more positions, exceeds ``context``.

    ``synthetic`` samples are made to ``data.seq_len`` tokens: that is the key to change.
    """
    if context is None:
        return
    for index, ids in enumerate(samples):
        if len(ids) + reserve > context:
            extra = f", and with {reserve_key}={reserve} needs {len(ids) + reserve} positions," if reserve else ","
            if synthetic:
                fix = f"set data.seq_len to at most {context - reserve}" + (f" or lower {reserve_key}" if reserve else "")
            else:
                fix = f"shorten that prompt or lower {reserve_key}" if reserve else "shorten that sample (data.path) or use data.limit"
            raise DataError(f"sample {index} has {len(ids)} tokens{extra} more than the model's context of {context}; {fix}")
