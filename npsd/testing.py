"""Comparing npsd's arrays with a reference implementation's (used by tests/ and `npsd parity`).

The relative error is max|actual - reference| / max|reference|: one number per tensor, scaled by
the tensor's own magnitude, so that the same tolerance means the same thing for a GroupNorm output
(values around 1) and a UNet block output (values around 100).
"""

from dataclasses import dataclass

import numpy as np


@dataclass
class Comparison:
    name: str
    shape: tuple
    max_abs: float        # max |actual - reference|
    max_rel: float        # max_abs / max |reference|
    ref_scale: float      # max |reference|
    first: str            # the first few values side by side, for failure messages

    def __str__(self):
        return (f"{self.name}: shape {self.shape}, max abs err {self.max_abs:.3g}, "
                f"max rel err {self.max_rel:.3g} (ref max |x| {self.ref_scale:.3g})")


def compare(actual, reference, name="output"):
    """Compare two arrays; raises AssertionError on shape mismatch, non-finite values or a
    reference that is (near) all zeros (a parity check against zeros proves nothing)."""
    a = np.asarray(actual, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if a.shape != r.shape:
        raise AssertionError(f"{name}: shape {a.shape} != reference shape {r.shape}")
    if not np.isfinite(r).all():
        raise AssertionError(f"{name}: the reference has {np.size(r) - np.isfinite(r).sum()} non-finite values")
    if not np.isfinite(a).all():
        raise AssertionError(f"{name}: npsd's output has {np.size(a) - np.isfinite(a).sum()} non-finite values")
    scale = float(np.abs(r).max()) if r.size else 0.0
    if scale < 1e-12:
        raise AssertionError(f"{name}: the reference is (near) all zeros (max |x| = {scale:.3g}); "
                             "the comparison would prove nothing")
    diff = np.abs(a - r)
    max_abs = float(diff.max())
    worst = int(diff.argmax())
    lo = max(0, worst - 2)
    fa, fr = a.ravel()[lo:lo + 5], r.ravel()[lo:lo + 5]
    first = (f"around flat index {worst}: npsd {np.array2string(fa, precision=6)} vs "
             f"reference {np.array2string(fr, precision=6)}; first values npsd "
             f"{np.array2string(a.ravel()[:4], precision=6)} vs reference {np.array2string(r.ravel()[:4], precision=6)}")
    return Comparison(name, a.shape, max_abs, max_abs / scale, scale, first)


def assert_close(actual, reference, rtol, name="output"):
    """Assert max|actual - reference| / max|reference| <= rtol; returns the Comparison."""
    c = compare(actual, reference, name)
    if not c.max_rel <= rtol:
        raise AssertionError(f"{c} exceeds the tolerance {rtol:g}; {c.first}")
    return c
