"""Bad input at the transport layer (issue 10): every case is one readable line
naming the file or address at fault, raised when the settings are made or the
server starts, never later at every peer's handshake."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import socket
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import quic_reverse.transport as transport_pkg
from quic_reverse.errors import ConfigError, TransportError
from quic_reverse.transport.base import Connection
from quic_reverse.transport.quic import ClientTLS, ServerTLS, Stack, connect, serve
from quic_reverse.transport.tls import (
    certificate_fingerprint,
    load_certificates,
    normalise_fingerprint,
    normalize_fingerprint,
    write_self_signed,
)
from tests.support.certs import ca_and_leaf
from tests.support.timing import LONG

STACKS: tuple[Stack, ...] = ("qh3", "aioquic")


async def _hold(conn: Connection) -> None:
    await conn.wait_closed()


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text
    assert "ParseError" not in text and "kind:" not in text  # no Rust debug text
    return text


# --- certificate and key files ------------------------------------------------


def test_certificate_and_key_that_do_not_match_fail_at_setup(tmp_path: Path) -> None:
    cert, _ = write_self_signed(tmp_path / "a")
    _, other_key = write_self_signed(tmp_path / "b")
    with pytest.raises(ConfigError) as info:
        ServerTLS(certfile=cert, keyfile=other_key)
    text = _one_line(info.value)
    assert str(cert) in text and str(other_key) in text and "do not match" in text


@pytest.mark.parametrize("stack", STACKS)
async def test_serve_refuses_a_mismatched_pair_before_binding(stack: Stack, tmp_path: Path) -> None:
    """Even when ServerTLS was made while the files still matched."""
    cert, key = write_self_signed(tmp_path / "a")
    tls = ServerTLS(certfile=cert, keyfile=key)
    _, other_key = write_self_signed(tmp_path / "b")
    key.write_bytes(other_key.read_bytes())
    with pytest.raises(ConfigError, match="do not match"):
        await serve("127.0.0.1", 0, tls=tls, on_connection=_hold, stack=stack)


@pytest.mark.parametrize(
    ("content", "name"),
    [
        (b"not a certificate\n", "garbage.pem"),
        (b"\x30\x03\x02\x01", "short.der"),  # DER that ends early: ParseError{ShortData}
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "bad.pem"),
    ],
)
def test_garbage_certificate_files_give_one_line_naming_the_file(
    tmp_path: Path, content: bytes, name: str
) -> None:
    cert, key = write_self_signed(tmp_path)
    bad = tmp_path / name
    bad.write_bytes(content)
    for make in (
        lambda: ClientTLS(cafile=bad),
        lambda: ServerTLS(certfile=bad, keyfile=key),
        lambda: load_certificates(bad),
    ):
        with pytest.raises(ConfigError) as info:
            make()
        text = _one_line(info.value)
        assert str(bad) in text and "not a PEM or DER certificate" in text
    with pytest.raises(ConfigError) as info:
        ServerTLS(certfile=cert, keyfile=bad)
    text = _one_line(info.value)
    assert str(bad) in text and "private key" in text
    with pytest.raises(ConfigError) as info:
        certificate_fingerprint(content)
    _one_line(info.value)


def test_missing_and_encrypted_files(tmp_path: Path) -> None:
    cert, key = write_self_signed(tmp_path)
    missing = tmp_path / "missing.pem"
    with pytest.raises(ConfigError, match=r"CA file not found: .*missing\.pem"):
        ClientTLS(cafile=missing)
    with pytest.raises(ConfigError, match=r"key file not found: .*missing\.pem"):
        ServerTLS(certfile=cert, keyfile=missing)
    pem_key = serialization.load_pem_private_key(key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(
        pem_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(ConfigError, match="encrypted"):
        ServerTLS(certfile=cert, keyfile=encrypted)


def _der_copy(pem: Path, name: str) -> Path:
    der = pem.with_name(name)
    der.write_bytes(
        x509.load_pem_x509_certificate(pem.read_bytes()).public_bytes(serialization.Encoding.DER)
    )
    return der


async def _connects(stack: Stack, cert: Path, key: Path, cafile: Path) -> None:
    async with await serve(
        "127.0.0.1",
        0,
        tls=ServerTLS(certfile=cert, keyfile=key),
        on_connection=_hold,
        stack=stack,
    ) as server:
        conn = await asyncio.wait_for(
            connect(*server.address, tls=ClientTLS(cafile=cafile), stack=stack), LONG
        )
        conn.close()
        await asyncio.wait_for(conn.wait_closed(), LONG)  # releases the client socket


@pytest.mark.parametrize("stack", STACKS)
async def test_ca_files_are_accepted_as_pem_or_der(stack: Stack, tmp_path: Path) -> None:
    # A self-signed end-entity certificate trusted directly, given in DER ...
    cert, key = write_self_signed(tmp_path)
    await _connects(stack, cert, key, _der_copy(cert, "cert.der"))
    # ... and a real CA verified by the stack, given in DER.
    ca, leaf, leaf_key = ca_and_leaf(tmp_path)
    await _connects(stack, leaf, leaf_key, _der_copy(ca, "ca.der"))
    # The server's own certificate and key may be DER too.
    der_key = tmp_path / "k.der"
    der_key.write_bytes(
        serialization.load_pem_private_key(leaf_key.read_bytes(), password=None).private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    await _connects(stack, _der_copy(leaf, "leaf.der"), der_key, ca)


# --- stack and address --------------------------------------------------------


async def test_missing_aioquic_is_a_config_error_with_the_install_hint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in [m for m in sys.modules if m == "aioquic" or m.startswith("aioquic.")]:
        monkeypatch.setitem(sys.modules, name, None)  # "import aioquic..." now fails
    monkeypatch.setitem(sys.modules, "aioquic", None)
    monkeypatch.delitem(sys.modules, "quic_reverse.transport.aioquic", raising=False)
    monkeypatch.delattr(transport_pkg, "aioquic", raising=False)
    cert, key = write_self_signed(tmp_path)
    with pytest.raises(ConfigError) as info:
        await serve(
            "127.0.0.1",
            0,
            tls=ServerTLS(certfile=cert, keyfile=key),
            on_connection=_hold,
            stack="aioquic",
        )
    assert "pip install 'quic-reverse[aioquic]'" in _one_line(info.value)
    with pytest.raises(ConfigError, match=r"quic-reverse\[aioquic\]"):
        await connect("127.0.0.1", 9, tls=ClientTLS(cafile=cert), stack="aioquic")


@pytest.mark.parametrize("stack", STACKS)
async def test_busy_udp_port_names_the_address(stack: Stack, tmp_path: Path) -> None:
    cert, key = write_self_signed(tmp_path)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        with pytest.raises(TransportError) as info:
            await serve(
                "127.0.0.1",
                port,
                tls=ServerTLS(certfile=cert, keyfile=key),
                on_connection=_hold,
                stack=stack,
            )
    assert _one_line(info.value) == f"address 127.0.0.1:{port} already in use"
    # The OS error stays reachable for programs that branch on errno (EADDRINUSE).
    cause = info.value.__cause__
    assert isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE


# --- fingerprints ---------------------------------------------------------------


def test_one_fingerprint_normaliser_for_every_spelling() -> None:
    fp = hashlib.sha256(b"x").hexdigest()
    colons = ":".join(fp[i : i + 2] for i in range(0, 64, 2))
    for text in (
        fp,
        fp.upper(),
        f"sha256:{fp}",
        f"SHA256:{fp.upper()}",
        f"SHA256:{colons.upper()}",
        f"sha256={colons}",
        f"  {colons}  ",
        colons.replace(":", " "),
    ):
        assert normalize_fingerprint(text) == fp, text
    assert normalise_fingerprint is normalize_fingerprint
    assert ClientTLS(pin_sha256=f"SHA256:{colons}").pin_sha256 == fp
    for bad in ("", "sha256:", fp[:-1], "md5:" + fp, "zz" * 32):
        with pytest.raises(ConfigError) as info:
            normalize_fingerprint(bad)
        _one_line(info.value)
