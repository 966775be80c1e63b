"""Tunnel configuration: TOML file + command-line flags -> validated frozen dataclasses.

Precedence is *flag > config file > built-in default*. Every problem is reported as a
:class:`~quic_reverse.errors.ConfigError` whose message names the offending setting, so
the CLI can print it and exit with status 2 before anything touches the network.

Config file format (one file may hold both tables; each command reads its own)::

    [relay]
    listen = "0.0.0.0:4433"            # QUIC (UDP) address the edges dial
    cert = "relay.crt"                 # or: self_signed = true (development only)
    key = "relay.key"
    tokens = "tokens.toml"             # edge name -> token
    forward = ["127.0.0.1:2222=edgeA/ssh", "127.0.0.1:8080=edgeA/web"]
    auth_timeout = 10.0
    grace = 10.0

    [edge]
    relay = "relay.example.com:4433"
    name = "edgeA"
    token_file = "edgeA.token"
    ca = "relay.crt"                   # or: fingerprint = "ab12..."; or insecure = true
    expose = { ssh = "127.0.0.1:22", web = "127.0.0.1:8080" }
    ping_interval = 5.0
    backoff_cap = 10.0

Relative paths in a config file are resolved against the file's directory.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = [
    "DEFAULT_ALPN",
    "AUTH_SERVICE",
    "EDGE_SETTINGS",
    "RELAY_SETTINGS",
    "EdgeConfig",
    "Exposed",
    "Forward",
    "RelayConfig",
    "load_config_file",
    "parse_expose",
    "parse_forward",
    "parse_hostport",
    "validate_service_name",
]

#: ALPN spoken by the tunnel tool (distinct from the library examples' ALPN on purpose:
#: a tunnel relay should not accept arbitrary quic-reverse example clients).
DEFAULT_ALPN = "quic-reverse-tunnel/1"

#: The reserved service an edge opens to authenticate. Never routable to a TCP service.
AUTH_SERVICE = "quic-reverse/auth"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_STACKS = ("qh3", "aioquic")


def validate_service_name(kind: str, value: str) -> str:
    """Check an edge or service name: 1-63 chars of ``[A-Za-z0-9._-]``, starting alnum.

    Names appear in logs and on the wire, so they are kept to a boring alphabet.
    """
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ConfigError(
            f"{kind} {value!r}: use 1-63 characters from A-Z a-z 0-9 . _ - (starting with a "
            "letter or digit)"
        )
    return value


def parse_hostport(what: str, text: str, *, default_host: str | None = None) -> tuple[str, int]:
    """Parse ``HOST:PORT`` / ``[v6]:PORT`` (or ``PORT`` alone when ``default_host`` is given)."""
    if not isinstance(text, str) or not text:
        raise ConfigError(f"{what}: expected HOST:PORT, got {text!r}")
    host: str
    port_text: str
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1 :].startswith(":"):
            raise ConfigError(f"{what}: expected [IPv6]:PORT, got {text!r}")
        host, port_text = text[1:end], text[end + 2 :]
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
    elif default_host is not None:
        host, port_text = default_host, text
    else:
        raise ConfigError(f"{what}: expected HOST:PORT, got {text!r}")
    if not host:
        raise ConfigError(f"{what}: missing host in {text!r}")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{what}: port must be 0-65535, got {port_text!r}")
    return host, int(port_text)


@dataclass(frozen=True, kw_only=True)
class Forward:
    """A relay-side TCP listener mapped to one edge's service."""

    host: str
    port: int
    edge: str
    service: str

    def __str__(self) -> str:
        return f"{self.host}:{self.port}={self.edge}/{self.service}"


@dataclass(frozen=True, kw_only=True)
class Exposed:
    """An edge-side allow-list entry: service name -> fixed local TCP target."""

    service: str
    host: str
    port: int


