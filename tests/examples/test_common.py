"""The examples' shared helpers (``examples/_common.py``), in-process: which session
ends count as normal, how failures read, which certificate files are accepted.

The scripts themselves run as subprocesses in ``test_examples.py``; these checks need
no process and run in ``make test-fast``.
"""

from __future__ import annotations

import importlib
import ssl
import sys
from pathlib import Path
from types import ModuleType

import pytest

from quic_reverse import CloseCode, ConnectionClosed, Disconnected, SessionClosed
from quic_reverse.transport.tls import write_self_signed

from ._proc import EXAMPLES


@pytest.fixture(scope="module")
def common() -> ModuleType:
    """``examples/_common.py``, imported the way the scripts import it."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        return importlib.import_module("_common")
    finally:
        sys.path.remove(str(EXAMPLES))


def lost(closed: ConnectionClosed) -> Disconnected:
    """A lost session whose cause is ``closed``, as the session reports it."""
    exc = Disconnected(f"connection lost: {closed}")
    exc.__cause__ = closed
    return exc


@pytest.mark.parametrize(
    ("exc", "normal"),
    [
        (SessionClosed("session closed by peer", code=CloseCode.NORMAL), True),
        (SessionClosed("session closed"), True),
        (SessionClosed("session closed by peer", code=CloseCode.ERROR), False),
        (lost(ConnectionClosed("connection closed by peer (code 0x0)", error_code=0)), True),
        (ConnectionClosed("connection closed by peer (code 0x0)", error_code=0), True),
        (lost(ConnectionClosed("closed (code 0x7)", error_code=7)), False),
        (lost(ConnectionClosed("closed", error_code=0, reason="Idle timeout", lost=True)), False),
        (Disconnected("keep-alive failed"), False),
    ],
)
def test_peer_ended_normally(common: ModuleType, exc: Exception, normal: bool) -> None:
    """A close with code 0 or a NORMAL session close ends the edge normally; an error
    code, an idle timeout or a lost keep-alive does not."""
    assert common.peer_ended_normally(exc) is normal


def test_describe_says_why_the_peer_closed(common: ModuleType) -> None:
    """A closed connection behind an error is told in words, never as a repr."""
    text = common.describe(lost(ConnectionClosed("x", error_code=0x128, reason="No common ALPN")))
    assert text == (
        "the peer closed the connection: No common ALPN (do both sides use the same --alpn?) "
        "[QUIC error code 0x128]"
    )
    assert common.describe(Disconnected("keep-alive failed")) == "keep-alive failed"


def test_ca_file_takes_pem_and_der_and_refuses_the_rest(common: ModuleType, tmp_path: Path) -> None:
    """One loader for every ``--ca``: PEM or DER used as they are (the library reads
    both), anything else a status-2 error naming the option."""
    cert, key = write_self_signed(tmp_path / "pem")
    assert common.ca_file(cert) == cert

    der = tmp_path / "relay.der"
    der.write_bytes(ssl.PEM_cert_to_DER_cert(cert.read_text("ascii")))
    assert common.ca_file(der) == der

    for bad, words in [
        (key, "not a PEM or DER certificate"),  # a key is not a certificate
        (tmp_path / "missing.pem", "no such file"),
        (tmp_path, "cannot read it"),
    ]:
        with pytest.raises(common.ExampleError) as info:
            common.ca_file(bad)
        assert info.value.status == common.EXIT_USAGE
        assert str(info.value).startswith(f"--ca {bad}: {words}")
