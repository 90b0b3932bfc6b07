"""How npsd's layers run: the fast path or the plain one, its threads, and the memory budget of one temporary.

Three settings, read at every call by npsd/nn.py (the plain formulas), npsd/fast.py (the fast path)
and npsd/vae.py (whose blocks have a fast version):

- ``FAST``: True (the default) runs the fast path of npsd/fast.py; False runs the plain forward
  passes that docs/ explains and a debugger steps through. The environment variable NPSD_FAST=0
  starts npsd with it off;
- ``THREADS``: the threads the fast path splits its work across (``npsd --threads N``);
- ``CHUNK_BYTES``: the largest temporary (im2col matrix, attention score block) one call builds.

Change them with the functions below; npsd.nn offers the same functions under the same names
(``nn.set_fast(False)``, ``with nn.fast(False): ...``, ``nn.set_threads(2)``, ``nn.chunk_bytes(n)``).
"""

import os
from contextlib import contextmanager

# The largest temporary (im2col matrix, attention score block) one call may build, in bytes.
CHUNK_BYTES = 128 * 2**20
# True: the fast path (npsd/fast.py); False: the plain forward passes (npsd/nn.py, npsd/vae.py).
FAST = os.environ.get("NPSD_FAST", "1") != "0"
# The threads the fast path splits its work across (each piece calls BLAS with one thread).
THREADS = os.cpu_count() or 1


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
