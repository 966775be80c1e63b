"""The Rust reference crate's binaries, built once per machine and cached.

``../shared/rust-ref/`` (beside the checkout; ``QUIC_REVERSE_RUST_REF`` overrides it)
holds the Rust crate quic-reverse v0.1.2 as a tarball, its port to the Rust crates
Debian packages (``port.patch``), helper programs (``overlay/``) and ``build.sh OUTDIR``,
which installs the Debian crates with apt and builds the upstream ``relay``, ``edge``
and ``basic`` examples plus ``interop``, ``bench`` and ``vectors`` (see its README).

:func:`ensure_built` runs ``build.sh`` into a cache directory outside the checkout,
``~/.cache/quic-reverse/rust-ref-<digest>`` (``$XDG_CACHE_HOME`` is honoured), where
``<digest>`` hashes every input of the build (``build.sh``, ``port.patch``, ``overlay/``,
the tarball): a change to any of them means a new directory and a fresh build; an
unchanged set is built once per machine. A lock file serialises concurrent callers (two
pytest processes, a test run beside ``make bench``): the second one waits, then finds
the finished build. The build's output is kept as ``build.log`` in the cache directory.

When the binaries cannot be had (no ``build.sh``, no apt, no cargo, a compile error)
:class:`RustRefUnavailable` says why, with the end of the build log: callers report it,
they never skip over it silently.

Used by ``tests/interop`` (the live interop matrix) and ``bench/rust.py``. Run alone,
``python -m tests.interop.rustref`` builds (or finds) the binaries and prints where.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: Where the shared reference material lives unless ``QUIC_REVERSE_RUST_REF`` says otherwise.
DEFAULT_REF = ROOT.parent / "shared" / "rust-ref"
ENV_REF = "QUIC_REVERSE_RUST_REF"
#: The binaries ``build.sh`` leaves in ``OUTDIR/bin``.
BINARIES = ("relay", "edge", "basic", "interop", "bench", "vectors")
#: Upper bound on one build, apt included (about two minutes on an idle 2-core machine).
BUILD_TIMEOUT = 1200.0
#: How many lines of ``build.log`` an error message quotes.
LOG_TAIL = 25
_STAMP = "complete.json"

logger = logging.getLogger("quic_reverse.interop.rustref")


class RustRefUnavailable(RuntimeError):
    """The Rust reference binaries cannot be built or found; the message says why."""


@dataclass(frozen=True, slots=True)
class RustRef:
    """A finished build: ``bin_dir`` holds :data:`BINARIES`."""

    directory: Path
    digest: str
    #: Seconds the build took, when this call built it (``None``: found in the cache).
    built_in: float | None

    @property
    def bin_dir(self) -> Path:
        return self.directory / "bin"

    @property
    def log(self) -> Path:
        return self.directory / "build.log"

    def binary(self, name: str) -> Path:
        """Absolute path of one of :data:`BINARIES`."""
        if name not in BINARIES:
            raise ValueError(f"unknown Rust reference binary {name!r} (have {BINARIES})")
        return self.bin_dir / name


def reference_dir() -> Path:
    """The shared ``rust-ref`` directory (``$QUIC_REVERSE_RUST_REF`` or ``../shared/rust-ref``)."""
    configured = os.environ.get(ENV_REF)
    return Path(configured).expanduser().resolve() if configured else DEFAULT_REF.resolve()


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/quic-reverse`` (default ``~/.cache/quic-reverse``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "quic-reverse"


def _build_inputs(ref: Path) -> list[Path]:
    """Every file the build reads from ``ref``, in a stable order."""
    if not (ref / "build.sh").is_file():
        raise RustRefUnavailable(
            f"no build.sh in {ref} (set {ENV_REF} to the shared rust-ref directory)"
        )
    files = [ref / "build.sh", ref / "port.patch", *sorted(ref.glob("quic-reverse-*.tar.gz"))]
    overlay = ref / "overlay"
    if overlay.is_dir():
        files += sorted(p for p in overlay.rglob("*") if p.is_file())
    missing = [str(p) for p in files if not p.is_file()]
    if missing or len(files) < 3:
        raise RustRefUnavailable(f"incomplete rust-ref directory {ref}: missing {missing}")
    return files


def source_digest(ref: Path) -> str:
    """Hash of the build's inputs (names relative to ``ref`` and contents), 16 hex digits."""
    digest = hashlib.sha256()
    for path in _build_inputs(ref):
        digest.update(str(path.relative_to(ref)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def _complete(directory: Path) -> bool:
    return (directory / _STAMP).is_file() and all(
        os.access(directory / "bin" / name, os.X_OK) for name in BINARIES
    )


def find_built(ref: Path | None = None) -> RustRef | None:
    """The cached build for the current inputs, or ``None`` (never builds)."""
    ref = ref or reference_dir()
    digest = source_digest(ref)
    directory = cache_root() / f"rust-ref-{digest}"
    return RustRef(directory, digest, None) if _complete(directory) else None


@contextlib.contextmanager
def _locked(path: Path, timeout: float) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``, waiting at most ``timeout`` seconds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        deadline = time.monotonic() + timeout
        waited = False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if not waited:
                    logger.info("waiting for %s: another process is building", path)
                    waited = True
                if time.monotonic() >= deadline:
                    raise RustRefUnavailable(
                        f"another process held {path} (building the Rust reference) "
                        f"for more than {timeout:g} s"
                    ) from exc
                time.sleep(0.5)  # waiting on another process's lock: no event to wait on
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _tail(log: Path, lines: int = LOG_TAIL) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return "(no build log)"
    return "\n".join(text.splitlines()[-lines:])


def _build_env() -> dict[str, str]:
    """The environment for ``build.sh``: ours, plus rustup's ``~/.cargo/bin`` on PATH."""
    env = dict(os.environ)
    cargo_bin = Path.home() / ".cargo" / "bin"
    path = env.get("PATH", os.defpath)
    if cargo_bin.is_dir() and str(cargo_bin) not in path.split(os.pathsep):
        env["PATH"] = os.pathsep.join((path, str(cargo_bin)))
    env.setdefault("DEBIAN_FRONTEND", "noninteractive")
    return env


def _run_build(ref: Path, directory: Path, timeout: float) -> float:
    """Run ``build.sh directory`` (output to ``directory/build.log``); return its duration."""
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "build.log"
    logger.info("building the Rust reference into %s (log: %s)", directory, log)
    t0 = time.monotonic()
    with log.open("wb") as out:
        out.write(f"# {ref / 'build.sh'} {directory}\n".encode())
        out.flush()
        try:
            proc = subprocess.Popen(
                ["bash", str(ref / "build.sh"), str(directory)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=_build_env(),
                cwd=directory,
                start_new_session=True,
            )
        except OSError as exc:
            raise RustRefUnavailable(f"cannot run {ref / 'build.sh'}: {exc}") from exc
        try:
            status = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise RustRefUnavailable(
                f"build.sh did not finish within {timeout:g} s; last lines of {log}:\n" + _tail(log)
            ) from None
        finally:
            if proc.poll() is None:  # interrupted (Ctrl-C): take the build down with us
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    seconds = time.monotonic() - t0
    if status != 0:
        raise RustRefUnavailable(
            f"build.sh exited with status {status} after {seconds:.0f} s; "
            f"last lines of {log}:\n{_tail(log)}"
        )
    absent = [name for name in BINARIES if not os.access(directory / "bin" / name, os.X_OK)]
    if absent:
        raise RustRefUnavailable(f"build.sh succeeded but left no {absent} in {directory / 'bin'}")
    return seconds


def ensure_built(timeout: float = BUILD_TIMEOUT, ref: Path | None = None) -> RustRef:
    """Return the cached build for the current inputs, building it first if needed.

    Raises :class:`RustRefUnavailable` (with the reason and the end of the build log)
    if the build fails or does not finish within ``timeout`` seconds.
    """
    ref = ref or reference_dir()
    digest = source_digest(ref)
    root = cache_root()
    directory = root / f"rust-ref-{digest}"
    if _complete(directory):
        return RustRef(directory, digest, None)
    with _locked(root / f"rust-ref-{digest}.lock", timeout):
        if _complete(directory):  # another process built it while we waited
            return RustRef(directory, digest, None)
        (directory / _STAMP).unlink(missing_ok=True)
        seconds = _run_build(ref, directory, timeout)
        # The binaries are all we keep: the sources and cargo's target dir are large.
        for scratch in ("src", "build"):
            shutil.rmtree(directory / scratch, ignore_errors=True)
        stamp = {"digest": digest, "reference": str(ref), "build_seconds": round(seconds, 1)}
        (directory / _STAMP).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
    return RustRef(directory, digest, seconds)


def main() -> int:
    """Build (or find) the binaries and print their directory."""
    try:
        built = ensure_built()
    except RustRefUnavailable as exc:
        print(f"Rust reference unavailable: {exc}", file=sys.stderr)
        return 1
    how = "cached" if built.built_in is None else f"built in {built.built_in:.0f} s"
    print(f"{built.bin_dir} ({how}; log {built.log})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
