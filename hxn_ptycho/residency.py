"""What a reconstructing process keeps resident besides its arrays (issue 24: peak ≤ 1.5 × (exit
waves + data)).

Two one-time costs of starting a rank stay resident long after they are needed:

- **freed heap**: reading the scan (HDF5's chunk caches) and loading numba's kernels free
  megabytes that glibc keeps in its heap; :func:`trim_heap` hands them back (``malloc_trim``).
- **LLVM's start-up code**: numba's LLVM (``libllvmlite.so``, 170 MB on disk) runs its static
  initialisers when imported and its code generator's set-up when the first kernel is loaded from
  the on-disk cache; the pages of machine code it touched (about 50 MiB, with the kernel's
  fault-around) stay mapped, though the loaded kernels never call into LLVM again.
  :func:`release_library_code` unmaps those of a library's mappings that hold nothing but clean
  file pages (``madvise(MADV_DONTNEED)``: read-only, no private-dirty or anonymous page — exactly
  what the kernel's own reclaim drops under memory pressure, re-read from the file if touched
  again); relocated data and anything written is left alone.

Both are Linux/glibc facilities; elsewhere they do nothing. Measured in docs/performance.md ("Peak
resident memory").
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
from functools import lru_cache
from typing import Any

logger = logging.getLogger(__name__)

MADV_DONTNEED = 4
SMAPS = "/proc/self/smaps"


@lru_cache(maxsize=1)
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    if name is None:        # pragma: no cover - no C library found
        return None
    try:
        libc = ctypes.CDLL(name, use_errno=True)
    except OSError:         # pragma: no cover
        return None
    if not hasattr(libc, "malloc_trim") or not hasattr(libc, "madvise"):     # pragma: no cover - not glibc
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    return libc


def trim_heap() -> bool:
    """Return the heap's free memory to the system (glibc ``malloc_trim(0)``); False where there is
    no glibc. Cost: a walk over the heap's free chunks (about a millisecond)."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0))


def clean_file_mappings(suffix: str) -> list[tuple[int, int]]:
    """(start, end) of this process's mappings of a file whose path ends with ``suffix`` that hold
    only clean file pages: not writable, and no private-dirty, shared-dirty or anonymous page."""
    out: list[tuple[int, int]] = []
    try:
        with open(SMAPS) as f:
            lines = f.read().splitlines()
    except OSError:         # pragma: no cover - not Linux
        return out
    span: tuple[int, int] | None = None
    clean = False
    for line in lines + ["00-00 ---p 0 0:0 0 <end>"]:
        head = line.split(None, 5)
        if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):     # a mapping's header
            if span is not None and clean:
                out.append(span)
            path = head[5] if len(head) > 5 else ""
            span, clean = None, False
            if path.endswith(suffix) and "w" not in head[1]:
                a, b = head[0].split("-")
                span, clean = (int(a, 16), int(b, 16)), True
        elif span is not None and head and head[0] in ("Private_Dirty:", "Shared_Dirty:", "Anonymous:"):
            clean = clean and int(head[1]) == 0
    return out


def release_library_code(suffix: str = "libllvmlite.so") -> int:
    """Unmap the clean file pages of the library ``suffix`` from this process (they are re-read from
    the file if it runs that code again); returns the bytes of address range advised (0 where
    there is none, or no glibc)."""
    libc = _libc()
    if libc is None:
        return 0
    done = 0
    for a, b in clean_file_mappings(suffix):
        if libc.madvise(a, b - a, MADV_DONTNEED) == 0:
            done += b - a
        else:       # pragma: no cover - the kernel refused (it should not for a read-only file mapping)
            logger.debug("madvise(%x, %d, MADV_DONTNEED) failed: errno %d", a, b - a, ctypes.get_errno())
    return done
