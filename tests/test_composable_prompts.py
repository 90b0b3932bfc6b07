"""A1111's AND (composable diffusion, Liu et al. 2022) and its "Negative Guidance minimum sigma" in
npsd's pipelines, against an A1111 run.

The reference is A1111's procedure written out in torch, as its files do it: the parts of each prompt
(modules/prompt_parser.py, get_multicond_prompt_list; its parser is compared with npsd's in
tests/test_prompts.py) each encoded on its own; their contexts brought to one length by repeating
the last token's vector (reconstruct_multicond_batch) and padded against the negative prompt with the
empty prompt's chunk (CFGDenoiser with "Pad prompt/negative prompt", which npsd does for every A1111
prompt: npsd/prompts.py pad_chunks); the UNet batch [each image once per part, then each image's
uncond] and the denoised latents combined as CFGDenoiser.combine_denoised does,

    denoised_b = uncond_b + sum_j (cond_j - uncond_b) * (w_j * scale);

k-diffusion's CompVisDenoiser and sampler functions around diffusers' tiny random UNet, with A1111's
sigmas and the image's torch generator (tests/test_a1111_pipeline.py's run, which this extends).
Contexts: diffusers' ``encode_prompt`` of each 75-token chunk (A1111's own handling gives the same
numbers for text without brackets; BREAK splits a part into two such chunks).

TOL_IMAGE = 2e-5 relative (images in [0, 1]), as tests/test_a1111_pipeline.py; measured 6.6e-7 to
6.1e-6 (the output prints each). The same A1111 runs with every weight 1 are 2.5e-3 (CFG scale 1) to
6.8e-2 away, with the parts padded with the empty prompt instead of their last token 4.0e-2, with two
images' parts swapped in the batch 5.9e-2; npsd made wrong in the same three ways fails the same cases.
"""

import itertools

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

from npsd import guidance
from npsd.errors import InputError
from npsd.testing import assert_close
from tests.test_a1111_pipeline import FUNCTIONS, ANCESTRAL, _LDM
from tests.test_kdiffusion import a1111_sampler_sigmas, kd  # noqa: F401 - the fixture
from tests.test_pipelines import SCHED, SIZE, models, npsd_pipe, reference  # noqa: F401

TOL_IMAGE = 2e-5
NEGATIVE = "blurry"


def a1111_parts(prompt):
    """get_multicond_prompt_list for one prompt (tests/test_prompts.py's a1111_multicond)."""
    from tests.test_prompts import a1111_multicond
    return a1111_multicond(prompt)


