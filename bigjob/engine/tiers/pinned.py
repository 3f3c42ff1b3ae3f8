"""Page-locked host buffers of the size asked for, for copies to a GPU.

``torch.empty(n, pin_memory=True)`` goes through PyTorch's caching host allocator, which
rounds every request up to the next power of two: a 50 MB layer takes 64 MB of pinned RAM,
a 520 MB one 1 GiB. For a CPU tier planned to the byte under ``max_memory["cpu"]`` that
waste (up to 2x) breaks the budget. :func:`pinned_empty` maps anonymous memory of the
size asked for (rounded to whole pages) and page-locks it with ``cudaHostRegister``, so
copies out of it are asynchronous DMA like those from PyTorch's pinned memory
(``tensor.is_pinned()`` is true). The pages are unlocked and unmapped when the last
tensor viewing them is freed.

Without CUDA (or where the driver refuses to lock the pages) it returns ordinary memory,
so callers need no second path: copies are then synchronous, never wrong.
"""

from __future__ import annotations

import logging
import mmap
import weakref

import torch

__all__ = ["pinned_empty"]

log = logging.getLogger(__name__)

_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context, so any GPU of a model-parallel map


class _Pages(mmap.mmap):
    """An anonymous mapping that can carry a finalizer (plain ``mmap.mmap`` objects cannot be weakly referenced)."""


def pinned_empty(nbytes: int, pin: bool = True) -> torch.Tensor:
    """A ``uint8`` CPU tensor of ``nbytes`` bytes, page-locked when ``pin`` and CUDA is available.

    The tensor owns its pages: no allocator keeps them after the tensor (and every view of
    it) is gone, and the pinned bytes are the bytes asked for, rounded up to a page.

    >>> buffer = pinned_empty(10_000, pin=False)
    >>> buffer.numel(), buffer.dtype, buffer.device.type
    (10000, torch.uint8, 'cpu')
    """
    if nbytes <= 0:
        return torch.empty(0, dtype=torch.uint8)
    if not pin or not torch.cuda.is_available():
        return torch.empty(nbytes, dtype=torch.uint8)
    size = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
    pages = _Pages(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    tensor = torch.frombuffer(pages, dtype=torch.uint8)  # holds ``pages`` until the storage is freed
    address = tensor.data_ptr()
    torch.cuda.init()
    status = torch.cuda.cudart().cudaHostRegister(address, size, _PORTABLE)
    if int(status) != 0:
        log.warning(
            "cudaHostRegister of %d bytes failed (CUDA error %d); that buffer is not page-locked and copies from it "
            "are synchronous (check `ulimit -l` inside containers)", size, int(status),
        )
        return tensor[:nbytes]
    # Runs when the storage lets go of ``pages``, before the pages are unmapped.
    weakref.finalize(pages, _unpin, address)
    return tensor[:nbytes]


def _unpin(address: int) -> None:
    """Unlock pages that copies may still be reading: PyTorch records no event for memory it did not
    allocate, so every GPU finishes its queued work first (this runs when a dispatch is dropped)."""
    try:
        for index in range(torch.cuda.device_count()):
            torch.cuda.synchronize(index)
        torch.cuda.cudart().cudaHostUnregister(address)
    except Exception:  # noqa: BLE001 - at interpreter exit CUDA may be gone; the pages go with the process
        log.debug("cudaHostUnregister failed", exc_info=True)
