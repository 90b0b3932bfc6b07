"""The fast path's threads do not oversubscribe the cores: while its kernels run, the only threads
that compute are the calling thread and npsd's own pool (npsd/fast.py), each calling BLAS with one
thread; OpenBLAS's own worker threads stay idle. Measured from the kernel's per-thread CPU times
(/proc/self/task/<tid>/stat), so it holds whatever the machine's core count.

The check can fail: with npsd's BLAS limit switched off (blas.single_threaded made a no-op), the
pieces' matrix products call OpenBLAS with its whole pool, and its workers compute (measured: 45%
of the CPU time of the same calls); with the limit on they take 0.0% (bound 5%)."""

import os
import sys
import threading
from contextlib import contextmanager

import numpy as np
import pytest

from npsd import blas, nn, settings

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not blas.available(),
                                reason="needs Linux's /proc and an OpenBLAS whose threads npsd can set")

def npsd_threads():
    """The calling thread and npsd's pool threads (named "npsd_..."), as kernel thread ids."""
    return {threading.get_native_id()} | {t.native_id for t in threading.enumerate() if t.name.startswith("npsd")}


def work():
    """Fast-path kernels that call BLAS from their pieces: 3x3 conv (Winograd), linear, attention."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 128, 64, 64), dtype=np.float32)
    w = rng.standard_normal((128, 128, 3, 3), dtype=np.float32) * 0.03
    t = rng.standard_normal((2, 1024, 320), dtype=np.float32)
    lw = rng.standard_normal((1280, 320), dtype=np.float32) * 0.05
    for _ in range(2):
        nn.conv2d(x, w, None, padding=1)
        nn.linear(t, lw)
        nn.attention(t, t, t, 8)


def share_outside_npsd():
    """Fraction of this process's CPU time, during work(), spent by threads that are not npsd's."""
    work()                                   # the pool exists, OpenBLAS has started its workers
    before = blas.thread_cpu_seconds()
    work()
    after = blas.thread_cpu_seconds()
    ours = npsd_threads()
    spent = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    total = sum(spent.values())
    assert total > 0.1, f"too little CPU time measured ({total:.2f} s) to judge"
    return sum(s for tid, s in spent.items() if tid not in ours) / total


@contextmanager
def two_threads():
    """npsd's pool and OpenBLAS both at 2 threads (the setting that could oversubscribe)."""
    old_npsd, old_blas = settings.THREADS, blas.get_threads()
    settings.set_threads(2)
    blas.set_threads(2)
    try:
        yield
    finally:
        settings.set_threads(old_npsd)
        blas.set_threads(old_blas)


def test_only_npsd_threads_compute():
    with nn.fast(True), two_threads():
        share = share_outside_npsd()
    print(f"CPU time outside npsd's threads: {share:.1%} (bound 5%)")
    assert share < 0.05


def test_check_fails_without_the_blas_limit(monkeypatch):
    @contextmanager
    def no_limit():
        yield
    monkeypatch.setattr(blas, "single_threaded", no_limit)
    with nn.fast(True), two_threads():
        share = share_outside_npsd()
    print(f"without the BLAS limit: {share:.1%} of the CPU time outside npsd's threads")
    assert share >= 0.05


def test_numpy_blas_is_found_first():
    """NumPy's OpenBLAS is the one whose threads the fast path limits, also where SciPy's copy lies in
    a folder that sorts first (numpy installed into a user's folder, scipy in the system's: paths as
    a virtual machine had them, where sorting by path put scipy's first)."""
    numpy_dir = "/tmp/site/numpy"
    paths = {"/opt/venv/lib/python3.12/site-packages/scipy.libs/libscipy_openblas-6cdc3b4a.so",
             "/tmp/site/numpy.libs/libscipy_openblas64_-32a4b2a6.so"}
    assert blas.numpy_first(paths, numpy_dir)[0].startswith("/tmp/site/numpy.libs/")
    mac = {"/Library/Python/site-packages/scipy/.dylibs/libscipy_openblas.dylib",
           "/Users/u/site/numpy/.dylibs/libscipy_openblas64_.dylib"}
    assert blas.numpy_first(mac, "/Users/u/site/numpy")[0].startswith("/Users/u/site/numpy/")


