"""Whether a SQLite write-ahead log (``cache.db-wal``) is one, read without SQLite.

SQLite reads a ``-wal`` file whose header or first frame fails its checksums as empty: it
drops every transaction the log held since the last checkpoint, without a word. The job
cache checks its database's log before opening it, so that such a loss (garbage written
over the log, a log from another database) is said in one warning line; what was lost is
computed again.

The format (https://www.sqlite.org/fileformat2.html#walformat): a 32-byte header (magic,
version, page size, checkpoint sequence, two salts, two checksums), then frames of a 24-byte
header (page number, database size for a commit, the header's salts, two checksums) and one
page. Checksums run over 32-bit words, little-endian for magic ``0x377f0682`` and big-endian
for ``0x377f0683``, each frame's continuing from the one before. Only the header and the
first frame are checked: frames past the current log are normal (left over from before the
log was last restarted), and SQLite stops at the first one that fails.

>>> import tempfile
>>> path = Path(tempfile.mkdtemp()) / "x.db-wal"
>>> _ = path.write_bytes(b"garbage" * 100)
>>> wal_problem(path)
'it does not start as a SQLite write-ahead log'
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

__all__ = ["wal_problem"]

_MAGIC = (0x377F0682, 0x377F0683)
_VERSION = 3007000
_HEADER, _FRAME_HEADER = 32, 24
_MASK = 0xFFFFFFFF


def _checksum(data: bytes, big_endian: bool, s0: int = 0, s1: int = 0) -> tuple[int, int]:
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & _MASK
        s1 = (s1 + words[i + 1] + s0) & _MASK
    return s0, s1


def wal_problem(path: str | os.PathLike[str]) -> str | None:
    """Why the write-ahead log at ``path`` is not a sound one, or None (a log that is empty or absent is sound)."""
    try:
        with open(path, "rb") as handle:
            header = handle.read(_HEADER)
            if not header:
                return None
            if len(header) < _HEADER:
                return "it is shorter than a write-ahead log's header"
            magic, version, page_size, _, salt1, salt2, sum1, sum2 = struct.unpack(">8I", header)
            if magic not in _MAGIC or version != _VERSION:
                return "it does not start as a SQLite write-ahead log"
            big_endian = magic == _MAGIC[1]
            if _checksum(header[:24], big_endian) != (sum1, sum2):
                return "its header fails its checksum"
            if page_size < 512 or page_size > 65536 or page_size & (page_size - 1):
                return f"its header names page size {page_size}"
            frame = handle.read(_FRAME_HEADER + page_size)
    except OSError:
        return None  # gone meanwhile (the last connection closed), or unreadable: SQLite will say so itself
    if not frame:
        return None  # a header with no frame: a log just restarted
    if len(frame) < _FRAME_HEADER + page_size:
        return "its first frame is cut short"
    _, _, frame_salt1, frame_salt2, frame_sum1, frame_sum2 = struct.unpack(">6I", frame[:_FRAME_HEADER])
    if (frame_salt1, frame_salt2) != (salt1, salt2):
        return "its first frame does not belong to its header"
    running = _checksum(frame[:8], big_endian, sum1, sum2)
    if _checksum(frame[_FRAME_HEADER:], big_endian, *running) != (frame_sum1, frame_sum2):
        return "its first frame fails its checksum"
    return None
