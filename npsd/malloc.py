"""Freed memory kept for the next array: two settings of glibc's malloc, made when npsd is imported.

A forward pass allocates and frees thousands of temporaries of 0.1-30 MiB (a layer's output, a
score block, an im2col piece). glibc's malloc gives such a block fresh pages from the kernel when
it is larger than its mmap threshold (128 KiB at start, raised to the size of each such block that
is freed, at most 32 MiB), and hands free memory at the top of its heap back to the kernel once
there is more than its trim threshold (twice the mmap threshold). Memory handed back and taken
again costs a page fault per 4 KiB page when it is first written, about 3 µs each on a 2-core VM:
a CLIP pass took 14,300 of them, a 77-token attention layer 500 and one over 256 queries and 77
keys 2,100, which was half its time (docs/speed.md, section 7). With

    M_MMAP_THRESHOLD = 32 MiB     (glibc's largest): blocks up to 32 MiB come from the heap,
    M_TRIM_THRESHOLD = 64 MiB     free heap memory is handed back beyond 64 MiB,

a temporary reuses the memory of one freed before it, and those passes take no faults.

The process keeps freed memory for its next arrays (at most 64 MiB of it at the heap's top); a whole
512x512 generation peaked at the same size as with glibc's defaults (2.54 GiB with float16 weights,
4.52 GiB with float32; `python -m benchmarks.memory`). The setting is the whole process's, so a
PyTorch model run beside npsd (as in benchmarks/bench.py) gets it too.

NPSD_KEEP_MEMORY=0 in the environment leaves malloc as it is. Elsewhere than glibc (macOS, Windows,
musl) nothing is changed.
"""

import ctypes
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3          # glibc's <malloc.h>
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 64 * 2**20


def keep_freed_memory():
    """Set the two thresholds above in this process's glibc malloc; True when both were set."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


KEPT = os.environ.get("NPSD_KEEP_MEMORY", "1") != "0" and keep_freed_memory()
