"""Validators shared by the library's :class:`~quic_reverse.Config` and the tunnel's
settings (CLI flags and TOML), so a value is checked, and its error worded, one way.

Each takes the setting's name as the caller wants it shown (``open_timeout``,
``--open-timeout`` or ``[relay] open_timeout``) and raises
:class:`~quic_reverse.errors.ConfigError` whose message names it and the expected
type or range.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .errors import ConfigError

__all__ = [
    "check_choice",
    "check_count",
    "check_duration",
    "check_port",
    "fingerprint",
    "type_name",
]


def type_name(value: object) -> str:
    """The TOML-ish name of a value's type, for "expected X, got Y" messages."""
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array"}
    return names.get(type(value), "table" if isinstance(value, dict) else type(value).__name__)


def check_duration(
    name: str, value: object, *, allow_zero: bool = False, allow_none: bool = False
) -> float | None:
    """A number of seconds: finite, > 0 (or >= 0 with ``allow_zero``); returns it as float."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a number of seconds, got {value!r} ({type_name(value)})")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be a finite number of seconds {bound}, got {value!r}")
    return float(value)


def check_count(name: str, value: object, *, minimum: int = 1) -> int:
    """An integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r} ({type_name(value)})")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value!r}")
    return value


def check_port(name: str, value: object, *, allow_zero: bool) -> int:
    """A TCP/UDP port: 1..65535 (0..65535 with ``allow_zero``: "pick a free one")."""
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 65535:
        raise ConfigError(f"{name}: port must be an integer in {low}..65535, got {value!r}")
    return value


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """One of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def fingerprint(name: str, value: object) -> str:
    """A SHA-256 certificate fingerprint (hex, colons/spaces/``sha256:`` prefix allowed),
    normalised to 64 lowercase hex digits by the transport's one normaliser."""
    from .transport.tls import normalize_fingerprint

    if not isinstance(value, str):
        raise ConfigError(f"{name}: expected a string, got {type_name(value)}")
    try:
        return normalize_fingerprint(value)
    except ConfigError:
        raise ConfigError(
            f"{name}: expected a SHA-256 as 64 hex digits (colons or a sha256: prefix "
            f"allowed), got {value!r}"
        ) from None
