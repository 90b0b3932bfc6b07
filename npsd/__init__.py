"""npsd: Stable Diffusion v1.x inference in NumPy."""

from . import malloc  # noqa: F401  (keeps freed memory for the next array: npsd/malloc.py)
from .errors import CheckpointError, InputError, NpsdError
from .pipeline import Pipeline
from .loading import load
from .version import __version__

__all__ = ["Pipeline", "load", "NpsdError", "CheckpointError", "InputError", "__version__"]
