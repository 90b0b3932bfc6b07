"""npsd: Stable Diffusion v1.x inference in NumPy."""

from .errors import CheckpointError, InputError, NpsdError
from .pipeline import Pipeline
from .loading import load

__version__ = "0.1.0"
__all__ = ["Pipeline", "load", "NpsdError", "CheckpointError", "InputError", "__version__"]