def test_every_openblas_gets_the_thread_count():
    import scipy.linalg  # noqa: F401  (loads SciPy's own OpenBLAS beside numpy's)
    old = blas.get_threads()
    try:
        blas._funcs = None                                       # found again, with scipy's loaded
        assert len(blas._find()) == 2, "numpy's and scipy's OpenBLAS"
        for n in (1, 2):
            blas.set_threads(n)
            assert [get() for get, _ in blas._find()] == [n, n]
    finally:
        blas.set_threads(old)


def test_check_fails_when_scipy_blas_is_taken_for_numpy(monkeypatch):
    """With scipy's OpenBLAS found first (the paths sorted by name, the other way round), the fast
    kernels limit the wrong library and numpy's workers compute beside npsd's threads."""
    import scipy.linalg  # noqa: F401
    monkeypatch.setattr(blas, "numpy_first", lambda paths, numpy_dir: sorted(paths, key=lambda p: "scipy.libs" not in p))
    monkeypatch.setattr(blas, "_funcs", None)
    assert len(blas._find()) == 2
    with nn.fast(True), two_threads():
        share = share_outside_npsd()
    print(f"scipy's BLAS limited instead of numpy's: {share:.1%} of the CPU time outside npsd's threads")
    assert share >= 0.05


# --- how many threads by default ---------------------------------------------------------------

def test_default_threads_are_the_cpus_the_process_may_use():
    """A process confined to one CPU (taskset, a container's cpuset) splits its kernels one way, not
    once per CPU of the machine (os.cpu_count() would give every CPU here: the check fails then on
    any machine with two or more)."""
    import subprocess
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from npsd import settings; print(settings.THREADS, os.cpu_count())")
    threads, machine = map(int, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                               check=True).stdout.split())
    print(f"one CPU of {machine}: {threads} thread(s)")
    assert threads == 1
    assert settings.usable_cpus() == min(len(os.sched_getaffinity(0)), settings.cgroup_cpu_quota() or 10**6)


def cgroup_tree(tmp_path, proc, files):
    """A fake /proc/self/cgroup and cgroup mount under tmp_path -> (proc file, mount)."""
    (tmp_path / "proc").write_text(proc)
    for name, text in files.items():
        (tmp_path / "mnt" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "mnt" / name).write_text(text)
    return str(tmp_path / "proc"), str(tmp_path / "mnt")


@pytest.mark.parametrize("proc, files, cpus", [
    ("0::/job\n", {"job/cpu.max": "150000 100000\n", "cpu.max": "max 100000\n"}, 2),   # v2, own folder, rounded up
    ("0::/docker/a1\n", {"cpu.max": "200000 100000\n"}, 2),                          # v2, the container's at the top
    ("0::/\n", {"cpu.max": "max 100000\n"}, None),                                   # v2, no quota
    ("4:cpu,cpuacct:/job\n1:name=systemd:/\n0::/\n",                                # v1
     {"cpu,cpuacct/job/cpu.cfs_quota_us": "50000\n", "cpu,cpuacct/job/cpu.cfs_period_us": "100000\n"}, 1),
    ("1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),          # v1, none
    ("0::/job\n", {"job/cpu.max": "many cores\n"}, None),                             # unreadable numbers
    ("12:memory:/job\n", {"job/cpu.max": "100000 100000\n"}, None),                  # no cpu controller
])
def test_cgroup_cpu_quota(tmp_path, proc, files, cpus):
    assert settings.cgroup_cpu_quota(*cgroup_tree(tmp_path, proc, files)) == cpus


def test_cpu_quota_bounds_the_default(monkeypatch):
    affinity = len(os.sched_getaffinity(0))
    for quota, expected in ((None, affinity), (1, 1), (affinity + 5, affinity)):
        monkeypatch.setattr(settings, "cgroup_cpu_quota", lambda quota=quota: quota)
        assert settings.usable_cpus() == expected
    monkeypatch.undo()
    assert settings.cgroup_cpu_quota(str(os.devnull) + "/none") is None
