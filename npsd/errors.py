"""npsd's own errors. Every message is one line that says what is wrong and what to do."""

import numpy as np


class NpsdError(Exception):
    """Base class of every error npsd raises on purpose."""


class CheckpointError(NpsdError):
    """A model file or folder cannot be used (missing, corrupt, unsafe, wrong architecture)."""


class InputError(NpsdError, ValueError):
    """A parameter or input image is not acceptable."""


class UsageError(InputError):
    """Bad command-line usage (the command line, npsd/cli.py, exits with code 2)."""


class TruncationWarning(UserWarning):
    """A prompt was longer than CLIP's context; the message says how many tokens were dropped."""


def one_line(e):
    """An exception (or warning) as one line of text, for the command line's and the server's messages."""
    text = " ".join(str(e).split("\n")).strip()
    return text or type(e).__name__


def is_whole(v):
    """A whole number given as one: a Python or NumPy integer, not a bool (Python's True is an int 1)."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def is_number(v):
    """A real number: a Python or NumPy integer or float, not a bool."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def is_flag(v):
    """True or False (NumPy's too), not a truthy value such as "no" or 1."""
    return isinstance(v, (bool, np.bool_))
