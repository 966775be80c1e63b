"""Edge authentication: token files, constant-time checks, and the in-protocol auth step.

Why in-protocol: neither Python QUIC stack lets a server verify client certificates
(``QUIC-STACKS.md``), so the edge proves itself right after negotiation by opening the
reserved service :data:`~quic_reverse.tunnel.config.AUTH_SERVICE` with structured
metadata ``{"name": <edge name>, "token": <token>, "instance": <instance id>}``. The
relay accepts that open (edge authenticated) or rejects it with ``UNAUTHORIZED`` and
closes the session. Both sides of that step are here: :func:`authenticate_to_relay`
(edge) and :func:`authenticate_edge` (relay).

``instance`` is a random id an edge process draws once at start (:func:`new_instance_id`)
and sends on every (re)connection, so the relay can tell a reconnect of the same process
(replace its old session) from a second live process with the same name (a replica).
An edge that sends none (an older edge) is treated as an instance of its own.
The channel is the relay-authenticated TLS connection, so the token is never exposed
to a network observer; it is never logged by either side.

Token files:

* relay ``--tokens FILE``: TOML, one ``edge-name = "token"`` per line (per-edge tokens).
* edge ``--token-file FILE``: the token alone (surrounding whitespace ignored); or the
  environment variable ``QUIC_REVERSE_TOKEN`` when no token file is given (containers).

Tokens are 16-512 printable ASCII characters without spaces; ``quic-reverse token``
prints a fresh random one.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import re
import secrets
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, QuicReverseError, StreamRejected
from ..events import CloseReceived, OpenRequest
from ..session import SessionHandle
from ..wire import Metadata, RejectCode
from .config import AUTH_SERVICE, TOKEN_ENV, validate_service_name

__all__ = [
    "INSTANCE_KEY",
    "MIN_TOKEN_LENGTH",
    "AuthRejected",
    "EdgeIdentity",
    "TokenStore",
    "authenticate_edge",
    "authenticate_to_relay",
    "generate_token",
    "new_instance_id",
    "read_edge_token",
    "validate_token",
]

log = logging.getLogger("quic_reverse.tunnel.auth")

MIN_TOKEN_LENGTH = 16
MAX_TOKEN_LENGTH = 512
#: Structured metadata keys of the auth open.
NAME_KEY, TOKEN_KEY, INSTANCE_KEY = "name", "token", "instance"
#: In place of ``name``: a peer relay of the fleet (its relay id), with the fleet secret
#: as ``token`` (:mod:`.fleet`).
FLEET_KEY = "fleet"
_INSTANCE_RE = re.compile(r"^[0-9A-Za-z_-]{1,64}$")
_SHOWN_RE = re.compile(r"^[0-9A-Za-z._-]{1,64}$")


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


def read_edge_token(path: Path | None) -> str:
    """Read the edge's token file (the token alone; whitespace around it ignored), or,
    with ``path`` ``None``, the environment variable ``QUIC_REVERSE_TOKEN`` (containers).
    Neither the token nor the variable's value is ever logged or put in an error."""
    if path is None:
        value = os.environ.get(TOKEN_ENV, "")
        if not value:
            raise ConfigError(f"edge: --token-file FILE or ${TOKEN_ENV} is required")
        return validate_token(f"${TOKEN_ENV}", value.strip())
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

    def revoked_by(self, new: TokenStore) -> frozenset[str]:
        """Edge names whose token ``new`` removes or changes (their sessions must go)."""
        return frozenset(
            name
            for name, token in self._tokens.items()
            if not hmac.compare_digest(token, new._tokens.get(name, b""))
        )

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


def new_instance_id() -> str:
    """A random id for this edge process (sent with every authentication)."""
    return secrets.token_hex(8)


class AuthRejected(QuicReverseError):
    """The relay rejected this edge's name/token (``UNAUTHORIZED``)."""


