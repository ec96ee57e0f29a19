"""How the C allocator hands memory back to the operating system during CPU training.

A training step allocates and frees the same multi-megabyte activations every time. By default glibc
returns much of that memory to the kernel between steps, and the next step page-faults it back in
(measured: the `small` preset with XL memory took 1.34x the step without memory, 1.26x once freed
memory was kept, with a third of the page faults). Keeping freed memory for reuse holds on to no more
than the step's own peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # the most older glibc (64-bit) accept; larger blocks are mapped afresh
TRIM_THRESHOLD = 1 << 30  # hand memory back only when a GiB lies free at the top of the heap


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc keep freed blocks of up to 32 MiB for reuse; False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    # in this order only: a trim threshold set alone would also pin the mapping threshold at its 128 KiB start,
    # and every activation would be mapped afresh
    applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if applied:
        log.debug("glibc keeps freed memory of up to %d MiB for reuse", MMAP_THRESHOLD_MAX >> 20)
    return applied
