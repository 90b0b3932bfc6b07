"""npsd.taesd against diffusers' AutoencoderTiny (default SD v1.x config) with the same perturbed
random weights, and the two file layouts TAESD ships in.

Tolerance: relative error (max abs difference / max |reference|) in float32; both sides sum in
float32 in different orders. RTOL below is one per comparison, about 10x the error measured on
both kernel paths (npsd/fast.py / the plain npsd/nn.py; pytest -s prints them). Real bugs give
errors of order 0.1 at the decoder's output, 40000x the tolerance: no tanh clamp of the latents
8.0e-2, the 2x upsampling done as tiling instead of repeating each pixel 1.1e-1 (test_sensitivity).
"""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny
from safetensors.numpy import save_file

from npsd import nn, taesd
from npsd.errors import CheckpointError, InputError
from npsd.params import flatten
from npsd.testing import assert_close
from tests.helpers import n2t, perturb_, t2n, to_numpy_params

RTOL = {
    "decode": 2e-6,    # measured 1.8e-7 (fast) / 1.8e-7 (plain); 16x16 latents -> 128x128, batch 2
    "encode": 4e-6,    # measured 4.3e-7 (fast) / 2.9e-7 (plain); 64x64 images -> 8x8 latents, batch 2
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return perturb_(AutoencoderTiny().eval(), seed=0)


@pytest.fixture(scope="module")
def params(model):
    return to_numpy_params(model.state_dict())


@pytest.fixture(scope="module")
def latents():
    # std 2, so that many values lie where 3 tanh(z / 3) differs from z (|z| > 1)
    return 2 * np.random.default_rng(0).standard_normal((2, 4, 16, 16), dtype=np.float32)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32)


def check(actual, reference, rtol, name):
    """assert_close, printing the measured error beside the tolerance (pytest -s shows it)."""
    c = assert_close(actual, reference, rtol, name)
    print(f"\n  {c}, tolerance {rtol:g}")
    return c


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
def test_decode_matches_diffusers(model, params, latents, fast):
    with torch.no_grad():
        ref = t2n(model.decode(n2t(latents)).sample)                       # [2, 3, 128, 128]
    with nn.fast(fast):
        out = taesd.decode(params, latents)
    assert out.shape == (2, 3, 128, 128) and out.dtype == np.float32
    check(out, ref, RTOL["decode"], "decode")


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
def test_encode_matches_diffusers(model, params, images, fast):
    with torch.no_grad():
        ref = t2n(model.encode(n2t(images)).latents)                       # [2, 4, 8, 8]
    with nn.fast(fast):
        out = taesd.encode(params, images)
    assert out.shape == (2, 4, 8, 8) and out.dtype == np.float32
    check(out, ref, RTOL["encode"], "encode")


def test_uint8_round_trip_matches_diffusers(model, latents):
    # AutoencoderTiny.forward stores latents as uint8 images: scale_latents, * 255, round
    z = n2t(latents)
    ref = model.scale_latents(z).mul(255).round().byte().numpy()
    q = taesd.to_uint8(latents)
    np.testing.assert_array_equal(q, ref)
    np.testing.assert_allclose(taesd.from_uint8(q), model.unscale_latents(torch.from_numpy(ref) / 255.0).numpy(),
                               rtol=0, atol=1e-6)


def test_other_design_matches_diffusers():
    # 16 latent channels (as TAESD3), 32 channels, 3 levels with 2 blocks: the kinds come from the weights
    torch.manual_seed(1)
    m = perturb_(AutoencoderTiny(encoder_block_out_channels=(32, 32, 32), decoder_block_out_channels=(32, 32, 32),
                                 num_encoder_blocks=(1, 2, 2), num_decoder_blocks=(2, 2, 1),
                                 latent_channels=16).eval(), seed=1)
    p = to_numpy_params(m.state_dict())
    rng = np.random.default_rng(2)
    z = 2 * rng.standard_normal((1, 16, 8, 8), dtype=np.float32)
    x = rng.uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        dec, enc = t2n(m.decode(n2t(z)).sample), t2n(m.encode(n2t(x)).latents)
    check(taesd.decode(p, z), dec, RTOL["decode"], "decode, other design")   # [1, 3, 32, 32]
    check(taesd.encode(p, x), enc, RTOL["encode"], "encode, other design")   # [1, 16, 8, 8]


def _conv_maker(rng):
    """conv(o, c): random params of a 3x3 conv from c to o channels."""
    return lambda o, c: {"weight": rng.standard_normal((o, c, 3, 3), dtype=np.float32) / np.float32(3 * c ** 0.5),
                         "bias": rng.standard_normal(o, dtype=np.float32)}


def _fast_and_plain(p, z):
    with nn.fast(True):
        fast = taesd.decode(p, z)
    with nn.fast(False):
        plain = taesd.decode(p, z)
    return fast, plain


