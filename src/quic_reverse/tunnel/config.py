"""Tunnel configuration: TOML file + command-line flags -> validated frozen dataclasses.

Precedence is *flag > config file > built-in default*. One declarative table per
command (:data:`RELAY_TABLE`, :data:`EDGE_TABLE`) drives the CLI flags, the TOML keys
and their conversion; values are checked with the validators the library's
:class:`~quic_reverse.Config` uses (:mod:`quic_reverse._validate`). Every problem is reported as a
:class:`~quic_reverse.errors.ConfigError` whose message names the offending setting, so
the CLI can print it and exit with status 2 before anything touches the network.

Config file format (one file may hold both tables; each command reads its own)::

    [relay]
    listen = "0.0.0.0:4433"            # QUIC (UDP) address the edges dial
    cert = "relay.crt"                 # or: self_signed = true (development only)
    key = "relay.key"
    tokens = "tokens.toml"             # edge name -> token
    forward = ["127.0.0.1:2222=edgeA/ssh", "127.0.0.1:8080=edgeA/web"]   # relay host
    auth_timeout = 10.0
    grace = 10.0

    [edge]
    relay = ["relay1.example.com:4433", "relay2.example.com:4433"]   # or one string
    name = "edgeA"
    token_file = "edgeA.token"
    ca = "relay.crt"                   # or: fingerprint = "ab12..."; or insecure = true
    expose = { ssh = "127.0.0.1:22", web = "127.0.0.1:80" }          # edge host

UDP (datagram flows, docs/TUNNEL.md): ``forward = ["udp:127.0.0.1:5353=edgeA/dns"]`` on
the relay, ``expose = { dns = "udp:127.0.0.1:53" }`` on the edge.
    ping_interval = 5.0
    backoff_cap = 10.0

Relative paths in a config file are resolved against the file's directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm

from .._validate import check_choice, check_count, check_duration, fingerprint, type_name
from ..errors import ConfigError

__all__ = [
    "BALANCE_POLICIES",
    "DEFAULT_ALPN",
    "AUTH_SERVICE",
    "EDGE_SETTINGS",
    "EDGE_TABLE",
    "RELAY_SETTINGS",
    "RELAY_TABLE",
    "Setting",
    "EdgeConfig",
    "Exposed",
    "Forward",
    "RelayConfig",
    "TOKEN_ENV",
    "build_edge_config",
    "build_relay_config",
    "check_ca_file",
    "check_stack_installed",
    "load_config_file",
    "load_server_certificate",
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

#: Environment variable that may hold the edge's token instead of ``--token-file``.
TOKEN_ENV = "QUIC_REVERSE_TOKEN"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


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
    #: How new TCP clients are spread over the edge's replicas (``None``: the relay's
    #: ``balance`` setting): ``least-streams`` or ``sticky`` (by client IP).
    balance: str | None = None
    #: "tcp" (default) or "udp" (``udp:HOST:PORT=EDGE/SERVICE``: datagram flows).
    protocol: str = "tcp"

    def __str__(self) -> str:
        prefix = "udp:" if self.protocol == "udp" else ""
        suffix = f",balance={self.balance}" if self.balance is not None else ""
        return f"{prefix}{self.host}:{self.port}={self.edge}/{self.service}{suffix}"


@dataclass(frozen=True, kw_only=True)
class Exposed:
    """An edge-side allow-list entry: service name -> fixed local TCP target."""

    service: str
    host: str
    port: int
    #: "tcp" (default) or "udp" (``SERVICE=udp:HOST:PORT``: served as datagram flows).
    protocol: str = "tcp"


def _protocol_prefix(text: str) -> tuple[str, str]:
    """Split an optional ``udp:``/``tcp:`` prefix off ``text``."""
    for proto in ("udp", "tcp"):
        if text[:4].lower() == proto + ":":
            return proto, text[4:]
    return "tcp", text


#: Balancing policies of a forward (``balance``): fewest active streams, or sticky by
#: client IP (rendezvous hashing over the live replicas).
BALANCE_POLICIES = ("least-streams", "sticky")


def parse_forward(text: str) -> Forward:
    """Parse ``[udp:][HOST:]PORT=EDGE/SERVICE[,balance=POLICY]``; the host defaults to
    127.0.0.1 (secure default); ``udp:`` forwards UDP datagrams over datagram flows."""
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"forward {text!r}: expected [udp:][HOST:]PORT=EDGE/SERVICE")
    spec, *options = text.split(",")
    balance: str | None = None
    for option in options:
        key, eq, value = option.strip().partition("=")
        if key != "balance" or not eq:
            raise ConfigError(
                f"forward {text!r}: unknown option {option.strip()!r} (expected balance=POLICY)"
            )
        balance = check_choice(f"forward {text!r}: balance", value.strip(), BALANCE_POLICIES)
    left, _, right = spec.partition("=")
    protocol, left = _protocol_prefix(left.strip())
    host, port = parse_hostport(f"forward {text!r}", left.strip(), default_host="127.0.0.1")
    edge, slash, service = right.strip().partition("/")
    if not slash:
        raise ConfigError(f"forward {text!r}: expected EDGE/SERVICE after '='")
    validate_service_name(f"forward {text!r}: edge name", edge)
    validate_service_name(f"forward {text!r}: service", service)
    return Forward(
        host=host, port=port, edge=edge, service=service, balance=balance, protocol=protocol
    )


def parse_expose(text: str) -> Exposed:
    """Parse ``SERVICE=[udp:]HOST:PORT`` (``udp:``: a UDP service, served as datagram flows)."""
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"expose {text!r}: expected SERVICE=[udp:]HOST:PORT")
    service, _, target = text.partition("=")
    validate_service_name(f"expose {text!r}: service", service.strip())
    protocol, target = _protocol_prefix(target.strip())
    host, port = parse_hostport(f"expose {text!r}", target.strip())
    if port == 0:
        raise ConfigError(f"expose {text!r}: port 0 is not a service")
    return Exposed(service=service.strip(), host=host, port=port, protocol=protocol)


# ---------------------------------------------------------------------------- settings


@dataclass(frozen=True, kw_only=True)
class Setting:
    """One setting of ``[relay]`` or ``[edge]``: its TOML key (the CLI flag is the same
    name with dashes), how values are read, and the help text. Both config builders and
    the CLI's argument parser are driven by :data:`RELAY_TABLE` / :data:`EDGE_TABLE`."""

    name: str
    #: seconds, count, bool, str, path, choice, hostport, forwards, expose, fingerprint
    kind: str
    help: str
    metavar: str | None = None
    #: The config dataclass field, when it differs from ``name`` (``forward`` -> ``forwards``).
    field: str | None = None
    choices: tuple[str, ...] = ()
    allow_zero: bool = False
    #: Default host of a ``hostport`` given as a port alone.
    default_host: str | None = None
    #: Shown in ``--help``; the real default lives in the config dataclass.
    default: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def target(self) -> str:
        return self.field or self.name