def a1111_and_run(kd, models, prompts, seeds, sampler="euler_a", schedule_type="automatic", steps=5,  # noqa: F811
                  scale=7.5, flat_weights=False, pad_with_empty=False, swap=False, s_min_uncond=0.0):
    """A1111's txt2img of len(prompts) images (one seed each) -> images [B, H, W, 3] in [0, 1].
    The flags make the reference wrong on purpose (the module docstring's far-away runs).
    s_min_uncond: A1111's "Negative Guidance minimum sigma" (CFGDenoiser.forward: on odd calls below
    it, no uncond rows; each image's first part stands in for its uncond, combined at scale 1)."""
    ref = reference(StableDiffusionPipeline, models, EulerDiscreteScheduler(**SCHED))
    vae, scaling = models["vae"], ref.vae.config.scaling_factor
    with torch.no_grad():
        def encode(text):                        # [1, 77 k, D]: each BREAK chunk on its own
            return torch.cat([ref.encode_prompt(c, "cpu", 1, False)[0] for c in text.split(" BREAK ")], dim=1)

        empty = encode("")
        uncond = encode(NEGATIVE)
        conds_list, tensors = [], []
        for p in prompts:                        # reconstruct_multicond_batch
            conds_list.append([])
            for text, weight in a1111_parts(p):
                conds_list[-1].append((len(tensors), 1.0 if flat_weights else weight))
                tensors.append(encode(text)[0])
        tokens = max(t.shape[0] for t in tensors)
        for i, t in enumerate(tensors):
            if t.shape[0] != tokens:
                fill = empty[0] if pad_with_empty else t[-1:].repeat(tokens - t.shape[0], 1)
                tensors[i] = torch.vstack([t, fill[:tokens - t.shape[0]]])
        tensor = torch.stack(tensors)
        if swap:
            tensor = torch.cat([tensor[len(conds_list[0]):], tensor[:len(conds_list[0])]])
        repeats = (tensor.shape[1] - uncond.shape[1]) // empty.shape[1]             # pad_cond, both ways
        uncond = torch.cat([uncond] + [empty] * repeats, dim=1).expand(len(prompts), -1, -1)
        den = kd.external.CompVisDenoiser(_LDM(models["unet4"], ref.scheduler.alphas_cumprod.float()))

        calls = itertools.count()

        def cfg_denoiser(x, sigma, **_):         # CFGDenoiser.forward and combine_denoised
            step = next(calls)
            skip_uncond = bool(step % 2 and s_min_uncond > 0 and sigma[0] < s_min_uncond)
            n = [len(c) for c in conds_list]
            x_in = torch.cat([torch.stack([x[i]] * k) for i, k in enumerate(n)] + [x])
            sigma_in = torch.cat([torch.stack([sigma[i]] * k) for i, k in enumerate(n)] + [sigma])
            if skip_uncond:
                x_out = den(x_in[:-len(x)], sigma_in[:-len(x)], cond=tensor)
                x_out = torch.cat([x_out, torch.cat([x_out[c[0][0]:c[0][0] + 1] for c in conds_list])])
            else:
                x_out = den(x_in, sigma_in, cond=torch.cat([tensor, uncond]))
            cond_scale = 1.0 if skip_uncond else scale
            denoised_uncond = x_out[-uncond.shape[0]:]
            denoised = torch.clone(denoised_uncond)
            for i, conds in enumerate(conds_list):
                for cond_index, weight in conds:
                    denoised[i] += (x_out[cond_index] - denoised_uncond[i]) * (weight * cond_scale)
            return denoised

        sigmas = torch.from_numpy(np.asarray(a1111_sampler_sigmas(kd, sampler, schedule_type, steps), np.float32))
        shape = (1, 4, SIZE // 2, SIZE // 2)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        x = torch.cat([torch.randn(shape, generator=g) for g in gens]) * sigmas[0]
        kw = {}
        if sampler in ANCESTRAL:
            kw["noise_sampler"] = lambda sigma, sigma_next: torch.cat([torch.randn(shape, generator=g) for g in gens])
        x = getattr(kd.sampling, FUNCTIONS[sampler])(cfg_denoiser, x, sigmas, disable=True, **kw)
        image = vae.decode(x / scaling).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def npsd_and_run(models, prompts, seeds, sampler="euler_a", schedule_type="automatic", steps=5, scale=7.5,  # noqa: F811
                 **options):
    pipe = npsd_pipe(models)
    return pipe.txt2img(prompts, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=scale,
                        height=SIZE, width=SIZE, seed=list(seeds), rng="torch", sampler=sampler,
                        schedule_type=schedule_type, output_type="np", prompt_syntax="a1111", **options)


CASES = {  # name: (prompts, seeds, sampler, scale)
    "two parts, one weighted": (["a red circle AND a blue square :0.7"], [42], "euler_a", 7.5),
    "a negative weight, DPM++ 2M": (["a red circle AND a blue square:-0.4 AND a green field:.5"], [3], "dpmpp_2m", 7.5),
    "one part with a weight": (["a red circle:1.6"], [5], "euler", 7.5),
    "CFG scale 1": (["a red circle AND a blue square :0.7"], [42], "euler_a", 1.0),
    "a batch: 3 parts and 1": (["a red circle AND a blue square:0.6 AND a tree", "a green field"], [11, 12],
                               "euler_a", 7.5),
    "parts of 2 chunks and 1": (["a red circle BREAK on a blue background AND a green square:0.8"], [9], "euler_a", 7.5),
}


@pytest.mark.parametrize("case", CASES)
def test_and_equals_an_a1111_run(kd, models, case):  # noqa: F811
    prompts, seeds, sampler, scale = CASES[case]
    ours = npsd_and_run(models, prompts, seeds, sampler, scale=scale)
    ref = a1111_and_run(kd, models, prompts, seeds, sampler, scale=scale)
    print(assert_close(ours, ref, TOL_IMAGE, f"{case} vs A1111"))
    flat = a1111_and_run(kd, models, prompts, seeds, sampler, scale=scale, flat_weights=True)
    with pytest.raises(AssertionError, match="exceeds the tolerance") as caught:
        assert_close(ours, flat, TOL_IMAGE, "every weight 1")
    print(str(caught.value)[:80])


def test_the_wrong_padding_or_order_fails(kd, models):  # noqa: F811
    """The two details the reference gets right on purpose, each made wrong, fail the tolerance."""
    prompts, seeds, sampler, _ = CASES["parts of 2 chunks and 1"]
    ours = npsd_and_run(models, prompts, seeds, sampler)
    with pytest.raises(AssertionError, match="exceeds the tolerance") as caught:
        assert_close(ours, a1111_and_run(kd, models, prompts, seeds, sampler, pad_with_empty=True), TOL_IMAGE,
                     "parts padded with the empty prompt")
    print(str(caught.value)[:90])
    prompts, seeds, sampler, _ = CASES["a batch: 3 parts and 1"]
    ours = npsd_and_run(models, prompts, seeds, sampler)
    with pytest.raises(AssertionError, match="exceeds the tolerance") as caught:
        assert_close(ours, a1111_and_run(kd, models, prompts, seeds, sampler, swap=True), TOL_IMAGE, "parts swapped")
    print(str(caught.value)[:90])


def test_guided_model_with_weights_calls_the_unet_as_written():
    """guided_model's AND path on a fake UNet that reads x, t and the context: one batch
    [uncond, each image once per part], combined as composable_cfg says (written out here)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    parts = rng.standard_normal((4, 5, 8)).astype(np.float32)             # image 0: 3 parts, image 1: 1
    uncond = rng.standard_normal((2, 5, 8)).astype(np.float32)
    weights = [[1.0, 0.5, -0.3], [0.8]]
    calls = []

    def unet(xb, t, context):
        calls.append(len(xb))
        return np.tanh(xb * 0.7 + context.mean(axis=(1, 2))[:, None, None, None] + t / 1000).astype(np.float32)

    out = guidance.guided_model(unet, parts, uncond, 4.0, weights=weights)(x, 500)
    u = unet(x, 500, uncond)
    expected = u.copy()
    expected[0] += sum(w * 4.0 * (unet(x[:1], 500, parts[j:j + 1])[0] - u[0]) for j, w in enumerate(weights[0]))
    expected[1] += 0.8 * 4.0 * (unet(x[1:], 500, parts[3:4])[0] - u[1])
    assert calls[0] == 6                                                  # one batch: 2 uncond + 4 parts
    np.testing.assert_allclose(out, expected, atol=1e-5)
    with pytest.raises(InputError, match="guidance_rescale .* AND"):
        guidance.guided_model(unet, parts, uncond, 4.0, 0.7, weights=weights)


def test_and_in_plain_syntax_is_a_word_and_errors_are_one_line(models):  # noqa: F811
    pipe = npsd_pipe(models)
    kw = dict(num_inference_steps=2, height=SIZE, width=SIZE, seed=1, output_type="latent")
    plain = pipe.txt2img("a cat AND a dog:0.5", **kw)                     # diffusers: text
    a1111 = pipe.txt2img("a cat AND a dog:0.5", prompt_syntax="a1111", **kw)
    assert np.abs(plain - a1111).max() > 1e-2
    # a plain prompt in A1111's syntax runs as before: no parts, no weights
    assert np.array_equal(pipe.txt2img("a cat", **kw), pipe.txt2img("a cat  ", prompt_syntax="a1111", **kw))
    from npsd.attention_maps import AttentionMaps
    with pytest.raises(InputError, match="AND") as caught:
        pipe.txt2img("a cat AND a dog", prompt_syntax="a1111", attention_maps=AttentionMaps(), **kw)
    assert "\n" not in str(caught.value)


NGMS_CASES = {  # name: (prompts, sampler, steps, s_min_uncond)
    "one prompt, Euler a": (["a red circle on a blue background"], "euler_a", 6, 3.0),
    "AND, DPM++ 2M": (["a red circle AND a blue square :0.7"], "dpmpp_2m", 6, 2.0),
    "Heun: two calls a step": (["a red circle on a blue background"], "heun", 4, 5.0),
}


@pytest.mark.parametrize("case", NGMS_CASES)
def test_negative_guidance_min_sigma_equals_a1111s(kd, models, case):  # noqa: F811
    """A1111's "Negative Guidance minimum sigma" (NGMS, s_min_uncond): every odd model call below it
    runs without the unconditional rows (CFGDenoiser counts its calls, Heun's two a step). Against the
    reference's CFGDenoiser: measured 1.1e-6 to 1.6e-6, TOL_IMAGE; the same runs without NGMS are
    1.3e-3 to 3.2e-2 away, and npsd skipping the even calls instead fails (checked by hand: 1.1e-3 to
    2.6e-2)."""
    prompts, sampler, steps, s_min = NGMS_CASES[case]
    ours = npsd_and_run(models, prompts, [13], sampler, steps=steps, negative_guidance_min_sigma=s_min)
    ref = a1111_and_run(kd, models, prompts, [13], sampler, steps=steps, s_min_uncond=s_min)
    print(assert_close(ours, ref, TOL_IMAGE, f"NGMS {s_min}, {case} vs A1111"))
    with pytest.raises(AssertionError, match="exceeds the tolerance") as caught:
        assert_close(ours, a1111_and_run(kd, models, prompts, [13], sampler, steps=steps), TOL_IMAGE, "without NGMS")
    print(str(caught.value)[:80])
