"""Freed memory kept for the next array: two settings of glibc's malloc, made when npsd is imported,
and a third held while a load, a generation or a Pipeline model call runs; and no huge pages
requested for the arrays of a generation or a model call.

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

Blocks over 32 MiB (a GEGLU projection over 8192 tokens is 80 MiB, the VAE's largest maps 64-256
MiB) still come from mmap, fresh pages on every call: 0.61 GiB in a UNet call at 64x64 latents, 7%
of its time. So a load, a generation and the Pipeline's model calls (encode_text, unet, vae_encode,
vae_decode, decode_latents) run inside `holding()`: while the outermost one lasts, no block comes
from mmap (M_MMAP_MAX = 0) and freed memory stays in the heap for the next array; at its end the
thresholds are set back and the free memory is handed back to the kernel (malloc_trim), so that the
process does not keep its peak between calls. A 512x512 generation peaked within 15 MiB of the
size without it (docs/speed.md, section 7).

NumPy asks the kernel for transparent huge pages (madvise MADV_HUGEPAGE) for every array of 4 MiB
or more. Where the kernel compacts memory to find a huge page when such an array is first written
(Linux's default `defrag` setting for advised memory), a call whose memory has been handed back and
taken again waits on that compaction: a 512x512 VAE encode run right after PyTorch's took 6.9 s
against 5.1 s after npsd's own, 2-3 s of it in the kernel, and a UNet call at 64x64 latents 8.86
against 8.05 s (docs/speed.md, section 7). So the blocks of the model calls and generations also
turn NumPy's request off while they last (4 KiB pages, faulted without compaction) and restore it at
their end; `npsd.load` (`holding(huge_pages=True)`) leaves it on, as the weights it makes stay for the
process's life and are read on every call.

NPSD_KEEP_MEMORY=0 in the environment leaves malloc and NumPy as they are. Elsewhere than glibc
(macOS, Windows, musl) nothing is changed.
"""

import contextlib
import ctypes
import importlib
import os
import platform
import threading

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4          # glibc's <malloc.h>
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 64 * 2**20
_ENV_MMAP_MAX = os.environ.get("MALLOC_MMAP_MAX_", "")
MMAP_MAX = int(_ENV_MMAP_MAX) if _ENV_MMAP_MAX.isdigit() else 65536    # how many blocks mmap may serve


def _glibc():
    """This process's glibc as a ctypes library, or None elsewhere."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _glibc()


def keep_freed_memory():
    """Set the two thresholds above in this process's glibc malloc; True when both were set."""
    return _LIBC is not None and bool(_LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) \
        and bool(_LIBC.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


KEPT = os.environ.get("NPSD_KEEP_MEMORY", "1") != "0" and keep_freed_memory()
_held = [0]                                  # holding() blocks running, in every thread
_small = [0]                                 # those of them with huge_pages=False
_numpy_before = [True]                       # NumPy's setting when the first of those began
_lock = threading.Lock()


def _numpy_switch():
    """NumPy's `_set_madvise_hugepage(enabled) -> previous` (numpy._core.multiarray; numpy.core in
    NumPy 1.x), or None where this NumPy has none."""
    for name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            switch = getattr(importlib.import_module(name), "_set_madvise_hugepage", None)
        except ImportError:
            continue
        if switch is not None:
            return switch
    return None


_NUMPY_HUGE_PAGES = _numpy_switch() if KEPT else None


def numpy_huge_pages():
    """Whether NumPy now asks for transparent huge pages for its large arrays (None: no such switch)."""
    if _NUMPY_HUGE_PAGES is None:
        return None
    with _lock:
        now = _NUMPY_HUGE_PAGES(False)
        _NUMPY_HUGE_PAGES(now)
    return bool(now)


@contextlib.contextmanager
def holding(huge_pages=False):
    """While the outermost `with holding():` runs, no block comes from mmap and the heap keeps what is
    freed; leaving it sets the thresholds back and hands the free memory back (malloc_trim). Unless
    huge_pages, NumPy's request for transparent huge pages is off meanwhile. Nested and concurrent
    blocks count as one. Nothing changes where KEPT is False."""
    with _lock:
        _held[0] += 1
        if _held[0] == 1 and KEPT:
            _LIBC.mallopt(M_MMAP_MAX, 0)
            _LIBC.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
        if not huge_pages:
            _small[0] += 1
            if _small[0] == 1 and _NUMPY_HUGE_PAGES is not None:
                _numpy_before[0] = _NUMPY_HUGE_PAGES(False)
    try:
        yield
    finally:
        with _lock:
            if not huge_pages:
                _small[0] -= 1
                if _small[0] == 0 and _NUMPY_HUGE_PAGES is not None:
                    _NUMPY_HUGE_PAGES(_numpy_before[0])
            _held[0] -= 1
            if _held[0] == 0 and KEPT:
                _LIBC.mallopt(M_MMAP_MAX, MMAP_MAX)
                _LIBC.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
                _LIBC.malloc_trim(0)