STACKS = ("qh3", "aioquic")
#: The edge's ``--stack``: also ``auto`` (qh3, switching a relay's session to aioquic
#: once its path proves lossy: tunnel/edge.py).
EDGE_STACKS = (*STACKS, "auto")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")

_COMMON = (
    Setting(
        name="log_level",
        kind="choice",
        choices=LOG_LEVELS,
        default="info",
        help="log verbosity on stderr",
    ),
    Setting(name="alpn", kind="str", default=DEFAULT_ALPN, help="ALPN protocol id"),
)
#: The edge's ``stack`` accepts more (:data:`EDGE_STACKS`).
_STACK = Setting(name="stack", kind="choice", choices=STACKS, default="qh3", help="QUIC stack")
_COMMON_TAIL = (
    Setting(
        name="log_format",
        kind="choice",
        choices=LOG_FORMATS,
        default="text",
        help="log lines on stderr: text, or json (one object per line)",
    ),
    Setting(
        name="metrics",
        kind="hostport",
        metavar="HOST:PORT",
        default_host="127.0.0.1",
        help="serve /metrics (Prometheus), /healthz, /ready and a status page at / on this "
        "HTTP address (off by default; a port alone listens on 127.0.0.1)",
    ),
)

#: The relay's settings, in ``--help`` order.
RELAY_TABLE: tuple[Setting, ...] = (
    Setting(
        name="listen",
        kind="hostport",
        metavar="HOST:PORT",
        default_host="0.0.0.0",
        default="0.0.0.0:4433",
        help="UDP address for edges",
    ),
    Setting(name="cert", kind="path", metavar="FILE", help="TLS certificate (PEM)"),
    Setting(name="key", kind="path", metavar="FILE", help="TLS private key (PEM)"),
    Setting(
        name="self_signed",
        kind="bool",
        help="development: generate (once) a certificate in --state-dir and print its "
        "SHA-256 fingerprint for the edge's --fingerprint",
    ),
    Setting(
        name="state_dir",
        kind="path",
        metavar="DIR",
        default=".quic-reverse",
        help="where --self-signed keeps it",
    ),
    Setting(
        name="tokens",
        kind="path",
        metavar="FILE",
        help='TOML file of edge tokens: one  name = "token"  per line',
    ),
    Setting(
        name="forward",
        kind="forwards",
        field="forwards",
        metavar="[udp:][HOST:]PORT=EDGE/SERVICE[,balance=POLICY]",
        help="TCP listener mapped to an edge's service; HOST defaults to 127.0.0.1 "
        "(repeatable; port 0 picks a free port, logged at start; balance= overrides "
        "--balance for this forward); udp: a UDP listener whose clients each get a "
        "datagram flow",
    ),
    Setting(
        name="udp_idle_timeout",
        kind="seconds",
        default="60",
        help="a UDP client's flow closes after this long without a datagram",
    ),
    Setting(
        name="max_udp_flows",
        kind="count",
        default="1024",
        help="UDP client addresses with a flow at once, per udp forward; datagrams of "
        "more clients are dropped",
    ),
    Setting(name="auth_timeout", kind="seconds", default="10", help="close unauthenticated edges"),
    Setting(
        name="open_timeout",
        kind="seconds",
        default="10",
        help="deadline for a TCP client to get a stream (queueing, waiting for a replica to "
        "(re)connect, the edge's answer)",
    ),
    Setting(name="grace", kind="seconds", allow_zero=True, default="10", help="shutdown grace"),
    Setting(
        name="startup_grace",
        kind="seconds",
        allow_zero=True,
        default="30",
        help="for this long after the relay starts, a TCP client of an edge that has not "
        "connected yet waits (open_timeout) for it instead of being closed at once: edges "
        "need a keep-alive interval to reconnect after a relay restart (0: off)",
    ),
    Setting(name="ping_interval", kind="seconds", default="10", help="keep-alive ping"),
    Setting(name="ping_timeout", kind="seconds", default="10", help="edge dead after no pong"),
    Setting(
        name="max_streams",
        kind="count",
        default="10000",
        help="concurrent tunnelled connections per edge session; more wait (open_timeout)",
    ),
    Setting(
        name="max_queued_opens",
        kind="count",
        allow_zero=True,
        default="10000",
        help="TCP clients allowed to wait for a free stream per edge name",
    ),
    Setting(
        name="linger",
        kind="seconds",
        default="5",
        help="a closing TCP connection is reset if its last bytes are not sent by then",
    ),
    Setting(
        name="auth_failure_burst",
        kind="count",
        allow_zero=True,
        default="20",
        help="connections one source address may make without authenticating before its "
        "new connections are refused (0: no limit)",
    ),
    Setting(
        name="auth_failure_interval",
        kind="seconds",
        default="3",
        help="after the burst, one more such connection per this many seconds",
    ),
    Setting(
        name="balance",
        kind="choice",
        choices=BALANCE_POLICIES,
        default="least-streams",
        help="how new TCP clients are spread over an edge name's replicas: fewest active "
        "streams, or sticky by client IP",
    ),
    Setting(
        name="answer_timeout",
        kind="seconds",
        default="1",
        help="an open the edge has not answered by then makes the relay ping that edge "
        "(within the same time) and drop it if silent; new clients avoid it meanwhile",
    ),
    Setting(
        name="backlog",
        kind="count",
        default="4096",
        help="listen backlog of each TCP forward (bursts of connects; capped by the "
        "kernel's net.core.somaxconn)",
    ),
    # The relay fleet (tunnel/fleet.py): one registry shared by every relay.
    Setting(
        name="registry",
        kind="str",
        metavar="redis://HOST:PORT/DB",
        help="fleet: the shared registry (Redis) where this relay publishes its edges and "
        "finds the relay holding any other edge (needs the fleet extra: redis-py)",
    ),
    Setting(
        name="registry_ttl",
        kind="seconds",
        default="10",
        help="fleet: a relay that stops heartbeating loses its routes after this long",
    ),
    Setting(
        name="registry_heartbeat",
        kind="seconds",
        default="3",
        help="fleet: how often this relay refreshes its liveness (below registry_ttl)",
    ),
    Setting(
        name="advertise",
        kind="hostport",
        metavar="HOST:PORT",
        help="fleet: the QUIC address peer relays dial (default: the listen address)",
    ),
    Setting(
        name="fleet_token_file",
        kind="path",
        metavar="FILE",
        help="fleet: the secret every relay of the fleet shares (relay-to-relay auth)",
    ),
    Setting(
        name="fleet_ca",
        kind="path",
        metavar="FILE",
        help="fleet: CA file verifying peer relays' certificates",
    ),
    Setting(
        name="fleet_fingerprint",
        kind="fingerprint",
        metavar="SHA256",
        help="fleet: pin peer relays' certificate (instead of --fleet-ca)",
    ),
    *_COMMON,
    _STACK,
    *_COMMON_TAIL,
)

