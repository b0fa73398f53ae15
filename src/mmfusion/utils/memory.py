"""Give freed memory back to the system: glibc's allocator keeps what a burst of large requests used.

Two knobs of glibc's malloc, both no-ops elsewhere (macOS, musl, Windows):

- :func:`fix_mmap_threshold`: glibc serves a block over the *mmap threshold* (128 KiB at first) with its own
  ``mmap``, which ``free`` unmaps at once; but each such free raises the threshold to the block's size (up to
  32 MiB), so the next large blocks (request bodies, decoded images) come from the heap instead, which seldom
  shrinks. Setting the threshold explicitly turns that adjustment off.
- :func:`trim`: ``malloc_trim(0)`` returns the free pages of every arena (one per thread that allocated) to the
  system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim, libc.mallopt  # noqa: B018 (glibc only: AttributeError elsewhere)
    except (OSError, AttributeError):
        return None
    return libc


def fix_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """Serve blocks of ``nbytes`` or more by mmap, always (see the module's note); False where not glibc."""
    libc = _libc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)))
    if not ok:
        log.debug("mallopt(M_MMAP_THRESHOLD) refused %d", nbytes)
    return ok


def trim() -> bool:
    """Return free heap memory to the system; True when some was returned (False also where not glibc)."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
