"""TLS helpers: development certificates and certificate fingerprints.

:func:`generate_self_signed` makes a self-signed **end-entity** certificate
(``CA:FALSE``, SAN ``DNS:localhost`` and ``IP:127.0.0.1`` by default, EC P-256).
rustls peers reject a server certificate marked ``CA:TRUE`` or one without a DNS
SAN, so this shape is what the Rust examples accept. These certificates are for
examples and tests only: nothing in the library falls back to them silently; a
caller must ask for one explicitly.

:func:`certificate_fingerprint` gives the lowercase hex SHA-256 of a certificate's
DER encoding, the format used for certificate pinning (``ClientTLS.pin_sha256``).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import logging
import os
import string
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import ConfigError

__all__ = [
    "certificate_fingerprint",
    "generate_self_signed",
    "normalize_fingerprint",
    "write_self_signed",
]

logger = logging.getLogger("quic_reverse.transport.tls")

_HEX = frozenset(string.hexdigits)


def generate_self_signed(
    hostnames: Iterable[str] = ("localhost",),
    ips: Iterable[str] = ("127.0.0.1",),
    *,
    days: int = 30,
) -> tuple[bytes, bytes]:
    """Generate a self-signed end-entity certificate for development.

    Returns ``(cert_pem, key_pem)``: an EC P-256 key (PKCS#8 PEM, unencrypted) and a
    certificate with ``basicConstraints CA:FALSE``, key usage digitalSignature,
    extended key usage serverAuth/clientAuth and a SAN listing ``hostnames`` (DNS)
    and ``ips`` (IP addresses).

    Raises:
        ConfigError: no name was given, or an entry of ``ips`` is not an IP address.
    """
    dns_names = [str(h) for h in hostnames]
    try:
        ip_addrs = [ipaddress.ip_address(str(ip)) for ip in ips]
    except ValueError as exc:
        raise ConfigError(f"invalid IP address for certificate SAN: {exc}") from exc
    if not dns_names and not ip_addrs:
        raise ConfigError("a certificate needs at least one DNS name or IP address")
    if days < 1:
        raise ConfigError("days must be >= 1")

    key = ec.generate_private_key(ec.SECP256R1())
    common_name = dns_names[0] if dns_names else str(ip_addrs[0])
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    san: list[x509.GeneralName] = [x509.DNSName(h) for h in dns_names]
    san += [x509.IPAddress(ip) for ip in ip_addrs]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    logger.info("generated a self-signed development certificate for %s", common_name)
    return cert_pem, key_pem


def write_self_signed(
    directory: str | os.PathLike[str],
    hostnames: Iterable[str] = ("localhost",),
    ips: Iterable[str] = ("127.0.0.1",),
) -> tuple[Path, Path]:
    """Generate a development certificate into ``directory``.

    Writes ``cert.pem`` and ``key.pem`` (the key readable by the owner only) and
    returns ``(cert_path, key_path)``.

    Raises:
        ConfigError: invalid names (see :func:`generate_self_signed`).
        OSError: the directory cannot be written.
    """
    cert_pem, key_pem = generate_self_signed(hostnames, ips)
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    cert_path = root / "cert.pem"
    key_path = root / "key.pem"
    cert_path.write_bytes(cert_pem)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key_pem)
    return cert_path, key_path


def certificate_fingerprint(pem_or_der: bytes) -> str:
    """Lowercase hex SHA-256 of a certificate's DER encoding.

    Accepts PEM (the first certificate is used) or DER bytes.

    Raises:
        ConfigError: the bytes are not a certificate.
    """
    data = bytes(pem_or_der)
    if b"-----BEGIN" in data:
        try:
            der = x509.load_pem_x509_certificate(data).public_bytes(serialization.Encoding.DER)
        except ValueError as exc:
            raise ConfigError(f"not a PEM certificate: {exc}") from exc
    else:
        try:
            x509.load_der_x509_certificate(data)
        except ValueError as exc:
            raise ConfigError(f"not a DER certificate: {exc}") from exc
        der = data
    return hashlib.sha256(der).hexdigest()


def normalize_fingerprint(text: str) -> str:
    """Normalise a SHA-256 fingerprint to 64 lowercase hex digits.

    Accepts colons, spaces and upper case (``AB:CD:...``) and an optional
    ``sha256:`` prefix.

    Raises:
        ConfigError: the text is not a SHA-256 fingerprint.
    """
    cleaned = text.strip()
    if cleaned.lower().startswith("sha256:"):
        cleaned = cleaned[len("sha256:") :]
    cleaned = cleaned.replace(":", "").replace(" ", "").lower()
    if len(cleaned) != 64 or not set(cleaned) <= _HEX:
        raise ConfigError(f"not a SHA-256 fingerprint (64 hex digits): {text!r}")
    return cleaned
