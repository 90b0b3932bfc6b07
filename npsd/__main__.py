"""`python -m npsd ...`: the same command line as the `npsd` console script (npsd/cli.py)."""

import sys

from .cli import main

if __name__ == "__main__":                          # not on a plain import (tests import every module)
    sys.exit(main())