#: The edge's settings, in ``--help`` order.
EDGE_TABLE: tuple[Setting, ...] = (
    Setting(
        name="relay",
        kind="hostports",
        field="relays",
        metavar="HOST:PORT",
        help="a relay's QUIC address (repeatable: one session to each, for high availability)",
    ),
    Setting(name="name", kind="str", help="this edge's name (as in the relay's tokens file)"),
    Setting(
        name="token_file",
        kind="path",
        metavar="FILE",
        help=f"file holding this edge's token (or set ${TOKEN_ENV})",
    ),
    Setting(
        name="expose",
        kind="expose",
        metavar="SERVICE=[udp:]HOST:PORT",
        help="allow-listed local service (repeatable); udp: a UDP service",
    ),
    Setting(
        name="ca", kind="path", metavar="FILE", help="CA/certificate (PEM) to verify the relay"
    ),
    Setting(
        name="fingerprint",
        kind="fingerprint",
        metavar="SHA256",
        help="pin the relay certificate's SHA-256 (hex; colons or sha256: prefix allowed)",
    ),
    Setting(
        name="insecure",
        kind="bool",
        help="DO NOT verify the relay certificate (development only; logged loudly)",
    ),
    Setting(name="server_name", kind="str", default="localhost", help="TLS server name to verify"),
    Setting(name="ping_interval", kind="seconds", default="5", help="keep-alive ping"),
    Setting(name="ping_timeout", kind="seconds", default="5", help="relay dead after no pong"),
    Setting(name="idle_timeout", kind="seconds", default="30", help="QUIC idle timeout"),
    Setting(
        name="connect_timeout",
        kind="seconds",
        default="10",
        help="deadline of each step of connecting (handshake, negotiation, authentication)",
    ),
    Setting(
        name="backoff_initial", kind="seconds", default="0.5", help="first reconnect delay cap"
    ),
    Setting(name="backoff_cap", kind="seconds", default="10", help="max reconnect delay"),
    Setting(
        name="probe_interval",
        kind="seconds",
        default="1",
        help="while a relay does not answer, a new handshake is tried this often (a path "
        "that comes back is noticed within it)",
    ),
    Setting(
        name="auth_retry",
        kind="bool",
        help="on a rejected token keep retrying every 60 s instead of exiting with status 1",
    ),
    Setting(
        name="max_streams",
        kind="count",
        default="10000",
        help="concurrent tunnelled connections; more are refused LIMIT_EXCEEDED",
    ),
    Setting(
        name="service_timeout",
        kind="seconds",
        default="5",
        help="deadline for connecting to an exposed local service",
    ),
    Setting(
        name="udp_idle_timeout",
        kind="seconds",
        default="60",
        help="a UDP flow closes after this long without a datagram",
    ),
    Setting(
        name="max_udp_flows",
        kind="count",
        default="1024",
        help="UDP flows served at once per session; more are refused LIMIT_EXCEEDED",
    ),
    Setting(name="grace", kind="seconds", allow_zero=True, default="5", help="shutdown grace"),
    Setting(
        name="linger",
        kind="seconds",
        default="5",
        help="a closing TCP connection is reset if its last bytes are not sent by then",
    ),
    Setting(
        name="proxy_protocol",
        kind="services",
        metavar="SERVICE",
        help="send a PROXY protocol v2 header with the relay's client address to this "
        "exposed service before its bytes (repeatable)",
    ),
    *_COMMON,
    Setting(
        name="stack",
        kind="choice",
        choices=EDGE_STACKS,
        default="auto",
        help="QUIC stack; auto (default): qh3, switching a relay's session to aioquic "
        "(without dropping connections) once the path proves lossy, if aioquic is installed",
    ),
    *_COMMON_TAIL,
)

