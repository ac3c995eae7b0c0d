"""Host memory-allocator settings that XLA's CPU runtime needs to run at full speed.

XLA on CPU allocates every execution's temporary and output buffers with the C
allocator. With glibc's defaults, blocks above the (dynamic, at most 32 MiB) mmap
threshold come from fresh `mmap` calls and go back to the kernel when freed, and the
per-thread arenas give freed heap pages back as well, so every training step page-faults
its large buffers in again. Measured on the 2-core development VM (BENCHMARKS.md, "Host
allocator"): one ProNet convolution forward+backward at 1,024 nodes x 17,408 edges took
13.1 ms with 8,700 minor page faults per call (12 ms of it kernel time), and 3.0 ms with
none after `tune_malloc()`; whole ProNet training steps ran 1.5-1.8x faster.

`tune_malloc()` sets, through glibc's `mallopt`: one arena for all threads, no `mmap`
for large blocks, no trimming of the heap top, and a 512 MiB top pad. The price: the
process keeps its peak heap (RSS does not shrink after a large step), which is what a
training or evaluation process wants anyway.

Call it first thing in a process, before JAX runs anything (threads created earlier may
keep their own arenas). The command-line tools, benchmarks and tests do; a library user
on CPU should too. It does nothing on other C libraries, or when the environment sets
BIHIER_TUNE_MALLOC=0.
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