def parse_forward(text: str) -> Forward:
    """Parse ``[HOST:]PORT=EDGE/SERVICE``; the host defaults to 127.0.0.1 (secure default)."""
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"forward {text!r}: expected [HOST:]PORT=EDGE/SERVICE")
    left, _, right = text.partition("=")
    host, port = parse_hostport(f"forward {text!r}", left.strip(), default_host="127.0.0.1")
    edge, slash, service = right.strip().partition("/")
    if not slash:
        raise ConfigError(f"forward {text!r}: expected EDGE/SERVICE after '='")
    validate_service_name(f"forward {text!r}: edge name", edge)
    validate_service_name(f"forward {text!r}: service", service)
    return Forward(host=host, port=port, edge=edge, service=service)


def parse_expose(text: str) -> Exposed:
    """Parse ``SERVICE=HOST:PORT``."""
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"expose {text!r}: expected SERVICE=HOST:PORT")
    service, _, target = text.partition("=")
    validate_service_name(f"expose {text!r}: service", service.strip())
    host, port = parse_hostport(f"expose {text!r}", target.strip())
    if port == 0:
        raise ConfigError(f"expose {text!r}: port 0 is not a service")
    return Exposed(service=service.strip(), host=host, port=port)


def _positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{name}: expected a number of seconds, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return float(value)


@dataclass(frozen=True, kw_only=True)
class RelayConfig:
    """Validated settings of ``quic-reverse relay``."""

    listen: tuple[str, int] = ("0.0.0.0", 4433)
    cert: Path | None = None
    key: Path | None = None
    self_signed: bool = False
    state_dir: Path = Path(".quic-reverse")
    tokens: Path | None = None
    forwards: tuple[Forward, ...] = ()
    auth_timeout: float = 10.0
    open_timeout: float = 10.0
    grace: float = 10.0
    ping_interval: float = 10.0
    ping_timeout: float = 10.0
    alpn: str = DEFAULT_ALPN
    stack: str = "qh3"

    def __post_init__(self) -> None:
        if self.self_signed and (self.cert or self.key):
            raise ConfigError("relay: use either --cert/--key or --self-signed, not both")
        if not self.self_signed and (self.cert is None or self.key is None):
            raise ConfigError(
                "relay: a TLS certificate is required: --cert FILE --key FILE "
                "(or --self-signed for development)"
            )
        if self.tokens is None:
            raise ConfigError("relay: --tokens FILE is required (edge name -> token)")
        seen: set[tuple[str, int]] = set()
        for fwd in self.forwards:
            if fwd.port != 0 and (fwd.host, fwd.port) in seen:
                raise ConfigError(f"relay: two forwards listen on {fwd.host}:{fwd.port}")
            seen.add((fwd.host, fwd.port))
        _positive("auth_timeout", self.auth_timeout)
        _positive("open_timeout", self.open_timeout)
        _positive("grace", self.grace, allow_zero=True)
        _positive("ping_interval", self.ping_interval)
        _positive("ping_timeout", self.ping_timeout)
        if self.stack not in _STACKS:
            raise ConfigError(f"stack: expected one of {', '.join(_STACKS)}, got {self.stack!r}")
        if not self.alpn:
            raise ConfigError("alpn: must not be empty")