#: Settings of the ``[relay]`` table; the same names are the relay CLI flags.
RELAY_SETTINGS = tuple(s.name for s in RELAY_TABLE)
#: Settings of the ``[edge]`` table; the same names are the edge CLI flags.
EDGE_SETTINGS = tuple(s.name for s in EDGE_TABLE)
_TABLES = {"relay": RELAY_TABLE, "edge": EDGE_TABLE}

_KIND_WORDS = {
    "seconds": "a number of seconds",
    "count": "an integer",
    "bool": "a boolean (true/false)",
    "str": "a string",
    "path": "a string (a file path)",
    "choice": "a string",
    "hostport": "a string (HOST:PORT)",
    "hostports": "a string or an array of strings (HOST:PORT)",
    "forwards": "a string or an array of strings ([udp:][HOST:]PORT=EDGE/SERVICE)",
    "expose": 'a table (service = "[udp:]HOST:PORT") or an array of "SERVICE=[udp:]HOST:PORT"',
    "fingerprint": "a string (64 hex digits)",
    "services": "a string or an array of strings (service names)",
}


def _wrong_type(where: str, setting: Setting, value: object) -> ConfigError:
    return ConfigError(
        f"{where}: wrong type: expected {_KIND_WORDS[setting.kind]}, "
        f"got {type_name(value)} {value!r}"
    )


