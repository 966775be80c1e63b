"""Unit tests of the error conversion at the stack boundary (``transport/_errors.py``)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from quic_reverse.errors import ConfigError, StreamReset, TransportError
from quic_reverse.transport._errors import (
    StackCall,
    convert_stack_errors,
    is_certificate_alert,
    stack_call,
    valid_code,
)


class PanicException(BaseException):
    """Stands for pyo3's PanicException (what qh3's Rust core raises on a panic)."""


def test_raise_policy_converts_stack_and_os_errors() -> None:
    refused = r"^doing x: \[Errno 111\] refused$"
    with pytest.raises(TransportError, match=refused) as info, stack_call("doing x"):
        raise OSError(111, "refused")
    assert isinstance(info.value.__cause__, OSError)
    internals = r"^doing y: ValueError: stack internals$"
    with pytest.raises(TransportError, match=internals), stack_call("doing y"):
        raise ValueError("stack internals")
    with pytest.raises(TransportError, match="stack panic"), stack_call("doing p"):
        raise PanicException("unwrap on None")


def test_our_errors_and_control_flow_pass_through() -> None:
    for exc in (
        StreamReset(3, 4),
        ConfigError("bad"),
        asyncio.CancelledError(),
        KeyboardInterrupt(),
        SystemExit(2),
    ):
        with pytest.raises(type(exc)) as info, stack_call("doing z"):
            raise exc
        assert info.value is exc


def test_log_policy_swallows_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="quic_reverse.transport")
    guard = StackCall("feeding", on_error="log", warn_once=True)
    for i in range(3):
        with guard:
            raise RuntimeError(f"bad packet {i}")
    with guard:
        raise PanicException("panic")  # a panic is a stack failure too: swallowed
    records = [r for r in caplog.records if r.getMessage().startswith("feeding failed")]
    assert [r.levelno for r in records] == [logging.WARNING] + [logging.DEBUG] * 3
    assert records[0].exc_info is not None  # the first one with its traceback
    assert "bad packet 2" in records[2].getMessage()
    with pytest.raises(asyncio.CancelledError), guard:
        raise asyncio.CancelledError
    with pytest.raises(KeyboardInterrupt), guard:
        raise KeyboardInterrupt


def test_quiet_log_policy_logs_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="quic_reverse.transport")
    with StackCall("resetting", on_error="log"):
        raise RuntimeError("gone")
    (record,) = [r for r in caplog.records if "resetting failed" in r.getMessage()]
    assert record.levelno == logging.DEBUG


def test_no_exception_is_a_no_op() -> None:
    guard = stack_call("fine")
    with guard:
        value = 1
    assert value == 1
    assert convert_stack_errors is stack_call  # the old name still works


def test_certificate_alerts_and_codes() -> None:
    assert is_certificate_alert(0x100 + 42)  # bad_certificate
    assert is_certificate_alert(0x100 + 48)  # unknown_ca
    assert not is_certificate_alert(0x100 + 40)  # handshake_failure
    assert not is_certificate_alert(42)
    assert valid_code(7, "reset") == 7
    assert valid_code((1 << 62) - 1, "reset") == (1 << 62) - 1
    for bad in (-1, 1 << 62, True):
        assert valid_code(bad, "reset") == 0


def test_an_idle_timeout_is_a_lost_connection_not_a_close() -> None:
    """Both stacks end an idle connection with reason "Idle timeout": no close frame was
    exchanged, so the error is marked ``lost`` and the session never takes it for a
    peer's graceful close (a stateless reset is marked the same way in _client)."""
    from quic_reverse._control import graceful_close
    from quic_reverse.transport._errors import connection_closed

    idle = connection_closed("connection closed by peer", 0, "Idle timeout")
    assert idle.lost and not graceful_close(idle)
    closed = connection_closed("connection closed by peer", 0, "bye")
    assert not closed.lost and graceful_close(closed)
