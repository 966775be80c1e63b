"""A CA and a leaf it signed, for tests that need a real chain (not a pinned self-signed
certificate): made by the same code as ``quic-reverse cert``."""

from __future__ import annotations

from pathlib import Path

from quic_reverse.tunnel.certs import issue_relay_certificate


def ca_and_leaf(directory: Path) -> tuple[Path, Path, Path]:
    """``(ca, leaf, leaf_key)`` PEM files in ``directory``: the leaf is for ``localhost``
    and ``127.0.0.1``, valid one day, signed by a fresh CA."""
    issued = issue_relay_certificate(directory, ["localhost"], ["127.0.0.1"], days=1)
    return issued.ca_cert, issued.cert, issued.key
