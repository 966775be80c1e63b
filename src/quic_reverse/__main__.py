"""``python -m quic_reverse``: the same as the ``quic-reverse`` console script."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
