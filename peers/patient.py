"""The patient's side of a consultation: `python -m peers.patient --help`."""

from __future__ import annotations

import sys

from peers.cli import main

if __name__ == "__main__":
    sys.exit(main("patient"))
