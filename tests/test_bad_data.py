"""Bad data, each a one-line DataError before any batch runs, through the catalogue of tests/test_bad_inputs.py.

Every case is run as :func:`test_bad_inputs.check_case` runs the catalogue: the Python API
raises exactly :class:`DataError` with one line naming the value and the key (or file line)
to change; the command exits 1 with that line and no traceback; earlier run folders and
cache rows are unchanged; no run folder claims to be complete.
"""

from __future__ import annotations

import pytest
from _jobkit import TINY
from test_bad_inputs import Case, check_case, seeded, text_file, workspace  # noqa: F401 - the fixtures are used by name

from bigjob.errors import DataError

JSONL = ("data=jsonl", "data.path={w}/in.jsonl")
VOCAB = TINY["vocab_size"]
CONTEXT = TINY["max_seq_len"]


def raw_file(name: str, data: bytes):  # type: ignore[no-untyped-def]
    def setup(w):  # type: ignore[no-untyped-def]
        (w / name).write_bytes(data)

    return setup


DATA_CASES: dict[str, Case] = {
    "pad id beyond the vocabulary": Case(("data.pad_id=9999",), DataError, ("data.pad_id=9999", f"[0, {VOCAB})")),
    "pad id negative": Case(("data.pad_id=-1",), DataError, ("data.pad_id=-1", f"[0, {VOCAB})")),
    "synthetic seq_len above the model's context": Case(
        (f"data.seq_len={CONTEXT + 1}",), DataError, (f"{CONTEXT + 1} tokens", f"context of {CONTEXT}", f"data.seq_len to at most {CONTEXT}")
    ),
    "a line not UTF-8": Case(JSONL, DataError, ("in.jsonl' line 2", "not UTF-8", "0xff", "data.path"), raw_file("in.jsonl", b"[1, 2]\n[3, \xff4]\n")),
    "a line of 2M tokens": Case(
        JSONL, DataError, ("sample 1 has 2000000 tokens", f"context of {CONTEXT}", "data.path"),
        text_file("in.jsonl", "[1, 2]\n[" + ", ".join(["3"] * 2_000_000) + "]\n"),
    ),
    "JSON nested too deeply": Case(JSONL, DataError, ("in.jsonl' line 1", "nested too deeply"), text_file("in.jsonl", "[" * 100_000 + "]" * 100_000 + "\n")),
    "a huge integer id": Case(JSONL, DataError, ("in.jsonl' line 1", "(40 digits)", f"[0, {VOCAB})"), text_file("in.jsonl", f"[1, {10**39}]\n")),
    "an integer too long to read": Case(JSONL, DataError, ("in.jsonl' line 1", "not valid JSON", "digits"), text_file("in.jsonl", "[1, " + "9" * 5000 + "]\n")),
}


@pytest.mark.parametrize("name", list(DATA_CASES))
def test_bad_data(workspace, name):  # noqa: F811 - the fixture
    check_case(workspace, DATA_CASES[name])