def test_fast_decoder_takes_any_order_of_layers():
    """The fast decoder leaves an upsampling to the conv after it; an upsampling before a block or at
    the end (no TAESD ships one) is done on its own, and gives the plain decoder's result."""
    rng = np.random.default_rng(3)
    conv = _conv_maker(rng)
    block = {"conv": [conv(8, 8), None, conv(8, 8), None, conv(8, 8)]}
    p = {"decoder": {"layers": [conv(8, 4), None, block, None, block, None]}}   # conv, ReLU, block, up, block, up
    fast, plain = _fast_and_plain(p, 2 * rng.standard_normal((1, 4, 32, 32), dtype=np.float32))
    assert fast.shape == plain.shape == (1, 8, 128, 128)
    check(fast, plain, RTOL["decode"], "fast against plain, upsampling before a block and at the end")


def test_fast_decoder_block_with_a_skip():
    """A block that changes the channel count (a 1x1 skip; no TAESD decoder ships one) gives the plain
    decoder's result on split maps too."""
    rng = np.random.default_rng(5)
    conv = _conv_maker(rng)
    skip = {"weight": rng.standard_normal((12, 8, 1, 1), dtype=np.float32) / np.float32(8 ** 0.5)}
    block = {"conv": [conv(12, 8), None, conv(12, 12), None, conv(12, 12)], "skip": skip}
    p = {"decoder": {"layers": [conv(8, 4), None, block, None, conv(3, 12)]}}   # conv, ReLU, block, up, conv
    fast, plain = _fast_and_plain(p, 2 * rng.standard_normal((2, 4, 10, 6), dtype=np.float32))
    assert fast.shape == plain.shape == (2, 3, 20, 12)
    check(fast, plain, RTOL["decode"], "fast against plain, a block with a 1x1 skip")


@pytest.mark.parametrize("side", [(16, 16), (15, 17)], ids=["even", "odd"])
def test_fast_decoder_layouts(model, params, side, monkeypatch):
    """Latents of even height and width are decoded as split maps (fast.taesd_decoder_split), others
    by the channels-first kernels; both match diffusers (measured 1.8e-7 each)."""
    from npsd import fast as fast_kernels
    z = 2 * np.random.default_rng(4).standard_normal((1, 4) + side, dtype=np.float32)
    calls = []
    original = fast_kernels.taesd_decoder_split
    monkeypatch.setattr(fast_kernels, "taesd_decoder_split", lambda *a: calls.append(1) or original(*a))
    with torch.no_grad():
        ref = t2n(model.decode(n2t(z)).sample)
    with nn.fast(True):
        out = taesd.decode(params, z)
    assert len(calls) == (side[0] % 2 == 0 and side[1] % 2 == 0)
    check(out, ref, RTOL["decode"], f"decode, {side[0]}x{side[1]} latents")

def _tiling_upsample(x, size=None):
    return np.tile(x, (1, 1, 2, 2))                                        # the right size, the wrong pixels


def _upsample_split_a_column_off(s):
    """fast.upsample_split with the even padded columns taken from column i instead of i - 1."""
    from npsd import fast as fast_kernels
    x = fast_kernels.split_columns(s)
    up = fast_kernels.split_empty(2 * x.shape[0], 2 * x.shape[1], x.shape[2])
    for a in (0, 1):
        up[1 + a:-1:2, 0, 1:] = np.concatenate([x[:, 1:], x[:, -1:]], axis=1)
        up[1 + a:-1:2, 1, :-1] = x
    return up


@pytest.mark.parametrize("bug", ["no tanh clamp", "tiling upsample", "split upsampling a column off"])
def test_sensitivity(model, params, latents, bug, monkeypatch):
    from npsd import fast as fast_kernels
    with torch.no_grad():
        ref = t2n(model.decode(n2t(latents)).sample)
    if bug == "no tanh clamp":
        monkeypatch.setattr(taesd, "clamp", lambda z: z)
    elif bug == "tiling upsample":
        monkeypatch.setattr(taesd.nn, "upsample_nearest", _tiling_upsample)
    else:
        monkeypatch.setattr(fast_kernels, "upsample_split", _upsample_split_a_column_off)
    with nn.fast(bug.startswith("split")), pytest.raises(AssertionError, match="exceeds the tolerance"):
        assert_close(taesd.decode(params, latents), ref, RTOL["decode"], "decode")


# --- files ------------------------------------------------------------------------------------