@dataclass(frozen=True)
class EdgeIdentity:
    """Who an authenticated session is: the edge name, and the instance id the edge
    sent (``None`` for an edge that sent none: it is an instance of its own)."""

    name: str
    instance: str | None
    #: A peer relay of the fleet (``name`` is ``relay <id>``, ``instance`` its id), not an edge.
    relay: bool = False


async def authenticate_to_relay(
    handle: SessionHandle, name: str, token: str, instance: str
) -> None:
    """The edge's side: open the auth service with our name, token and instance id.

    Bounded by the session's ``open_timeout``. Raises :class:`AuthRejected` if the
    relay said ``UNAUTHORIZED``; other session errors propagate.
    """
    metadata = Metadata.structured({NAME_KEY: name, TOKEN_KEY: token, INSTANCE_KEY: instance})
    try:
        stream = await handle.open(AUTH_SERVICE, metadata)
    except StreamRejected as exc:
        if exc.code == RejectCode.UNAUTHORIZED:
            raise AuthRejected(f"authentication as {name!r} rejected") from None
        raise
    with contextlib.suppress(QuicReverseError):
        await stream.aclose()


async def authenticate_edge(
    handle: SessionHandle, tokens: TokenStore, peer: str, *, fleet_token: str | None = None
) -> EdgeIdentity | None:
    """The relay's side: wait for the edge's auth open and check it.

    Opens for anything else before it are rejected ``UNAUTHORIZED``. Returns the
    identity, or ``None`` (reason logged) if the edge failed or left. Not bounded by
    itself: the relay's auth deadline (from accept) closes the connection. With
    ``fleet_token`` (the relay is in a fleet), an open carrying ``fleet`` (a relay id)
    and that secret authenticates a peer relay (``EdgeIdentity.relay``).
    """
    while True:
        event = await handle.process_message()
        if event is None or isinstance(event, CloseReceived):
            log.warning(
                "edge %s closed the session before authenticating", peer, extra={"peer": True}
            )
            return None
        if not isinstance(event, OpenRequest):
            continue
        if event.service != AUTH_SERVICE:
            log.warning(
                "edge %s asked for %r before authenticating; rejected",
                peer,
                event.service,
                extra={"peer": True},
            )
            with contextlib.suppress(QuicReverseError):
                await handle.reject_open(
                    event.request_id, RejectCode.UNAUTHORIZED, "authenticate first"
                )
            continue
        name = event.metadata.get(NAME_KEY)
        token = event.metadata.get(TOKEN_KEY)
        instance = event.metadata.get(INSTANCE_KEY)
        relay_id = event.metadata.get(FLEET_KEY)
        if fleet_token is not None and relay_id is not None:
            presented = token.encode("ascii", "replace") if isinstance(token, str) else b""
            if (
                hmac.compare_digest(presented, fleet_token.encode("ascii"))
                and isinstance(relay_id, str)
                and _INSTANCE_RE.match(relay_id)
            ):
                stream = await handle.accept_open(event.request_id)
                with contextlib.suppress(QuicReverseError):
                    await stream.aclose()
                return EdgeIdentity(f"relay {relay_id}", relay_id, relay=True)
            name = None  # a wrong fleet secret fails below like a wrong edge token
        if instance is not None and not (
            isinstance(instance, str) and _INSTANCE_RE.match(instance)
        ):
            name = None  # malformed: fails below like a wrong token (nothing echoed back)
        if isinstance(name, str) and tokens.verify(name, token):
            stream = await handle.accept_open(event.request_id)
            with contextlib.suppress(QuicReverseError):
                await stream.aclose()
            return EdgeIdentity(name, instance if isinstance(instance, str) else None)
        shown = event.metadata.get(NAME_KEY)
        shown = shown if isinstance(shown, str) and _SHOWN_RE.match(shown) else "<invalid>"
        log.warning(
            "edge %s failed authentication as %r (unknown name, wrong token or malformed metadata)",
            peer,
            shown,
            extra={"peer": True, "edge": shown, "client": peer},
        )
        with contextlib.suppress(QuicReverseError):
            await handle.reject_open(
                event.request_id, RejectCode.UNAUTHORIZED, "authentication failed"
            )
        return None
