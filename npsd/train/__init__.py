"""Training and evaluation of the built-in model (weights/npsd-tiny.safetensors).

Not imported by `import npsd`. `data` and `evaluate` use NumPy/Pillow only; `builtin` needs torch,
diffusers and transformers (`pip install .[train]`):

    python -m npsd.train.builtin      # data -> VAE -> latents -> UNet + text encoder -> export
    python -m npsd.train.evaluate     # held-out prompts through the NumPy pipeline
"""
