"""``python -m tests.tunnel._no_aioquic ARGS``: the CLI as if the optional aioquic
extra were not installed (the import is blocked), for the "--stack aioquic" test."""

from __future__ import annotations

import sys

sys.modules["aioquic"] = None  # type: ignore[assignment]  # import now fails, find_spec -> None

from quic_reverse.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
