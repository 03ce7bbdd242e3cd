"""`python -m server [flags]` is `jaxserve serve [flags]`."""

from __future__ import annotations

import sys

from jaxserve.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