def _path(base: Path | None, value: str | Path) -> Path:
    p = Path(value).expanduser()
    if base is not None and not p.is_absolute():
        p = base / p
    return p


def _strings(where: str, setting: Setting, value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return list(value)
    raise _wrong_type(where, setting, value)


def convert(setting: Setting, value: Any, where: str, base: Path | None, *, from_cli: bool) -> Any:
    """Read one value of ``setting`` (from the file: typed TOML; from the CLI: text or an
    already typed value). ``where`` names it in errors (``--grace``, ``[relay] grace``)."""
    kind = setting.kind
    if kind in ("seconds", "count"):
        if from_cli and isinstance(value, str):
            try:
                value = float(value) if kind == "seconds" else int(value)
            except ValueError:
                raise ConfigError(f"{where}: expected {_KIND_WORDS[kind]}, got {value!r}") from None
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise _wrong_type(where, setting, value)
        if kind == "seconds":
            return check_duration(where, value, allow_zero=setting.allow_zero)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return check_count(where, value, minimum=0 if setting.allow_zero else 1)
    if kind == "bool":
        if not isinstance(value, bool):
            raise _wrong_type(where, setting, value)
        return value
    if kind == "forwards":
        return tuple(parse_forward(v) for v in _strings(where, setting, value))
    if kind == "services":
        return tuple(validate_service_name(where, v) for v in _strings(where, setting, value))
    if kind == "hostports":
        return tuple(
            parse_hostport(where, v, default_host=setting.default_host)
            for v in _strings(where, setting, value)
        )
    if kind == "expose":
        if isinstance(value, dict) and not from_cli:
            items = []
            for k, v in value.items():
                if not isinstance(v, str):
                    raise ConfigError(
                        f"{where}.{k}: wrong type: expected a string (HOST:PORT), "
                        f"got {type_name(v)} {v!r}"
                    )
                items.append(f"{k}={v}")
            return tuple(parse_expose(v) for v in items)
        return tuple(parse_expose(v) for v in _strings(where, setting, value))
    if not isinstance(value, str | Path):
        raise _wrong_type(where, setting, value)
    if kind == "path":
        return _path(None if from_cli else base, value)
    assert isinstance(value, str)
    if kind == "hostport":
        return parse_hostport(where, value, default_host=setting.default_host)
    if kind == "choice":
        return check_choice(where, value, setting.choices)
    if kind == "fingerprint":
        return fingerprint(where, value)
    return value  # str


def merge_settings(
    section: str, file_table: Mapping[str, Any], base: Path | None, flags: Mapping[str, Any]
) -> dict[str, Any]:
    """Keyword arguments for the ``section``'s config dataclass: the file's values,
    overridden by the flags that were given (``None``, ``False`` and ``[]`` = not given)."""
    table = _TABLES[section]
    by_name = {s.name: s for s in table}
    unknown = sorted(set(file_table).difference(by_name))
    if unknown:
        raise ConfigError(
            f"[{section}]: unknown setting(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(by_name))}"
        )
    kw: dict[str, Any] = {}
    for key, value in file_table.items():
        setting = by_name[key]
        kw[setting.target] = convert(setting, value, f"[{section}] {key}", base, from_cli=False)
    for key, value in flags.items():
        given = by_name.get(key)
        if given is None or value is None or value is False or value == []:
            continue
        kw[given.target] = convert(given, value, given.flag, None, from_cli=True)
    return kw


def build_relay_config(
    file_table: Mapping[str, Any], base: Path | None, flags: Mapping[str, Any]
) -> RelayConfig:
    """Merge a ``[relay]`` table and CLI flags (``None`` = not given) into a RelayConfig."""
    return RelayConfig(**merge_settings("relay", file_table, base, flags))


def build_edge_config(
    file_table: Mapping[str, Any], base: Path | None, flags: Mapping[str, Any]
) -> EdgeConfig:
    """Merge an ``[edge]`` table and CLI flags (``None`` = not given) into an EdgeConfig."""
    kw = merge_settings("edge", file_table, base, flags)
    if kw.get("relays"):
        kw["relay"] = kw["relays"][0]
    if "token_file" not in kw and os.environ.get(TOKEN_ENV):
        kw["token_file"] = None  # the token comes from the environment (auth.read_edge_token)
    for required in ("relay", "name", "token_file"):
        if required not in kw:
            flag = "--" + required.replace("_", "-")
            env = f", or ${TOKEN_ENV}" if required == "token_file" else ""
            raise ConfigError(f"edge: {flag} is required (or {required} in [edge]{env})")
    kw.setdefault("expose", ())
    return EdgeConfig(**kw)


def load_config_file(path: Path, section: str) -> tuple[dict[str, Any], Path]:
    """Read ``[section]`` of a TOML file. Returns (table, directory for relative paths).

    The file may hold ``[relay]`` and ``[edge]`` only: any other table or top-level key
    (``[relais]``) is an error, not silently ignored.
    """
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {str(path)!r} is a directory") from None
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r}: invalid TOML: {exc}") from None
    unknown = sorted(set(data).difference(_TABLES))
    if unknown:
        raise ConfigError(
            f"config file {str(path)!r}: unknown table(s) or key(s) "
            f"{', '.join(f'[{k}]' for k in unknown)}; expected [relay] and/or [edge]"
        )
    table = data.get(section, {})
    if not isinstance(table, dict):
        raise ConfigError(f"config file {str(path)!r}: [{section}] must be a table")
    return table, path.resolve().parent


