"""`python -m tfgcvit ...`: the same as the `tfgcvit` command."""

import sys

from tfgcvit.cli import main

if __name__ == "__main__":
    sys.exit(main())
