"""How npsd's layers run: the fast path or the plain one, its threads, the memory budget of one
temporary, and how convolutions pad.

Four settings, read at every call by npsd/nn.py (the plain formulas), npsd/fast.py (the fast path)
and npsd/vae.py (whose blocks have a fast version):

- ``FAST``: True (the default) runs the fast path of npsd/fast.py; False runs the plain forward
  passes that docs/ explains and a debugger steps through. The environment variable NPSD_FAST=0
  starts npsd with it off;
- ``THREADS``: the threads the fast path splits its work across (``npsd --threads N``); by default
  one per CPU this process may use (``usable_cpus``);
- ``CHUNK_BYTES``: the largest temporary (im2col matrix, attention score block) one call builds;
- ``PADDING_MODE``: how a padded convolution fills the border: "zeros" (the default) or "circular" (the
  map wraps around, torch's padding_mode="circular"); a generation with ``tiling=True`` sets it for
  its duration (AUTOMATIC1111's "Tiling": images that tile seamlessly).

Change them with the functions below; npsd.nn offers the same functions under the same names
(``nn.set_fast(False)``, ``with nn.fast(False): ...``, ``nn.set_threads(2)``, ``nn.chunk_bytes(n)``,
``with nn.padding_mode("circular"): ...``).
"""

import os
from contextlib import contextmanager

# The largest temporary (im2col matrix, attention score block) one call may build, in bytes.
CHUNK_BYTES = 128 * 2**20
# True: the fast path (npsd/fast.py); False: the plain forward passes (npsd/nn.py, npsd/vae.py).
FAST = os.environ.get("NPSD_FAST", "1") != "0"
# How a padded convolution fills the border (nn.conv2d): "zeros" or "circular" (PADDING_MODES).
PADDING_MODE = "zeros"
PADDING_MODES = ("zeros", "circular")


def cgroup_cpu_quota(proc_cgroup="/proc/self/cgroup", root="/sys/fs/cgroup"):
    """The CPUs that this process's cgroup may keep busy (`docker run --cpus 2`, systemd's CPUQuota),
    rounded up; None when it sets no quota or none can be read. cgroup v2 writes the quota in cpu.max
    as "<quota> <period>" ("max <period>": none), v1 in cpu.cfs_quota_us (-1: none) and
    cpu.cfs_period_us. The cgroup's folder is the path that /proc/self/cgroup names, under the
    controller's mount, or the mount itself (a container sees its own cgroup at the top)."""
    try:
        with open(proc_cgroup) as f:
            entries = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return None
    for entry in entries:
        if len(entry) != 3:
            continue
        controllers, path = entry[1], entry[2].lstrip("/")
        if controllers == "":                                              # cgroup v2
            mounts, files = [root], ["cpu.max"]
        elif "cpu" in controllers.split(","):                              # cgroup v1
            mounts = [os.path.join(root, controllers), os.path.join(root, "cpu")]
            files = ["cpu.cfs_quota_us", "cpu.cfs_period_us"]
        else:
            continue
        for folder in [os.path.join(m, path) for m in mounts] + mounts:
            words = _read_words([os.path.join(folder, name) for name in files])
            if words is None:
                continue
            quota, period = (int(w) if w.lstrip("-").isdigit() else 0 for w in words[:2])
            return -(-quota // period) if quota > 0 and period > 0 else None
    return None


def _read_words(paths):
    """The whitespace-separated words of these files, in order; None if one cannot be read or there
    are fewer than two."""
    words = []
    for path in paths:
        try:
            with open(path) as f:
                words += f.read().split()
        except (OSError, UnicodeDecodeError):
            return None
    return words if len(words) >= 2 else None


def usable_cpus():
    """The CPUs this process may use: those of its affinity mask (taskset, a container's cpuset,
    a batch job's allocation), at most its cgroup's CPU quota. os.cpu_count() counts the whole
    machine's, so a container given 2 of 64 cores would otherwise split every kernel 64 ways (on 2
    cores, 16 threads made an SD-sized attention layer 1.2x slower and 64 a 3x3 conv 3x slower)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(cpus, quota) if quota else cpus)


# The threads the fast path splits its work across (each piece calls BLAS with one thread).
THREADS = usable_cpus()


def set_chunk_bytes(n):
    """Set the memory budget of one temporary (im2col block, attention scores) in bytes."""
    global CHUNK_BYTES
    if int(n) < 1:
        raise ValueError(f"chunk budget must be a positive number of bytes, got {n}")
    CHUNK_BYTES = int(n)


@contextmanager
def chunk_bytes(n):
    """Temporarily change the chunk budget: ``with chunk_bytes(2**20): ...``."""
    old = CHUNK_BYTES
    set_chunk_bytes(n)
    try:
        yield
    finally:
        set_chunk_bytes(old)


def set_fast(on):
    """True: the fast path of npsd/fast.py; False: the plain forward passes."""
    global FAST
    FAST = bool(on)


@contextmanager
def fast(on):
    """Temporarily choose the path: ``with fast(False): ...`` runs the plain reference path."""
    old = FAST
    set_fast(on)
    try:
        yield
    finally:
        set_fast(old)


def set_threads(n):
    """Threads the fast path splits its work across (each piece calls BLAS with one thread)."""
    global THREADS
    if int(n) < 1:
        raise ValueError(f"threads must be a positive number, got {n}")
    THREADS = int(n)


@contextmanager
def padding_mode(mode):
    """Temporarily choose how padded convolutions fill the border: ``with padding_mode("circular"): ...``
    (PADDING_MODES)."""
    global PADDING_MODE
    if mode not in PADDING_MODES:
        raise ValueError(f"padding mode must be one of {', '.join(PADDING_MODES)}, got {mode!r}")
    old, PADDING_MODE = PADDING_MODE, mode
    try:
        yield
    finally:
        PADDING_MODE = old
