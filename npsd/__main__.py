"""`python -m npsd ...`: the same command line as the `npsd` console script (npsd/cli.py)."""

import sys

from .cli import main

sys.exit(main())
