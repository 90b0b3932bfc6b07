"""npsd.architecture: a design and its shapes describe each other, and random weights follow them.

(That the shapes are SD v1.5's own is checked against the real files' manifests in test_unet.py,
test_unet_memory.py, test_vae.py; the loader's use of them in test_loading.py.)
"""

import numpy as np
import pytest

from npsd import architecture as A
from npsd.params import flatten

TINY_UNET = A.UNetDesign(block_out_channels=(32, 64), layers_per_block=1, attention_levels=(True, False),
                         in_channels=9, cross_attention_dim=48, transformer_layers_per_block=2)
DESIGNS = [A.UNetDesign(), TINY_UNET, A.VAEDesign(), A.VAEDesign(block_out_channels=(32, 64), layers_per_block=1),
           A.TextEncoderDesign(), A.TextEncoderDesign(vocab_size=100, hidden_size=64, intermediate_size=256,
                                                      num_hidden_layers=3, max_position_embeddings=77)]
READ_WRITE = {A.UNetDesign: (A.unet_design, A.unet_shapes), A.VAEDesign: (A.vae_design, A.vae_shapes),
              A.TextEncoderDesign: (A.text_encoder_design, A.text_encoder_shapes)}


@pytest.mark.parametrize("design", DESIGNS, ids=repr)
def test_a_design_is_read_back_from_its_shapes(design):
    read, shapes = READ_WRITE[type(design)]
    assert read(shapes(design)) == design


def test_sd15_tensor_counts_and_context_width():
    assert (len(A.unet_shapes()), len(A.vae_shapes()), len(A.text_encoder_shapes())) == (686, 248, 196)
    assert A.context_width(A.unet_shapes()) == 768 and A.context_width(A.vae_shapes()) is None


def test_random_params_follow_the_shapes():
    shapes = A.unet_shapes(TINY_UNET)
    flat = flatten(A.random_params(shapes, np.random.default_rng(0)))
    assert {k: a.shape for k, a in flat.items()} == shapes
    assert all(a.dtype == np.float32 and np.isfinite(a).all() for a in flat.values())
    assert abs(flat["conv_norm_out.weight"].mean() - 1) < 0.1                  # norm weights 1 + 0.1 N(0, 1)
    w = flat["down_blocks.1.resnets.0.conv1.weight"]                           # N(0, 1/fan_in), fan_in 32*9
    assert abs(w.std() * np.sqrt(32 * 9) - 1) < 0.05