# ---------------------------------------------------------------------------- configs


@dataclass(frozen=True, kw_only=True)
class RelayConfig:
    """Validated settings of ``quic-reverse relay`` (see :data:`RELAY_TABLE`)."""

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
    startup_grace: float = 30.0
    ping_interval: float = 10.0
    ping_timeout: float = 10.0
    max_streams: int = 10_000
    max_queued_opens: int = 10_000
    linger: float = 5.0
    balance: str = "least-streams"
    answer_timeout: float = 1.0
    backlog: int = 4096
    log_level: str = "info"
    alpn: str = DEFAULT_ALPN
    stack: str = "qh3"
    log_format: str = "text"
    metrics: tuple[str, int] | None = None
    auth_failure_burst: int = 20
    auth_failure_interval: float = 3.0
    udp_idle_timeout: float = 60.0
    max_udp_flows: int = 1024
    #: The fleet (tunnel/fleet.py): ``None`` = a relay on its own.
    registry: str | None = None
    registry_ttl: float = 10.0
    registry_heartbeat: float = 3.0
    advertise: tuple[str, int] | None = None
    fleet_token_file: Path | None = None
    fleet_ca: Path | None = None
    fleet_fingerprint: str | None = None

    def __post_init__(self) -> None:
        check_fleet(self)
        if self.self_signed and (self.cert or self.key):
            raise ConfigError("relay: use either --cert/--key or --self-signed, not both")
        if not self.self_signed:
            if self.cert is None and self.key is None:
                raise ConfigError(
                    "relay: a TLS certificate is required: --cert FILE --key FILE "
                    "(or --self-signed for development)"
                )
            if self.key is None:
                raise ConfigError("relay: --cert needs --key FILE (the certificate's private key)")
            if self.cert is None:
                raise ConfigError("relay: --key needs --cert FILE (the certificate)")
        if self.tokens is None:
            raise ConfigError("relay: --tokens FILE is required (edge name -> token)")
        seen: set[tuple[str, str, int]] = set()
        for fwd in self.forwards:
            if fwd.port != 0 and (fwd.protocol, fwd.host, fwd.port) in seen:
                kind = " (udp)" if fwd.protocol == "udp" else ""
                raise ConfigError(f"relay: two forwards listen on {fwd.host}:{fwd.port}{kind}")
            seen.add((fwd.protocol, fwd.host, fwd.port))
        for name in (
            "auth_timeout",
            "open_timeout",
            "ping_interval",
            "ping_timeout",
            "linger",
            "answer_timeout",
            "udp_idle_timeout",
        ):
            check_duration(name, getattr(self, name))
        check_count("max_udp_flows", self.max_udp_flows)
        check_choice("balance", self.balance, BALANCE_POLICIES)
        check_count("backlog", self.backlog)
        check_duration("grace", self.grace, allow_zero=True)
        check_duration("startup_grace", self.startup_grace, allow_zero=True)
        check_count("max_streams", self.max_streams)
        check_count("max_queued_opens", self.max_queued_opens, minimum=0)
        check_choice("stack", self.stack, STACKS)
        check_choice("log_level", self.log_level, LOG_LEVELS)
        if not self.alpn:
            raise ConfigError("alpn: must not be empty")


