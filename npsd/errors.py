"""npsd's own errors. Every message is one line that says what is wrong and what to do."""


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
