"""Fixtures of the live interop tests: the Rust binaries (built once) and the peers.

``rust_ref`` builds the Rust reference crate's binaries once per machine (cached
outside the checkout, see :mod:`tests.interop.rustref`) the first time a test needs
them; when that is impossible (no apt, no cargo, a compile error) every interop test
fails with the reason and the end of the build log -- it never skips.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.timing import MS

from ._peers import Peers
from .rustref import BUILD_TIMEOUT, RustRef, RustRefUnavailable, ensure_built

#: The first interop test of a run may build the binaries (about 2 min from scratch,
#: more on a loaded machine): its time limit covers that plus the test itself.
TEST_TIMEOUT = (BUILD_TIMEOUT * 1_000 + 120_000) * MS


@pytest.fixture(scope="session")
def rust_ref() -> RustRef:
    """The Rust reference binaries, built (or found in the cache) once per session."""
    try:
        return ensure_built(timeout=BUILD_TIMEOUT * 1_000 * MS)
    except RustRefUnavailable as exc:
        reason = str(exc)
    pytest.fail(f"the Rust reference peers are unavailable: {reason}", pytrace=False)


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[Peers]:
    """Start peer processes (private TMPDIR); every one still running is stopped after."""
    started = Peers(tmp_path)
    try:
        yield started
    finally:
        started.stop_all()