@dataclass(frozen=True, kw_only=True)
class EdgeConfig:
    """Validated settings of ``quic-reverse edge`` (see :data:`EDGE_TABLE`)."""

    #: The first relay (``relays[0]``; kept for callers that know one relay).
    relay: tuple[str, int]
    name: str
    #: ``None``: the token is in the environment variable :data:`TOKEN_ENV`.
    token_file: Path | None
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
    probe_interval: float = 1.0
    #: Every relay this edge keeps a session to (default: ``(relay,)``).
    relays: tuple[tuple[str, int], ...] = ()
    auth_retry: bool = False
    max_streams: int = 10_000
    service_timeout: float = 5.0
    grace: float = 5.0
    linger: float = 5.0
    log_level: str = "info"
    alpn: str = DEFAULT_ALPN
    stack: str = "auto"
    log_format: str = "text"
    metrics: tuple[str, int] | None = None
    proxy_protocol: tuple[str, ...] = ()
    udp_idle_timeout: float = 60.0
    max_udp_flows: int = 1024

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
        for service in self.proxy_protocol:
            if service not in names:
                raise ConfigError(
                    f"--proxy-protocol {service}: not an exposed service (--expose {service}=...)"
                )
        modes = [self.ca is not None, self.fingerprint is not None, self.insecure]
        if sum(modes) == 0:
            raise ConfigError(
                "edge: the relay's certificate must be verified: pass --ca FILE or "
                "--fingerprint SHA256 (or --insecure, development only)"
            )
        if sum(modes) > 1:
            raise ConfigError("edge: use exactly one of --ca, --fingerprint, --insecure")
        if self.fingerprint is not None:
            object.__setattr__(self, "fingerprint", fingerprint("fingerprint", self.fingerprint))
        for name in (
            "ping_interval",
            "ping_timeout",
            "idle_timeout",
            "connect_timeout",
            "backoff_initial",
            "backoff_cap",
            "probe_interval",
            "service_timeout",
            "linger",
            "udp_idle_timeout",
        ):
            check_duration(name, getattr(self, name))
        check_duration("grace", self.grace, allow_zero=True)
        check_count("max_streams", self.max_streams)
        check_count("max_udp_flows", self.max_udp_flows)
        if self.backoff_cap < self.backoff_initial:
            raise ConfigError("backoff_cap must be >= backoff_initial")
        if not self.relays:
            object.__setattr__(self, "relays", (self.relay,))
        elif self.relay != self.relays[0]:
            raise ConfigError("relay: relay must be the first of relays")
        for address in self.relays:
            if address[1] == 0:
                raise ConfigError("relay: port 0 cannot be dialled")
        if len(set(self.relays)) != len(self.relays):
            raise ConfigError("relay: the same relay is given twice")
        check_choice("stack", self.stack, EDGE_STACKS)
        check_choice("log_level", self.log_level, LOG_LEVELS)
        if not self.alpn:
            raise ConfigError("alpn: must not be empty")

    def exposed(self, service: str) -> Exposed | None:
        """The allow-list entry for ``service``, or ``None`` (never an arbitrary target)."""
        for entry in self.expose:
            if entry.service == service:
                return entry
        return None


