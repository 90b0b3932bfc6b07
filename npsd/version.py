"""npsd's version (written once; npsd.__version__, the CLI's --version and the PNG parameters read it)."""

__version__ = "0.1.0"
