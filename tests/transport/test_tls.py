"""Development certificates, fingerprints and the TLS settings dataclasses (no network)."""

from __future__ import annotations

import hashlib
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from quic_reverse.errors import ConfigError
from quic_reverse.transport.quic import ClientTLS, ServerTLS, TransportOptions
from quic_reverse.transport.tls import (
    certificate_fingerprint,
    generate_self_signed,
    normalize_fingerprint,
    write_self_signed,
)


def test_dev_certificate_is_an_end_entity_with_localhost_sans() -> None:
    cert_pem, key_pem = generate_self_signed()
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    # rustls rejects a CA:TRUE server certificate: this one must be an end entity.
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca is False
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in list(eku)
    # Self-signed with the returned key.
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.public_numbers() == key.public_key().public_numbers()
    public.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
    assert cert.not_valid_before_utc < cert.not_valid_after_utc


def test_dev_certificate_custom_names_and_bad_input() -> None:
    cert_pem, _ = generate_self_signed(["relay.test", "alt.test"], ["::1"])
    san = (
        x509.load_pem_x509_certificate(cert_pem)
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    assert san.get_values_for_type(x509.DNSName) == ["relay.test", "alt.test"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("::1")]
    with pytest.raises(ConfigError):
        generate_self_signed(["localhost"], ["not-an-ip"])
    with pytest.raises(ConfigError):
        generate_self_signed([], [])
    # Two calls never share a key.
    assert generate_self_signed()[1] != generate_self_signed()[1]


def test_write_self_signed_protects_the_key(tmp_path: Path) -> None:
    cert_path, key_path = write_self_signed(tmp_path / "certs")
    assert cert_path.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert b"PRIVATE KEY" in key_path.read_bytes()
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600


def test_fingerprint_of_pem_and_der_agree() -> None:
    cert_pem, _ = generate_self_signed()
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    expected = hashlib.sha256(der).hexdigest()
    assert certificate_fingerprint(cert_pem) == expected
    assert certificate_fingerprint(der) == expected
    with pytest.raises(ConfigError):
        certificate_fingerprint(b"definitely not a certificate")
    with pytest.raises(ConfigError):
        certificate_fingerprint(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")


def test_normalize_fingerprint_accepts_common_spellings() -> None:
    fp = hashlib.sha256(b"x").hexdigest()
    colons = ":".join(fp[i : i + 2] for i in range(0, 64, 2)).upper()
    assert normalize_fingerprint(colons) == fp
    assert normalize_fingerprint(f"  sha256:{fp.upper()} ") == fp
    for bad in ("", fp[:-1], fp + "0", "zz" * 32):
        with pytest.raises(ConfigError):
            normalize_fingerprint(bad)


def test_tls_settings_validate_at_construction(tmp_path: Path) -> None:
    cert, key = write_self_signed(tmp_path)
    fp = certificate_fingerprint(cert.read_bytes())
    tls = ClientTLS(pin_sha256=fp.upper())
    assert tls.pin_sha256 == fp
    with pytest.raises(ConfigError):
        ClientTLS(pin_sha256="abc")
    with pytest.raises(ConfigError):
        ClientTLS(cafile=tmp_path / "missing.pem")
    with pytest.raises(ConfigError):
        ClientTLS(alpn=())
    assert ServerTLS(certfile=cert, keyfile=key).alpn == ("quic-reverse-example",)
    with pytest.raises(ConfigError):
        ServerTLS(certfile=cert, keyfile=tmp_path / "nope.pem")
    with pytest.raises(ConfigError):
        TransportOptions(max_streams=0)
    with pytest.raises(ConfigError):
        TransportOptions(stream_window=10)


@pytest.mark.parametrize("stack", ["qh3", "aioquic"])
def test_stack_configuration_bad_files_raise_config_error(stack: str, tmp_path: Path) -> None:
    """A missing CA file or a malformed certificate is a one-line ConfigError naming
    the file (a configuration problem, found before serving), not an OSError."""
    import importlib

    adapter = importlib.import_module(f"quic_reverse.transport.{stack}")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"CA file .*missing\.pem"):
        adapter.client_configuration(cafile=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match=r"junk\.pem: not a PEM or DER certificate"):
        adapter.server_configuration(str(junk), str(junk))
    config = adapter.client_configuration(verify=False)
    assert config.is_client and config.verify_mode == 0
