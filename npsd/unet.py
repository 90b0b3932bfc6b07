"""UNet noise predictor (filled in by the UNet issue)."""


def unet(params, latents, t, context, config):
    raise NotImplementedError("the UNet is not implemented yet")
