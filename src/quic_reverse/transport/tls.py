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

import dataclasses
import datetime
import hashlib
import ipaddress
import logging
import os
import string
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import ConfigError

__all__ = [
    "ServerCredentials",
    "certificate_fingerprint",
    "generate_self_signed",
    "load_certificates",
    "load_private_key",
    "load_server_credentials",
    "normalise_fingerprint",
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
    try:
        if b"-----BEGIN" in data:
            der = x509.load_pem_x509_certificate(data).public_bytes(serialization.Encoding.DER)
        else:
            x509.load_der_x509_certificate(data)
            der = data
    except ValueError:
        # cryptography's message is Rust debug text (ParseError { kind: ShortData }).
        raise ConfigError("not a PEM or DER certificate") from None
    return hashlib.sha256(der).hexdigest()


def normalize_fingerprint(text: str) -> str:
    """Normalise a SHA-256 certificate fingerprint to 64 lowercase hex digits.

    The one normaliser of fingerprints in quic-reverse (library, CLI, tunnel config).
    Accepts, case-insensitively: plain hex (``ab12...``), colon- or space-separated
    hex (``AB:12:...``, what ``openssl x509 -fingerprint`` prints) and any of these
    behind a ``sha256:`` / ``SHA256:`` / ``sha256=`` prefix, with surrounding blanks.

    Raises:
        ConfigError: the text is not a SHA-256 fingerprint (one line, shows the text).
    """
    if not isinstance(text, str):
        raise ConfigError(f"a SHA-256 fingerprint must be text, got {type(text).__name__}")
    cleaned = text.strip()
    for prefix in ("sha256:", "sha256="):
        if cleaned.lower().startswith(prefix):
            cleaned = cleaned[len(prefix) :].strip()
            break
    cleaned = cleaned.replace(":", "").replace(" ", "").lower()
    if len(cleaned) != 64 or not set(cleaned) <= _HEX:
        raise ConfigError(
            f"not a SHA-256 fingerprint (64 hex digits, colons and a sha256: prefix "
            f"allowed): {text!r}"
        )
    return cleaned


#: Alias of :func:`normalize_fingerprint` (British spelling used in some docs).
normalise_fingerprint = normalize_fingerprint


# -- loading certificates and keys (PEM or DER) --------------------------------


@dataclasses.dataclass(frozen=True)
class ServerCredentials:
    """A server's certificate chain (end-entity first) and its private key, checked
    to belong together (see :func:`load_server_credentials`)."""

    chain: tuple[x509.Certificate, ...]
    key: PrivateKeyTypes

    def chain_pem(self) -> bytes:
        """The chain as concatenated PEM blocks."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)

    def key_pem(self) -> bytes:
        """The key as unencrypted PKCS#8 PEM."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def _read(path: str | os.PathLike[str], what: str) -> bytes:
    name = os.fspath(path)
    try:
        with open(name, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {name}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {name}: {exc.strerror or exc}") from None


def load_certificates(
    path: str | os.PathLike[str], what: str = "certificate"
) -> list[x509.Certificate]:
    """The certificates in a PEM (one or more blocks) or DER (one certificate) file.

    The one loader for certificate and CA files (``what`` names the file's role in
    messages: "certificate", "CA file").

    Raises:
        ConfigError: one line naming the file: missing, unreadable, not PEM/DER, or
            holding no certificate.
    """
    data = _read(path, what)
    name = os.fspath(path)
    try:
        if b"-----BEGIN" in data:
            certs = x509.load_pem_x509_certificates(data)
        else:
            certs = [x509.load_der_x509_certificate(data)]
    except ValueError:
        # cryptography's message is Rust debug text (ParseError { kind: ShortData }).
        raise ConfigError(f"{what} {name}: not a PEM or DER certificate") from None
    if not certs:
        raise ConfigError(f"{what} {name}: holds no certificate")
    return certs


def load_private_key(path: str | os.PathLike[str]) -> PrivateKeyTypes:
    """The unencrypted private key in a PEM or DER file.

    Raises:
        ConfigError: one line naming the file: missing, unreadable, encrypted, or not
            a PEM/DER private key.
    """
    data = _read(path, "key file")
    name = os.fspath(path)
    try:
        if b"-----BEGIN" in data:
            return serialization.load_pem_private_key(data, password=None)
        return serialization.load_der_private_key(data, password=None)
    except TypeError:
        raise ConfigError(
            f"key file {name}: the key is encrypted (use an unencrypted key)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"key file {name}: not a PEM or DER private key") from None


def load_server_credentials(
    certfile: str | os.PathLike[str], keyfile: str | os.PathLike[str]
) -> ServerCredentials:
    """Load a server certificate chain and key and check that they belong together.

    Raises:
        ConfigError: a file cannot be loaded, or the key is not the certificate's
            (message names both files). Caught here, not at every peer's handshake.
    """
    chain = load_certificates(certfile, "certificate")
    key = load_private_key(keyfile)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if chain[0].public_key().public_bytes(der, spki) != key.public_key().public_bytes(der, spki):
        raise ConfigError(
            f"certificate {os.fspath(certfile)} and key {os.fspath(keyfile)} do not match "
            "(the key is not the certificate's private key)"
        )
    return ServerCredentials(tuple(chain), key)
