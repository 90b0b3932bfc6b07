"""Per-token cross-attention maps (npsd/attention_maps.py, DAAM) against the same aggregation computed
from diffusers' attention probabilities, on the tiny models of tests/test_pipelines.py.

The tiny UNet has cross-attention at 16 x 16 (down block 0, up block 1's two) and 8 x 8 (the mid block),
so the bicubic upsampling is exercised. Tolerances are ~10x the measured error (max |npsd - diffusers|
/ max |diffusers|), both stated beside them.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor

import npsd
from npsd import unet as unet_model
from npsd.attention_maps import AttentionMaps
from npsd.testing import assert_close
from tests.helpers import n2t
from tests.test_pipelines import NEGATIVE, PROMPT, SIZE, models, npsd_pipe, reference, scheduler_for  # noqa: F401

PROMPTS = [PROMPT, "a green square"]
LATENT = SIZE // 2                        # the tiny VAE halves: 16 x 16 latents


class RecordingProcessor(AttnProcessor):
    """diffusers' plain attention, plus DAAM's aggregation of the conditional half's probabilities."""

    def __init__(self, sink):
        super().__init__()
        self.sink = sink

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        with torch.no_grad():
            query = attn.head_to_batch_dim(attn.to_q(hidden_states))                    # [B*heads, N, d]
            key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))              # [B*heads, L, d]
            probs = attn.get_attention_scores(query, key, None)                         # [B*heads, N, L]
            b2, n, length = hidden_states.shape[0], probs.shape[1], probs.shape[2]
            probs = probs.reshape(b2, attn.heads, n, length)[b2 // 2:]                  # cond half
            side = int(round(n ** 0.5))
            maps = probs.sum(1).permute(0, 2, 1).reshape(b2 // 2, length, side, side)  # [B, L, h_l, w_l]
            maps = F.interpolate(maps, size=(LATENT, LATENT), mode="bicubic", align_corners=False).clamp(min=0)
            self.sink["sum"] = self.sink.get("sum", 0) + maps.double()
            self.sink["layers"] = self.sink.get("layers", 0) + 1
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def diffusers_maps(models, latents, steps=3):
    unet = models["unet4"]
    sink, original = {}, dict(unet.attn_processors)
    unet.set_attn_processor({name: RecordingProcessor(sink) if ".attn2." in name else proc
                             for name, proc in original.items()})
    try:
        reference(StableDiffusionPipeline, models, scheduler_for("ddim"))(
            PROMPTS, negative_prompt=[NEGATIVE, ""], num_inference_steps=steps, guidance_scale=7.5,
            height=SIZE, width=SIZE, latents=n2t(latents), output_type="latent")
    finally:
        unet.set_attn_processor(original)
    return sink["sum"].float().numpy(), sink["layers"]


def run(pipe, latents, maps=None, guidance=7.5, **kw):
    return pipe.txt2img(PROMPTS, negative_prompt=[NEGATIVE, ""], num_inference_steps=3, guidance_scale=guidance,
                        height=SIZE, width=SIZE, sampler="ddim", latents=latents, output_type="np",
                        attention_maps=maps, **kw)


@pytest.fixture(scope="module")
def latents():
    return np.random.default_rng(7).standard_normal((2, 4, LATENT, LATENT)).astype(np.float32)


def test_token_maps_match_diffusers(models, latents):
    ref, layers = diffusers_maps(models, latents)
    maps = AttentionMaps()
    run(npsd_pipe(models), latents, maps)
    ours = maps.token_maps()
    assert ours.shape == (2, 77, LATENT, LATENT) and ours.dtype == np.float32
    assert maps.layers_added == layers == 4 * 3          # 4 cross-attention layers x 3 steps
    assert maps.steps_added == {0, 1, 2}
    # measured 4.1e-7 of the maximum, fast and plain nn alike (diffusers sums in float64 here, npsd in float32)
    print(assert_close(ours, ref, 3e-6, "token maps vs diffusers"))


def test_images_bit_identical_with_and_without_collector(models, latents):
    pipe = npsd_pipe(models)
    for guidance in (7.5, 1.0):                          # batch [uncond, cond], and cond only
        plain = run(pipe, latents, guidance=guidance)
        maps = AttentionMaps()
        watched = run(pipe, latents, maps, guidance=guidance)
        assert np.array_equal(plain, watched)
        assert maps.token_maps().shape == (2, 77, LATENT, LATENT)
    assert unet_model._collector is None                  # switched off after the call


def test_steps_and_resolutions_select_and_add_up(models, latents):
    pipe = npsd_pipe(models)
    everything, first, rest, fine, coarse = (AttentionMaps(), AttentionMaps(steps=[0]), AttentionMaps(steps={1, 2}),
                                             AttentionMaps(resolutions=[16]), AttentionMaps(resolutions=[(8, 8)]))
    for maps in (everything, first, rest, fine, coarse):
        run(pipe, latents, maps)
    assert first.steps_added == {0} and rest.steps_added == {1, 2}
    assert (fine.layers_added, coarse.layers_added) == (9, 3)
    total = everything.token_maps()
    assert_close(first.token_maps() + rest.token_maps(), total, 1e-6, "steps {0} + {1, 2}")
    assert_close(fine.token_maps() + coarse.token_maps(), total, 1e-6, "16x16 + 8x8 layers")


def test_memory_is_one_running_sum(models, latents):
    maps = AttentionMaps()
    run(npsd_pipe(models), latents, maps)
    arrays = [v for v in vars(maps).values() if isinstance(v, np.ndarray)]
    assert [a.shape for a in arrays] == [(2, 77, LATENT, LATENT)]     # the sum; no per-step or per-layer map
    assert not any(isinstance(v, (list, dict)) and len(v) for v in vars(maps).values())


def test_tokens_and_words(models, latents):
    pipe = npsd_pipe(models)
    prompt = "a photorealistic red circle"                 # photorealistic = photo + realistic</w>
    maps = AttentionMaps()
    pipe.txt2img([prompt, prompt], num_inference_steps=2, guidance_scale=7.5, height=SIZE, width=SIZE,
                 sampler="ddim", latents=latents, output_type="latent", attention_maps=maps)
    tokens = maps.tokens(pipe, prompt)
    assert tokens == ["<|startoftext|>", "a</w>", "photo", "realistic</w>", "red</w>", "circle</w>", "<|endoftext|>"]
    words = maps.word_maps(pipe, prompt)
    assert list(words) == ["a", "photorealistic", "red", "circle"]
    t = maps.token_maps()
    assert words["photorealistic"].shape == (2, LATENT, LATENT)
    assert np.array_equal(words["photorealistic"], t[:, 2] + t[:, 3])
    assert np.array_equal(words["circle"], t[:, 5])


def test_no_maps_without_a_generation():
    with pytest.raises(npsd.InputError, match="no attention maps"):
        AttentionMaps().token_maps()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_builtin_model_circle_map_follows_the_circle(seed):
    """The built-in model (npsd.load(), 64 x 64 images, 16 x 16 latents), its default sampler and steps.

    Measured on seeds 0-5: the "circle" map's peak lies 0.9-2.1 latent pixels from the centre of the
    drawn red disc; the map correlates with the disc's mask 0.900-0.909, the "background" map
    0.877-0.896 (raw sums: every word's map is largest on the disc, so the margin is small); divided
    by the sum of the words' maps (DAAM-style normalisation per pixel), 0.889-0.916 vs 0.680-0.753.
    """
    pipe = npsd.load()
    prompt = "a red circle on a blue background"
    maps = AttentionMaps()
    image = pipe.txt2img(prompt, seed=seed, output_type="np", attention_maps=maps)[0]   # [H, W, 3]
    words = maps.word_maps(pipe, prompt)
    circle, background = words["circle"][0], words["background"][0]                    # [h, w]
    total = sum(m[0] for m in words.values())                                          # [h, w]
    h, w = circle.shape
    f = image.shape[0] // h
    small = image.reshape(h, f, w, f, 3).mean(axis=(1, 3))                             # [h, w, 3]
    red = (small[..., 0] > 0.5) & (small[..., 2] < 0.5)                                # the drawn disc

    def corr(m):
        return np.corrcoef(m.ravel(), red.ravel())[0, 1]
    peak = np.array(np.unravel_index(np.argmax(circle), circle.shape))
    centre = np.argwhere(red).mean(axis=0)
    print(f"seed {seed}: disc of {red.sum()} latent pixels at {centre.round(1)}, circle map peak {peak}; "
          f"corr circle {corr(circle):.3f} background {corr(background):.3f}; normalised "
          f"{corr(circle / total):.3f} vs {corr(background / total):.3f}")
    assert np.linalg.norm(peak - centre) < 3
    assert corr(circle) > corr(background)
    assert corr(circle / total) > corr(background / total) + 0.1


def test_cli_attention_maps_writes_one_overlay_per_word_and_a_grid(tmp_path, capsys):
    from npsd import cli
    out, folder = tmp_path / "a.png", tmp_path / "maps"
    capsys.readouterr()
    rc = cli.main(["txt2img", "a red circle on a blue background", "--seed", "1", "--steps", "3", "-o", str(out),
                   "--quiet", "--attention-maps", str(folder)])
    err = capsys.readouterr().err
    assert rc == 0, err
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["01-a.png", "02-red.png", "03-circle.png", "04-on.png", "05-blue.png", "06-background.png",
                     "grid.png"]
    from PIL import Image
    assert Image.open(folder / "03-circle.png").size == Image.open(out).size
    rc = cli.main(["txt2img", "a (red:1.2) circle", "--steps", "1", "-o", str(tmp_path / "b.png"), "--quiet",
                   "--attention-maps", str(tmp_path / "m2")])
    assert rc == 2 and "--attention-maps needs a prompt without A1111 syntax" in capsys.readouterr().err
