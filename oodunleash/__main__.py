"""``python -m oodunleash``: the ``oodunleash`` command line."""

import sys

from oodunleash.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
