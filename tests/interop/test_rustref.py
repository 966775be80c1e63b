"""The build cache of the Rust peers (:mod:`tests.interop.rustref`), on a stand-in build.

A fake ``rust-ref`` directory whose ``build.sh`` writes the six binaries as tiny shell
scripts (and counts its runs) exercises the cache for real -- processes, the lock file,
the build log -- in milliseconds and without Rust: built once, found afterwards,
rebuilt when an input changes, built once for two processes at the same time, and a
failed build reported with its reason.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tests.support.timing import LONG

from ._peers import Peers
from .rustref import BINARIES, RustRefUnavailable, ensure_built, find_built, source_digest

pytestmark = pytest.mark.subprocess

FAKE_BUILD = """#!/bin/bash
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
echo "fake build into $1"
echo run >> "$here/runs"
# Hold the build open until the test releases it (bounded: 20 s at most).
if [ -e "$here/hold" ]; then
  touch "$here/started"
  for _ in $(seq 200); do [ -e "$here/release" ] && break; sleep 0.1; done
fi
mkdir -p "$1/bin"
for b in relay edge basic interop bench vectors; do
  printf '#!/bin/sh\\necho %s\\n' "$b" > "$1/bin/$b"; chmod +x "$1/bin/$b"
done
"""


@pytest.fixture
def ref(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in rust-ref directory, and a private cache root."""
    directory = tmp_path / "rust-ref"
    (directory / "overlay").mkdir(parents=True)
    (directory / "build.sh").write_text(FAKE_BUILD)
    (directory / "port.patch").write_text("--- a\n+++ b\n")
    (directory / "quic-reverse-0000000.tar.gz").write_bytes(b"not really a tarball")
    (directory / "overlay" / "interop.rs").write_text("fn main() {}\n")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("QUIC_REVERSE_RUST_REF", str(directory))
    return directory


def runs(ref: Path) -> int:
    path = ref / "runs"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_built_once_then_found(ref: Path, tmp_path: Path) -> None:
    assert find_built() is None
    first = ensure_built(timeout=LONG)
    assert first.built_in is not None
    assert first.directory == tmp_path / "cache" / "quic-reverse" / f"rust-ref-{first.digest}"
    assert sorted(p.name for p in first.bin_dir.iterdir()) == sorted(BINARIES)
    assert f"fake build into {first.directory}" in first.log.read_text()
    again = ensure_built(timeout=LONG)
    assert again.built_in is None and again.directory == first.directory
    assert find_built() == again
    assert runs(ref) == 1
    # What is kept: the binaries, the log and the stamp (no sources, no cargo target).
    assert sorted(p.name for p in first.directory.iterdir()) == [
        "bin",
        "build.log",
        "complete.json",
    ]


def test_a_changed_input_means_a_new_build(ref: Path) -> None:
    first = ensure_built(timeout=LONG)
    (ref / "overlay" / "interop.rs").write_text("fn main() { /* changed */ }\n")
    assert source_digest(ref) != first.digest
    assert find_built() is None
    second = ensure_built(timeout=LONG)
    assert second.built_in is not None and second.directory != first.directory
    assert runs(ref) == 2


def test_two_processes_build_once(ref: Path, tmp_path: Path) -> None:
    """The second caller waits on the lock while the first builds, then finds its build."""
    (ref / "hold").touch()
    peers = Peers(tmp_path)
    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout);"
        "from tests.interop.rustref import ensure_built;"
        f"r = ensure_built(timeout={LONG}); print('built' if r.built_in else 'cached', r.directory)"
    )
    peers.env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    try:
        first = peers.start("first", [sys.executable, "-c", code])
        first.wait_for(re.compile("building the Rust reference"))
        second = peers.start("second", [sys.executable, "-c", code])
        second.wait_for(re.compile("waiting for .*lock: another process is building"))
        (ref / "release").touch()
        assert first.wait(LONG) == 0 and second.wait(LONG) == 0, peers.report()
    finally:
        peers.stop_all()
    built = first.wait_for(re.compile(r"^built (\S+)$"))[1]
    cached = second.wait_for(re.compile(r"^cached (\S+)$"))[1]
    assert built == cached
    assert runs(ref) == 1


def test_a_failed_build_says_why(ref: Path) -> None:
    (ref / "build.sh").write_text('#!/bin/bash\necho "cargo not found" >&2\nexit 1\n')
    with pytest.raises(RustRefUnavailable, match=r"(?s)exited with status 1.*cargo not found"):
        ensure_built(timeout=LONG)
    assert find_built() is None  # nothing half-built is taken for a build


def test_no_reference_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUIC_REVERSE_RUST_REF", str(tmp_path / "nowhere"))
    with pytest.raises(RustRefUnavailable, match="QUIC_REVERSE_RUST_REF"):
        ensure_built(timeout=LONG)
