"""Edge authentication: token files, constant-time checks, and the in-protocol auth step.

Why in-protocol: neither Python QUIC stack lets a server verify client certificates
(``QUIC-STACKS.md``), so the edge proves itself right after negotiation by opening the
reserved service :data:`~quic_reverse.tunnel.config.AUTH_SERVICE` with structured
metadata ``{"name": <edge name>, "token": <token>}``. The relay accepts that open
(edge authenticated) or rejects it with ``UNAUTHORIZED`` and closes the session.
The channel is the relay-authenticated TLS connection, so the token is never exposed
to a network observer; it is never logged by either side.

Token files:

* relay ``--tokens FILE``: TOML, one ``edge-name = "token"`` per line (per-edge tokens).
* edge ``--token-file FILE``: the token alone (surrounding whitespace ignored).

Tokens are 16-512 printable ASCII characters without spaces; ``quic-reverse token``
prints a fresh random one.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import stat
import tomllib
from collections.abc import Mapping
from pathlib import Path

from ..errors import ConfigError
from .config import validate_service_name

__all__ = [
    "MIN_TOKEN_LENGTH",
    "TokenStore",
    "generate_token",
    "read_edge_token",
    "validate_token",
]

log = logging.getLogger("quic_reverse.tunnel.auth")

MIN_TOKEN_LENGTH = 16
MAX_TOKEN_LENGTH = 512


def generate_token() -> str:
    """A fresh random token (256 bits, URL-safe base64)."""
    return secrets.token_urlsafe(32)


def validate_token(where: str, token: object) -> str:
    """Check a token's shape; the message never contains the token itself."""
    if not isinstance(token, str):
        raise ConfigError(f"{where}: token must be a string")
    if not MIN_TOKEN_LENGTH <= len(token) <= MAX_TOKEN_LENGTH:
        raise ConfigError(
            f"{where}: token must be {MIN_TOKEN_LENGTH}-{MAX_TOKEN_LENGTH} characters "
            f"(got {len(token)}); `quic-reverse token` makes one"
        )
    if not all(33 <= ord(c) <= 126 for c in token):
        raise ConfigError(f"{where}: token must be printable ASCII without spaces")
    return token


def _warn_if_readable(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning(
            "token file %s is readable by other users (mode %o); chmod 600 it",
            path,
            stat.S_IMODE(mode),
        )


def _read_text(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} {str(path)!r} not found") from None
    except OSError as exc:
        raise ConfigError(f"{what} {str(path)!r}: {exc.strerror}") from None


def read_edge_token(path: Path) -> str:
    """Read the edge's token file (the token alone; whitespace around it ignored)."""
    raw = _read_text(path, "token file")
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"token file {str(path)!r}: not ASCII") from None
    _warn_if_readable(path)
    return validate_token(f"token file {str(path)!r}", text)


class TokenStore:
    """Per-edge tokens held by the relay; :meth:`verify` runs in constant time.

    Constant time in the token (``hmac.compare_digest``) and as far as practical in
    the name: an unknown name is compared against a random dummy so that timing
    does not reveal which edge names exist.
    """

    def __init__(self, tokens: Mapping[str, str]) -> None:
        checked: dict[str, bytes] = {}
        for name, token in tokens.items():
            validate_service_name("tokens: edge name", name)
            checked[name] = validate_token(f"tokens: edge {name!r}", token).encode("ascii")
        if not checked:
            raise ConfigError("tokens: no edge tokens configured")
        self._tokens = checked
        self._dummy = generate_token().encode("ascii")

    @classmethod
    def from_file(cls, path: Path) -> TokenStore:
        """Load ``edge-name = "token"`` lines from a TOML file."""
        raw = _read_text(path, "tokens file")
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            # The decoder's message may quote file content (a token): keep only its position.
            where = getattr(exc, "lineno", None)
            detail = f" near line {where}" if where else ""
            raise ConfigError(f"tokens file {str(path)!r}: invalid TOML{detail}") from None
        bad = [k for k, v in data.items() if not isinstance(v, str)]
        if bad:
            raise ConfigError(
                f'tokens file {str(path)!r}: expected name = "token" entries; '
                f"bad entries: {', '.join(sorted(bad))}"
            )
        _warn_if_readable(path)
        return cls(data)

    @property
    def names(self) -> frozenset[str]:
        """Edge names that have a token."""
        return frozenset(self._tokens)

    def verify(self, name: object, token: object) -> bool:
        """True only if ``token`` is the configured token of edge ``name``."""
        if not isinstance(name, str) or not isinstance(token, str):
            return False
        try:
            presented = token.encode("ascii")
        except UnicodeEncodeError:
            presented = b""
        expected = self._tokens.get(name)
        ok = hmac.compare_digest(presented, expected if expected is not None else self._dummy)
        return ok and expected is not None


def write_token_file(path: Path, token: str) -> None:
    """Write ``token`` to ``path`` readable by the owner only (used by tests and docs)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(token + "\n")
