"""Configuration loading shared by start-up, ``--check`` and reload on SIGHUP.

:func:`load_relay` / :func:`load_edge` read the ``--config`` file (if any), merge the
command-line flags over it and check everything that can be checked without serving:
types and values, the files it names (tokens, certificate and key, CA, token file),
forwards to edge names without a token, the QUIC stack being installed. ``--check``
runs exactly that and exits 0 or 2.

On SIGHUP (``systemctl reload``) the same loading runs again; a configuration that
fails is refused with one ERROR line and the running one stays in force. Otherwise:

relay
    tokens added, removed or changed (the sessions of an edge whose token was removed
    or changed are closed; other edges are untouched), forwards added (listening at
    once) or removed (no longer listening; their live connections finish), the log
    level, and every setting read per connection or per new session (timeouts,
    ``linger``, keep-alive of new sessions, the authentication limit).
edge
    the exposed services (``expose``, ``proxy_protocol``: used by the next open),
    the token (used by the next authentication), the log level, timeouts and backoff.

Settings bound when the process started (addresses, certificates, QUIC stack, ALPN,
``max_streams``, ``metrics``, ``log_format``) keep their running value; a reload that
changes one logs a WARNING naming it (restart to apply). Live connections that stay
valid are never touched.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..wire import CloseCode
from .auth import TokenStore, read_edge_token
from .config import (
    EDGE_SETTINGS,
    RELAY_SETTINGS,
    EdgeConfig,
    RelayConfig,
    build_edge_config,
    build_relay_config,
    check_ca_file,
    check_stack_installed,
    load_config_file,
    load_server_certificate,
)
from .logfmt import set_level

__all__ = [
    "EDGE_RESTART_ONLY",
    "RELAY_RESTART_ONLY",
    "checked_edge",
    "checked_relay",
    "load_edge",
    "load_relay",
    "reload_edge",
    "reload_relay",
]

log = logging.getLogger("quic_reverse.tunnel.reload")

#: Relay settings a reload cannot change (restart to apply).
RELAY_RESTART_ONLY = (
    "listen",
    "cert",
    "key",
    "self_signed",
    "state_dir",
    "max_streams",
    "max_queued_opens",
    "alpn",
    "stack",
    "log_format",
    "metrics",
    "backlog",
)
#: Edge settings a reload cannot change (restart to apply).
EDGE_RESTART_ONLY = (
    "relay",
    "relays",
    "name",
    "ca",
    "fingerprint",
    "insecure",
    "server_name",
    "idle_timeout",
    "max_streams",
    "alpn",
    "stack",
    "log_format",
    "metrics",
)


def _file(config: Path | None, section: str) -> tuple[dict[str, Any], Path | None]:
    if config is None:
        return {}, None
    return load_config_file(config, section)


def load_relay(config: Path | None, flags: dict[str, Any]) -> tuple[RelayConfig, TokenStore]:
    """The relay's configuration and tokens, fully checked.

    Raises:
        ConfigError: naming the setting or file at fault.
    """
    table, base = _file(config, "relay")
    cfg = build_relay_config(table, base, {k: flags.get(k) for k in RELAY_SETTINGS})
    return cfg, checked_relay(cfg)


def checked_relay(cfg: RelayConfig) -> TokenStore:
    """Check everything a relay with ``cfg`` needs before it serves (the stack is
    installed, the tokens file loads, every forward's edge has a token, certificate and
    key match) and return its tokens. The one check behind the CLI, ``--check``, a
    reload and :class:`quic_reverse.tunnel.api.Relay`.

    Raises:
        ConfigError: naming the setting or file at fault.
    """
    check_stack_installed("--stack", cfg.stack)
    assert cfg.tokens is not None  # checked by RelayConfig
    tokens = TokenStore.from_file(cfg.tokens)
    missing = [f for f in cfg.forwards if f.edge not in tokens.names]
    if missing:
        raise ConfigError(
            f"--forward {missing[0]}: edge {missing[0].edge!r} has no token in the "
            f"tokens file {str(cfg.tokens)!r}"
        )
    if not cfg.self_signed:
        assert cfg.cert is not None and cfg.key is not None  # checked by RelayConfig
        load_server_certificate(cfg.cert, cfg.key)
    return tokens


def load_edge(config: Path | None, flags: dict[str, Any]) -> tuple[EdgeConfig, str]:
    """The edge's configuration and token, fully checked (the token is never shown).

    Raises:
        ConfigError: naming the setting or file at fault.
    """
    table, base = _file(config, "edge")
    cfg = build_edge_config(table, base, {k: flags.get(k) for k in EDGE_SETTINGS})
    return cfg, checked_edge(cfg)


def checked_edge(cfg: EdgeConfig) -> str:
    """Check everything an edge with ``cfg`` needs before it dials (the stack is
    installed, the CA file loads, the token is readable) and return its token.

    Raises:
        ConfigError: naming the setting or file at fault.
    """
    check_stack_installed("--stack", cfg.stack)
    if cfg.ca is not None:
        check_ca_file(cfg.ca)
    return read_edge_token(cfg.token_file)


def _keep(old: Any, new: Any, names: tuple[str, ...], who: str) -> Any:
    """``new`` with the restart-only ``names`` taken from ``old`` (a WARNING per change;
    a name the configuration class does not have is skipped)."""
    kept = {}
    for name in names:
        before, after = getattr(old, name, None), getattr(new, name, None)
        if before != after:
            log.warning(
                "reload: %s setting %r changed; it applies after a restart (keeping the "
                "running value)",
                who,
                name,
            )
            kept[name] = before
    return dataclasses.replace(new, **kept) if kept else new


async def reload_relay(relay: Any, config: Path | None, flags: dict[str, Any]) -> bool:
    """Apply a new configuration to a running :class:`~.relay.Relay`; False (and the
    old configuration stays) if it is refused."""
    try:
        new, tokens = load_relay(config, flags)
    except ConfigError as exc:
        log.error("reload refused: %s; the running configuration stays in force", exc)
        return False
    old: RelayConfig = relay.config
    new = _keep(old, new, RELAY_RESTART_ONLY, "relay")
    added = [f for f in new.forwards if f not in old.forwards]
    removed = [f for f in old.forwards if f not in new.forwards]
    # A removed forward whose address an added one takes (same port, new target) must
    # stop listening first; the others stop only once every new forward listens.
    taken = {(f.host, f.port) for f in added if f.port != 0}
    first = [f for f in removed if (f.host, f.port) in taken]
    for fwd in first:
        relay.stop_forward(fwd)
    started = []
    try:
        for fwd in added:
            await relay.listen_forward(fwd)
            started.append(fwd)
    except OSError as exc:
        for fwd in started:
            relay.stop_forward(fwd)
        for fwd in first:  # put back what was stopped (best effort: the port was ours)
            try:
                await relay.listen_forward(fwd)
            except OSError as again:
                log.error("reload: cannot listen again on %s: %s", fwd, again)
        log.error("reload refused: %s; the running configuration stays in force", exc)
        return False
    for fwd in removed:
        if fwd not in first:
            relay.stop_forward(fwd)
    revoked = relay.tokens.revoked_by(tokens)
    relay.tokens = tokens
    relay.config = new
    relay.auth_limiter.configure(new.auth_failure_burst, new.auth_failure_interval)
    set_level(new.log_level)
    closing = [r for r in relay.registry if r.name in revoked]
    for replica in closing:
        log.info(
            "reload: edge %r (%s): its token was removed or changed; closing its session",
            replica.name,
            replica.describe(),
        )
    await asyncio.gather(
        *(relay._close_edge(r, CloseCode.NORMAL, "token revoked") for r in closing),
        return_exceptions=True,
    )
    log.info(
        "configuration reloaded: %d forward(s) added, %d removed, %d edge token(s) "
        "(%d session(s) closed for a removed or changed token), log level %s",
        len(added),
        len(removed),
        len(tokens.names),
        len(closing),
        new.log_level,
    )
    return True


def reload_edge(edge: Any, config: Path | None, flags: dict[str, Any]) -> bool:
    """Apply a new configuration to a running :class:`~.edge.Edge`; False (and the old
    configuration stays) if it is refused."""
    try:
        new, token = load_edge(config, flags)
    except ConfigError as exc:
        log.error("reload refused: %s; the running configuration stays in force", exc)
        return False
    old: EdgeConfig = edge.config
    new = _keep(old, new, EDGE_RESTART_ONLY, "edge")
    edge.config = new
    edge._token = token
    edge._backoff.initial, edge._backoff.cap = new.backoff_initial, new.backoff_cap
    set_level(new.log_level)
    before = {e.service for e in old.expose}
    after = {e.service for e in new.expose}
    log.info(
        "configuration reloaded: exposing %s (%d added, %d removed), log level %s",
        ", ".join(f"{e.service}={e.host}:{e.port}" for e in new.expose),
        len(after - before),
        len(before - after),
        new.log_level,
    )
    return True
