"""Host memory-allocator settings that XLA's CPU runtime needs to run at full speed.

`tune_malloc()` sets, through glibc's `mallopt`: one arena for all threads, no `mmap` for
large blocks, no trimming of the heap top, a 512 MiB top pad, so a step's large buffers
are not page-faulted in again every step (1.5-1.8x faster ProNet steps on the 2-core VM;
BENCHMARKS.md "Host allocator"). The price: the process keeps its peak heap. Call it
first thing in a process, before JAX starts threads; the command-line tools, benchmarks
and tests do. It does nothing on other C libraries, or with BIHIER_TUNE_MALLOC=0.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# glibc <malloc.h> parameter numbers.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_SETTINGS = (
    (_M_ARENA_MAX, 1),              # one arena: thread arenas return pages eagerly
    (_M_MMAP_MAX, 0),               # large blocks from the heap, not fresh mmaps
    (_M_TRIM_THRESHOLD, -1),        # never give the heap top back (-1 disables trimming)
    (_M_TOP_PAD, 512 << 20),        # grow the heap in big steps
)

_applied: bool | None = None


def tune_malloc() -> bool:
  """Apply the allocator settings once per process; True if they are in effect."""
  global _applied
  if _applied is not None:
    return _applied
  _applied = False
  if os.environ.get("BIHIER_TUNE_MALLOC", "1") == "0":
    return False
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  _applied = all(mallopt(param, value) == 1 for param, value in _SETTINGS)
  return _applied
