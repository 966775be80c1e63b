"""``quic-reverse cert``: a private CA and a relay certificate signed by it.

Writes into ``--dir`` (created mode 700 if missing):

* ``ca.pem`` (give it to the edges: ``--ca ca.pem``) and ``ca.key`` (mode 600; keep it
  off the relay if you can). An existing CA pair in the directory is reused, so a
  second run issues a new relay certificate that edges already trust.
* ``relay.crt`` and ``relay.key`` (mode 600): the relay's ``--cert`` / ``--key``, valid
  for every ``--name`` (DNS) and ``--ip`` given, for ``--days`` days.

Keys are ECDSA P-256. Nothing here talks to the network.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import ConfigError

__all__ = ["IssuedFiles", "issue_relay_certificate"]


@dataclass(frozen=True)
class IssuedFiles:
    ca_cert: Path
    ca_key: Path
    cert: Path
    key: Path
    ca_created: bool


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_ca(
    cert_path: Path, key_path: Path
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(
            f"cert: existing CA in {str(cert_path.parent)!r} unusable: {exc}"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"cert: {str(key_path)!r} is not an ECDSA key")
    return cert, key


def issue_relay_certificate(
    directory: Path, names: list[str], ips: list[str], *, days: int = 825
) -> IssuedFiles:
    """Create (or reuse) the CA in ``directory`` and issue a relay certificate.

    Raises:
        ConfigError: no name or IP, a malformed IP, bad ``days``, an unusable existing CA.
    """
    if not names and not ips:
        raise ConfigError("cert: give at least one --name DNS-NAME or --ip ADDRESS")
    if not 1 <= days <= 3650:
        raise ConfigError(f"cert: --days must be 1-3650, got {days}")
    try:
        addresses = [ipaddress.ip_address(ip) for ip in ips]
    except ValueError as exc:
        raise ConfigError(f"cert: --ip: {exc}") from None
    for name in names:
        if not name or any(c.isspace() for c in name) or len(name) > 253:
            raise ConfigError(f"cert: --name {name!r}: not a DNS name")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_cert_path, ca_key_path = directory / "ca.pem", directory / "ca.key"
    now = datetime.datetime.now(datetime.UTC)
    created = not (ca_cert_path.exists() and ca_key_path.exists())
    if created:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "quic-reverse relay CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        _write_private(ca_key_path, _key_pem(ca_key))
        ca_cert_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    else:
        ca_cert, ca_key = _load_ca(ca_cert_path, ca_key_path)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    sans += [x509.IPAddress(a) for a in addresses]
    common = names[0] if names else str(addresses[0])
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = directory / "relay.crt", directory / "relay.key"
    _write_private(key_path, _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return IssuedFiles(ca_cert_path, ca_key_path, cert_path, key_path, created)