@dataclass(frozen=True, kw_only=True)
class EdgeConfig:
    """Validated settings of ``quic-reverse edge``."""

    relay: tuple[str, int]
    name: str
    token_file: Path
    expose: tuple[Exposed, ...]
    ca: Path | None = None
    fingerprint: str | None = None
    insecure: bool = False
    server_name: str = "localhost"
    ping_interval: float = 5.0
    ping_timeout: float = 5.0
    idle_timeout: float = 30.0
    connect_timeout: float = 10.0
    backoff_initial: float = 0.5
    backoff_cap: float = 10.0
    auth_retry: bool = False
    alpn: str = DEFAULT_ALPN
    stack: str = "qh3"

    def __post_init__(self) -> None:
        validate_service_name("edge name", self.name)
        if not self.expose:
            raise ConfigError("edge: nothing to expose; add --expose SERVICE=HOST:PORT")
        names = [e.service for e in self.expose]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"edge: service exposed twice: {', '.join(dupes)}")
        if any(n == AUTH_SERVICE for n in names):
            raise ConfigError(f"edge: {AUTH_SERVICE!r} is reserved")
        modes = [self.ca is not None, self.fingerprint is not None, self.insecure]
        if sum(modes) == 0:
            raise ConfigError(
                "edge: the relay's certificate must be verified: pass --ca FILE or "
                "--fingerprint SHA256 (or --insecure, development only)"
            )
        if sum(modes) > 1:
            raise ConfigError("edge: use exactly one of --ca, --fingerprint, --insecure")
        if self.fingerprint is not None:
            fp = self.fingerprint.replace(":", "").strip().lower()
            if not re.fullmatch(r"[0-9a-f]{64}", fp):
                raise ConfigError(
                    "fingerprint: expected a SHA-256 as 64 hex digits (colons allowed)"
                )
            object.__setattr__(self, "fingerprint", fp)
        _positive("ping_interval", self.ping_interval)
        _positive("ping_timeout", self.ping_timeout)
        _positive("idle_timeout", self.idle_timeout)
        _positive("connect_timeout", self.connect_timeout)
        _positive("backoff_initial", self.backoff_initial)
        _positive("backoff_cap", self.backoff_cap)
        if self.backoff_cap < self.backoff_initial:
            raise ConfigError("backoff_cap must be >= backoff_initial")
        if self.relay[1] == 0:
            raise ConfigError("relay: port 0 cannot be dialled")
        if self.stack not in _STACKS:
            raise ConfigError(f"stack: expected one of {', '.join(_STACKS)}, got {self.stack!r}")
        if not self.alpn:
            raise ConfigError("alpn: must not be empty")

    def exposed(self, service: str) -> Exposed | None:
        """The allow-list entry for ``service``, or ``None`` (never an arbitrary target)."""
        for entry in self.expose:
            if entry.service == service:
                return entry
        return None


def load_config_file(path: Path, section: str) -> tuple[dict[str, Any], Path]:
    """Read ``[section]`` of a TOML file. Returns (table, directory for relative paths)."""
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} not found") from None
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r}: invalid TOML: {exc}") from None
    table = data.get(section, {})
    if not isinstance(table, dict):
        raise ConfigError(f"config file {str(path)!r}: [{section}] must be a table")
    return table, path.resolve().parent


#: Settings of the ``[relay]`` table; the same names are the relay CLI flags.
RELAY_SETTINGS = (
    "listen",
    "cert",
    "key",
    "self_signed",
    "state_dir",
    "tokens",
    "forward",
    "auth_timeout",
    "open_timeout",
    "grace",
    "ping_interval",
    "ping_timeout",
    "alpn",
    "stack",
)
#: Settings of the ``[edge]`` table; the same names are the edge CLI flags.
EDGE_SETTINGS = (
    "relay",
    "name",
    "token_file",
    "expose",
    "ca",
    "fingerprint",
    "insecure",
    "server_name",
    "ping_interval",
    "ping_timeout",
    "idle_timeout",
    "connect_timeout",
    "backoff_initial",
    "backoff_cap",
    "auth_retry",
    "alpn",
    "stack",
)


def _check_keys(section: str, table: Mapping[str, Any], allowed: Sequence[str]) -> None:
    unknown = sorted(set(table).difference(allowed))
    if unknown:
        raise ConfigError(
            f"[{section}]: unknown setting(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(allowed))}"
        )


def _typed(section: str, key: str, value: Any, kind: type | tuple[type, ...]) -> Any:
    if (
        isinstance(value, bool)
        and kind is not bool
        and not (isinstance(kind, tuple) and bool in kind)
    ):
        raise ConfigError(f"[{section}] {key}: wrong type {type(value).__name__}")
    if not isinstance(value, kind):
        raise ConfigError(f"[{section}] {key}: wrong type {type(value).__name__}")
    return value


def _path(base: Path | None, value: str | Path) -> Path:
    p = Path(value).expanduser()
    if base is not None and not p.is_absolute():
        p = base / p
    return p


def _str_list(section: str, key: str, value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"[{section}] {key}: expected a string or a list of strings")


