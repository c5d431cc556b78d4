"""``python -m ofmu``: the same command line as the ``ofmu`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
