"""KL autoencoder (filled in by the VAE issue)."""


def encode(params, images, config):
    raise NotImplementedError("the VAE encoder is not implemented yet")


def decode(params, latents, config, tile_size=None):
    raise NotImplementedError("the VAE decoder is not implemented yet")