def _state(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _write_original(model, folder):
    """madebyollin's two files, written from the diffusers state dict with the name mapping inverted."""
    halves = {"encoder": {}, "decoder": {}}
    for name, a in _state(model).items():
        half, original = taesd.diffusers_to_original(name)
        halves[half][original] = a
    for half, tensors in halves.items():
        save_file(tensors, str(folder / f"{taesd.ORIGINAL_FILES[half]}.safetensors"))
    return halves


def _same(a, b):
    fa, fb = flatten(a), flatten(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_original_names():
    assert taesd.diffusers_to_original("decoder.layers.0.weight") == ("decoder", "1.weight")
    assert taesd.diffusers_to_original("decoder.layers.2.conv.0.weight") == ("decoder", "3.conv.0.weight")
    assert taesd.diffusers_to_original("encoder.layers.1.conv.4.bias") == ("encoder", "1.conv.4.bias")
    assert taesd.original_to_diffusers("18.bias", "decoder") == "decoder.layers.17.bias"
    assert taesd.original_to_diffusers("encoder.conv_in.weight", "encoder") is None


def test_both_layouts_load_to_the_same_params(model, params, tmp_path):
    diffusers_dir, original_dir = tmp_path / "diffusers", tmp_path / "original"
    diffusers_dir.mkdir()
    original_dir.mkdir()
    save_file(_state(model), str(diffusers_dir / "diffusion_pytorch_model.safetensors"))
    halves = _write_original(model, original_dir)
    # the original decoder's Sequential starts with the parameterless Clamp: its first conv is "1"
    assert "1.weight" in halves["decoder"] and "0.weight" not in halves["decoder"]
    assert "0.weight" in halves["encoder"] and "3.conv.0.weight" in halves["encoder"]

    _same(taesd.load_taesd(diffusers_dir), params)
    _same(taesd.load_taesd(diffusers_dir / "diffusion_pytorch_model.safetensors"), params)
    _same(taesd.load_taesd(original_dir), params)
    _same(taesd.load_taesd(original_dir / "taesd_decoder.safetensors"), {"decoder": params["decoder"]})
    _same(taesd.load_taesd(original_dir / "taesd_encoder.safetensors"), {"encoder": params["encoder"]})


def test_fp16_file_loads_as_float32(model, params, tmp_path):
    save_file({k: v.astype(np.float16) for k, v in _state(model).items()}, str(tmp_path / "t.safetensors"))
    loaded = taesd.load_taesd(tmp_path / "t.safetensors")
    a = flatten(loaded)["decoder.layers.0.weight"]
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, params["decoder"]["layers"][0]["weight"].astype(np.float16).astype(np.float32))


def _one_line_error(path, match):
    with pytest.raises(CheckpointError, match=match) as e:
        taesd.load_taesd(path)
    assert "\n" not in str(e.value)


def test_bad_files(tmp_path):
    kl = tmp_path / "vae.safetensors"                                      # an AutoencoderKL, not a TAESD
    save_file({"encoder.conv_in.weight": np.zeros((128, 3, 3, 3), np.float32),
               "decoder.conv_out.bias": np.zeros(3, np.float32)}, str(kl))
    _one_line_error(kl, r"vae\.safetensors is not a TAESD checkpoint .*found decoder\.conv_out\.bias")
    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty))
    _one_line_error(empty, "is not a TAESD checkpoint")
    flat = tmp_path / "flat.safetensors"                                   # TAESD names, wrong shapes
    save_file({"decoder.layers.0.weight": np.zeros((64, 4), np.float32)}, str(flat))
    _one_line_error(flat, "not that of a conv")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    _one_line_error(text, "not a checkpoint")
    _one_line_error(tmp_path, "not a TAESD folder")


def test_bad_inputs(params):
    with pytest.raises(InputError, match=r"latents must be a non-empty array \[B, 4, H, W\]"):
        taesd.decode(params, np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(InputError, match="NaN"):
        taesd.encode(params, np.full((1, 3, 8, 8), np.nan, np.float32))
    with pytest.raises(CheckpointError, match="lack encoder.layers"):
        taesd.encode({"decoder": params["decoder"]}, np.zeros((1, 3, 8, 8), np.float32))


def test_decoder_shape_and_file(params, model, tmp_path):
    # what a pipeline checks before it lets TAESD decode its latents (npsd.previews.taesd_for)
    assert taesd.decoder_shape(params) == (4, 8)                       # SD v1.x's TAESD: 3 upsamplings
    m = AutoencoderTiny(decoder_block_out_channels=(32, 32, 32), num_decoder_blocks=(1, 1, 1), latent_channels=16)
    assert taesd.decoder_shape(to_numpy_params(m.state_dict())) == (16, 4)
    with pytest.raises(CheckpointError, match="lack decoder.layers"):
        taesd.decoder_shape({"encoder": params["encoder"]})
    # the file whose hash the PNG parameters record: the decoder's
    save_file(_state(model), str(tmp_path / "diffusion_pytorch_model.safetensors"))
    assert taesd.decoder_file(tmp_path) == str(tmp_path / "diffusion_pytorch_model.safetensors")
    original = tmp_path / "original"
    original.mkdir()
    _write_original(model, original)
    assert taesd.decoder_file(original) == str(original / "taesd_decoder.safetensors")
    assert taesd.decoder_file(original / "taesd_decoder.safetensors") == str(original / "taesd_decoder.safetensors")
