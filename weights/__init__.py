"""Files that ship with npsd (installed as the package npsd.weights)."""

from importlib.resources import files


def path(name):
    """Path of a shipped file, e.g. path("vocab.json")."""
    return files(__name__) / name