def build_relay_config(
    file_table: Mapping[str, Any], base: Path | None, flags: Mapping[str, Any]
) -> RelayConfig:
    """Merge a ``[relay]`` table and CLI flags (``None`` = not given) into a RelayConfig."""
    _check_keys("relay", file_table, RELAY_SETTINGS)
    kw: dict[str, Any] = {}
    numbers = ("auth_timeout", "open_timeout", "grace", "ping_interval", "ping_timeout")
    for key, value in file_table.items():
        if key == "listen":
            kw["listen"] = parse_hostport(
                "listen", _typed("relay", key, value, str), default_host="0.0.0.0"
            )
        elif key in ("cert", "key", "tokens", "state_dir"):
            kw[key] = _path(base, _typed("relay", key, value, str))
        elif key == "self_signed":
            kw[key] = _typed("relay", key, value, bool)
        elif key == "forward":
            kw["forwards"] = tuple(parse_forward(v) for v in _str_list("relay", key, value))
        elif key in numbers:
            kw[key] = _typed("relay", key, value, (int, float))
        else:  # alpn, stack
            kw[key] = _typed("relay", key, value, str)
    for key, value in flags.items():
        if value is None:
            continue
        if key == "listen":
            kw["listen"] = parse_hostport("--listen", value, default_host="0.0.0.0")
        elif key in ("cert", "key", "tokens", "state_dir"):
            kw[key] = _path(None, value)
        elif key == "forward":
            if value:
                kw["forwards"] = tuple(parse_forward(v) for v in value)
        elif key == "self_signed":
            if value:
                kw[key] = True
        else:
            kw[key] = value
    return RelayConfig(**kw)


def build_edge_config(
    file_table: Mapping[str, Any], base: Path | None, flags: Mapping[str, Any]
) -> EdgeConfig:
    """Merge an ``[edge]`` table and CLI flags (``None`` = not given) into an EdgeConfig."""
    _check_keys("edge", file_table, EDGE_SETTINGS)
    kw: dict[str, Any] = {}
    numbers = (
        "ping_interval",
        "ping_timeout",
        "idle_timeout",
        "connect_timeout",
        "backoff_initial",
        "backoff_cap",
    )
    for key, value in file_table.items():
        if key == "relay":
            kw["relay"] = parse_hostport("relay", _typed("edge", key, value, str))
        elif key in ("token_file", "ca"):
            kw[key] = _path(base, _typed("edge", key, value, str))
        elif key in ("insecure", "auth_retry"):
            kw[key] = _typed("edge", key, value, bool)
        elif key == "expose":
            if isinstance(value, dict):
                kw["expose"] = tuple(
                    parse_expose(f"{k}={_typed('edge', f'expose.{k}', v, str)}")
                    for k, v in value.items()
                )
            else:
                kw["expose"] = tuple(parse_expose(v) for v in _str_list("edge", key, value))
        elif key in numbers:
            kw[key] = _typed("edge", key, value, (int, float))
        else:  # name, fingerprint, server_name, alpn, stack
            kw[key] = _typed("edge", key, value, str)
    for key, value in flags.items():
        if value is None:
            continue
        if key == "relay":
            kw["relay"] = parse_hostport("--relay", value)
        elif key in ("token_file", "ca"):
            kw[key] = _path(None, value)
        elif key == "expose":
            if value:
                kw["expose"] = tuple(parse_expose(v) for v in value)
        elif key in ("insecure", "auth_retry"):
            if value:
                kw[key] = True
        else:
            kw[key] = value
    required_flags = (("relay", "--relay"), ("name", "--name"), ("token_file", "--token-file"))
    for required, flag in required_flags:
        if required not in kw:
            raise ConfigError(f"edge: {flag} is required")
    kw.setdefault("expose", ())
    return EdgeConfig(**kw)


def as_pairs(items: Sequence[Exposed]) -> dict[str, tuple[str, int]]:
    """The allow-list as ``{service: (host, port)}`` (for logs and docs)."""
    return {e.service: (e.host, e.port) for e in items}