# ---------------------------------------------------------------------------- files


def check_fleet(cfg: RelayConfig) -> None:
    """The fleet settings of a relay: all or none, and consistent."""
    given = [
        s.flag
        for s in RELAY_TABLE
        if s.name in ("advertise", "fleet_token_file", "fleet_ca", "fleet_fingerprint")
        and getattr(cfg, s.target) is not None
    ]
    if cfg.registry is None:
        if given:
            raise ConfigError(f"relay: {given[0]} is a fleet setting: it needs --registry")
        return
    if not cfg.registry.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(
            f"--registry: expected redis://HOST:PORT/DB (or rediss://, unix://), "
            f"got {cfg.registry!r}"
        )
    if cfg.fleet_token_file is None:
        raise ConfigError("relay: --registry needs --fleet-token-file FILE (the fleet secret)")
    if (cfg.fleet_ca is None) == (cfg.fleet_fingerprint is None):
        raise ConfigError(
            "relay: --registry needs one of --fleet-ca FILE or --fleet-fingerprint SHA256 "
            "(how peer relays' certificates are verified)"
        )
    check_duration("registry_ttl", cfg.registry_ttl)
    check_duration("registry_heartbeat", cfg.registry_heartbeat)
    if cfg.registry_heartbeat >= cfg.registry_ttl:
        raise ConfigError(
            f"relay: --registry-heartbeat ({cfg.registry_heartbeat:g}s) must be below "
            f"--registry-ttl ({cfg.registry_ttl:g}s)"
        )
    if cfg.advertise is None and cfg.listen[0] in ("0.0.0.0", "::", ""):
        raise ConfigError(
            f"relay: listening on {cfg.listen[0]}:{cfg.listen[1]} (every address): "
            "--advertise HOST:PORT must say which address peer relays dial"
        )


def check_stack_installed(flag: str, stack: str) -> None:
    """``--stack aioquic`` needs the optional extra: say how to get it, at start
    (``auto`` does not: without aioquic it stays on qh3, tunnel/edge.py)."""
    if stack != "auto" and importlib.util.find_spec(stack) is None:
        raise ConfigError(
            f"{flag} {stack}: the {stack} package is not installed; "
            f"pip install 'quic-reverse[{stack}]'"
        )


def _read(flag: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{flag} {str(path)!r}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{flag} {str(path)!r}: is a directory") from None
    except OSError as exc:
        raise ConfigError(f"{flag} {str(path)!r}: {exc.strerror}") from None


def load_server_certificate(cert: Path, key: Path) -> str:
    """Check the relay's certificate and key files before serving: both readable, PEM,
    and the key belongs to the certificate. Returns the certificate's SHA-256.

    Raises:
        ConfigError: naming ``--cert`` or ``--key`` and what is wrong with it.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert_pem, key_pem = _read("--cert", cert), _read("--key", key)
    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        certs = []
    if not certs:
        raise ConfigError(f"--cert {str(cert)!r}: no PEM certificate in the file")
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ConfigError(f"--key {str(key)!r}: the key is encrypted (a passphrase)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"--key {str(key)!r}: not a PEM private key") from None
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if certs[0].public_key().public_bytes(*raw) != private.public_key().public_bytes(*raw):
        raise ConfigError(
            f"--key {str(key)!r} does not belong to the certificate in --cert {str(cert)!r}"
        )
    return hashlib.sha256(certs[0].public_bytes(serialization.Encoding.DER)).hexdigest()


def check_ca_file(ca: Path) -> None:
    """The edge's ``--ca`` must be a readable PEM file with at least one certificate."""
    from cryptography import x509

    data = _read("--ca", ca)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise ConfigError(f"--ca {str(ca)!r}: no PEM certificate in the file")
