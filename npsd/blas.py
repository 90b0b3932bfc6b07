"""The BLAS thread count of the running process, for npsd's fast path (npsd/fast.py).

The fast path splits its work into pieces that run on ``settings.THREADS`` threads of its own,
each piece calling single-threaded BLAS. Mixing its threads with BLAS's own pool is slow: OpenBLAS's
workers spin for a while after each call and take the cores that the next elementwise step needs.
So each fast kernel runs with BLAS set to one thread and restores the previous count afterwards.

NumPy's wheels ship OpenBLAS, whose ``openblas_set_num_threads`` we call through ctypes (as
threadpoolctl does; a library already loaded by NumPy, no new dependency). With another BLAS (MKL,
Apple Accelerate) or where the library is not found, ``available()`` is False and the fast path
leaves matrix products to the BLAS's own threads.
"""

import ctypes
import os
from contextlib import contextmanager

_SET = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads64_",
        "openblas_set_num_threads")
_GET = ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads", "openblas_get_num_threads64_",
        "openblas_get_num_threads")
_CORENAME = ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename", "openblas_get_corename64_",
             "openblas_get_corename")
_funcs = None


def _openblas_libraries():
    """The OpenBLAS libraries loaded into this process, as ctypes handles, numpy's first."""
    import numpy
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
    except OSError:
        return
    for path in numpy_first(paths, os.path.dirname(os.path.abspath(numpy.__file__))):
        try:
            yield ctypes.CDLL(path)
        except OSError:
            continue


def numpy_first(paths, numpy_dir):
    """The library paths, numpy's first. NumPy's wheel keeps its OpenBLAS beside the package
    (numpy.libs/, or numpy/.dylibs/ on macOS); SciPy's wheel loads another (scipy.libs/), which can lie
    in a folder that sorts first (a system site-packages before a user's), so the paths' order says
    nothing about which is numpy's."""
    return sorted(paths, key=lambda p: (not p.startswith(numpy_dir), p))


def _find():
    """[(get, set), ...]: the thread-count functions of every OpenBLAS loaded, numpy's first."""
    global _funcs
    if _funcs is not None:
        return _funcs
    _funcs = []
    for lib in _openblas_libraries():
        get = next((getattr(lib, n) for n in _GET if hasattr(lib, n)), None)
        set_ = next((getattr(lib, n) for n in _SET if hasattr(lib, n)), None)
        if get and set_:
            get.restype, get.argtypes = ctypes.c_int, []
            set_.restype, set_.argtypes = None, [ctypes.c_int]
            _funcs.append((get, set_))
    return _funcs


def kernel():
    """OpenBLAS's name for the kernels it chose for this CPU (e.g. "SkylakeX", "Zen"), or None."""
    for lib in _openblas_libraries():                          # numpy's first
        name = next((n for n in _CORENAME if hasattr(lib, n)), None)
        if name:
            f = getattr(lib, name)
            f.restype, f.argtypes = ctypes.c_char_p, []
            return f().decode("ascii", "replace")
    return None


def available():
    """True when npsd can set the BLAS thread count of this process."""
    return bool(_find())


def get_threads():
    """numpy's BLAS thread count, or None where npsd cannot read it."""
    f = _find()
    return f[0][0]() if f else None


def set_threads(n):
    """Set the thread count of every OpenBLAS in this process; False where npsd cannot (see available())."""
    f = _find()
    for _, set_ in f:
        set_(int(n))
    return bool(f)


@contextmanager
def single_threaded():
    """numpy's BLAS calls inside the block use one thread (the previous count is restored after)."""
    f = _find()
    if not f:
        yield
        return
    get, set_ = f[0]
    old = get()
    if old == 1:
        yield
        return
    set_(1)
    try:
        yield
    finally:
        set_(old)


def thread_cpu_seconds():
    """{thread id: user + system CPU seconds so far} for every thread of this process, from Linux's
    /proc ({} elsewhere): what shows which threads really computed, whatever a library was told."""
    out = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    ticks = os.sysconf("SC_CLK_TCK")
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:                     # the thread ended meanwhile
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / ticks      # utime, stime
    return out


# --- the command line's --threads N: BLAS's threads for the whole run ----------------------------

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def limit_threads(n, argv_for_restart=None):
    """Limit the BLAS threads of this process to n, for good (npsd/cli.py's --threads N). -> how:
    "npsd.blas" (set_threads above), a threadpoolctl limiter (keep it alive while the limit should
    hold), "environment" (the variables were set before numpy loaded its BLAS, or after a restart),
    or None (not possible; a warning says so).

    Where set_threads cannot (another BLAS) and threadpoolctl is not installed: OpenBLAS/MKL read
    THREAD_VARS only when numpy loads them, which has happened by now (importing npsd imports numpy),
    so set the variables and restart the process with the same arguments (os.execv of
    `python -m npsd *argv_for_restart`) when running as a command (argv_for_restart not None)."""
    import os
    import sys
    import warnings
    if set_threads(n):
        return "npsd.blas"
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        if all(os.environ.get(v) == str(n) for v in THREAD_VARS):
            return "environment"                   # set before numpy loaded (or after our restart)
        for v in THREAD_VARS:
            os.environ[v] = str(n)
        if argv_for_restart is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            os.execv(sys.executable, [sys.executable, "-m", "npsd", *argv_for_restart])
        warnings.warn(f"--threads {n}: cannot change the BLAS threads of this running process without "
                      f"threadpoolctl (pip install threadpoolctl); set {THREAD_VARS[1]}={n} before starting")
        return None
    return threadpool_limits(limits=n)
