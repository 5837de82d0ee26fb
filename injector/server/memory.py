"""Handing memory back to the system after a big request.

A request of several MiB leaves its memory with glibc's allocator once freed: by default glibc
serves ever larger blocks from its heap after freeing a big one (its mmap threshold adapts) and
keeps the freed heap for reuse, so that forty 8 MiB bodies left a worker 350 MB larger for good.
`limit_heap_growth` fixes the threshold (blocks over 512 KiB are mapped, and unmapped when
freed), and `return_freed_memory_if_due` asks glibc to return its free heap pages
(malloc_trim) once a second while big bodies come in and for a few seconds after: never on the
path of ordinary requests, which are far smaller.

Elsewhere than glibc (musl, macOS) both do nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import time
from typing import Any

from injector.server import httpio

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Above uvloop's TLS read buffer: it asks OpenSSL for up to 256 KiB at every read (its
# SSL_READ_MAX_SIZE), a block Python allocates and then shrinks to what came. Under a 128 KiB
# threshold, whenever the heap's top had no room for it (one read in thirteen under load), that
# was an mmap, an mremap, a page fault and an munmap: 3.6% of serve's CPU time at concurrency 16
# (bench/bench_http.py), for nothing. Bodies of megabytes are still mapped, and unmapped.
MMAP_THRESHOLD_BYTES = 512 * 1024
TRIM_THRESHOLD_BYTES = 1024 * 1024
# For how long after the last big body the free heap is handed back, once a sweep (a second).
TRIM_FOR_SECONDS = 10.0


def _glibc() -> Any:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    with contextlib.suppress(OSError):
        libc = ctypes.CDLL(name)
        if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim"):
            return libc
    return None


_LIBC = _glibc()


def limit_heap_growth() -> None:
    """Fix glibc's mmap and trim thresholds (once per process, before serving)."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)


def return_freed_memory_if_due() -> None:
    """malloc_trim, if a body of a MiB or more was read in the last TRIM_FOR_SECONDS and none
    is being read now (run by the connection sweep, once a second)."""
    budget = httpio.BODY_BUDGET
    if _LIBC is None or budget.in_use or budget.last_big_body < 0:
        return
    if time.monotonic() - budget.last_big_body <= TRIM_FOR_SECONDS:
        _LIBC.malloc_trim(0)
