"""Float32 error of Winograd's F(2x2, 3x3) and F(4x4, 3x3) against an exact (float64) convolution.

    python -m benchmarks.winograd_error [--channels 320] [--size 24]

Both algorithms are written here as plain matrix formulas (Lavin & Gray 2016, sec. 4), evaluated
once in float64 (which must agree with the direct convolution to rounding: a check of the matrices)
and once in float32; the float32 error is what decides whether a variant holds npsd's per-layer
tolerance (1e-5 relative). npsd's fast path uses F(2x2, 3x3); docs/speed.md gives the numbers.
"""

import argparse

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

F2 = dict(m=2,
          BT=[[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
          G=[[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
          AT=[[1, 1, 1, 0], [0, 1, -1, -1]])
F4 = dict(m=4,
          BT=[[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
              [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
          G=[[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
             [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
          AT=[[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]])


def direct(x, w):
    """Valid 3x3 convolution of x [C, H, W] with w [O, C, 3, 3] -> [O, H-2, W-2]."""
    return np.einsum("chwkl,ockl->ohw", sliding_window_view(x, (3, 3), axis=(1, 2)), w)


def winograd(x, w, m, BT, G, AT, dtype):
    """The same convolution by F(m x m, 3x3), every step in `dtype`; (H-2) and (W-2) divisible by m."""
    BT, G, AT = (np.array(a, dtype) for a in (BT, G, AT))
    x, w = x.astype(dtype), w.astype(dtype)
    c, h, wd = x.shape
    a, th, tw = m + 2, (h - 2) // m, (wd - 2) // m
    tiles = sliding_window_view(x, (a, a), axis=(1, 2))[:, ::m, ::m][:, :th, :tw]       # [C, th, tw, a, a]
    u = np.einsum("ik,ockl,jl->ijoc", G, w, G)                                          # G g G^T
    v = np.einsum("ik,ctukl,jl->ijctu", BT, tiles, BT)                                  # B^T d B
    mm = np.einsum("ijoc,ijctu->ijotu", u, v)                                           # sum over channels
    y = np.einsum("ik,kjotu,lj->otiul", AT, mm, AT)                                     # A^T M A: [O, th, m, tw, m]
    return y.reshape(w.shape[0], th * m, tw * m)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--channels", type=int, default=320)
    ap.add_argument("--out-channels", type=int, default=64)
    ap.add_argument("--size", type=int, default=24, help="output side (a multiple of 4)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    c, o, s = args.channels, args.out_channels, args.size
    x = rng.standard_normal((c, s + 2, s + 2))
    w = rng.standard_normal((o, c, 3, 3)) / np.sqrt(9 * c)
    exact = direct(x, w)
    scale = np.abs(exact).max()
    print(f"3x3 convolution, {c} -> {o} channels, {s}x{s} outputs; relative error max|y - exact| / max|exact|")
    print(f"  direct, float32:      {np.abs(direct(x.astype(np.float32), w.astype(np.float32)) - exact).max() / scale:.1e}")
    for name, f in (("F(2x2, 3x3)", F2), ("F(4x4, 3x3)", F4)):
        check = np.abs(winograd(x, w, dtype=np.float64, **f) - exact).max() / scale
        err = np.abs(winograd(x, w, dtype=np.float32, **f) - exact).max() / scale
        assert check < 1e-12, f"{name}: the matrices are wrong ({check:.1e} in float64)"
        print(f"  {name}, float32: {err:.1e}   (float64: {check:.0e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
