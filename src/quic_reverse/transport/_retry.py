"""Admission of new connections on a server: stateless checks before any state.

A server creates a connection (and takes a handshake slot) for a client's first
Initial. Anybody can send datagrams that look like Initials, from any source
address, so two stateless checks come first (RFC 9000 §8.1, RFC 9001 §5.2):

* :func:`initial_decrypts`: the Initial's packet protection is removed with the
  keys derived from its destination connection id, as the stack would. A datagram
  that does not decrypt (random bytes with an Initial's first byte) is dropped
  without allocating anything and without an answer. This costs a few HMACs and two
  AES operations, far less than a stack connection object;
* address validation with Retry (:class:`RetryTokens`, :func:`encode_retry`): while
  the server is busy (many handshakes in progress) an Initial without a valid token
  is answered with a Retry carrying an HMAC-protected token bound to the client's
  address, its original destination connection id and an expiry. Only an Initial
  that comes back with such a token gets a handshake slot, so spoofed source
  addresses cannot fill the slots.

Everything here is stack-neutral (both stacks speak the same wire format) and uses
only :mod:`hmac` and ``cryptography``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import struct
import time
from typing import Any, NamedTuple

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "DEFAULT_RETRY_THRESHOLD",
    "QUIC_V1",
    "QUIC_V2",
    "InitialHeader",
    "RetryTokens",
    "encode_retry",
    "initial_decrypts",
    "parse_initial",
]

QUIC_V1 = 0x00000001
QUIC_V2 = 0x6B3343CF

#: Handshakes in progress from which a server validates new clients' addresses with
#: Retry first (one extra round trip for them; none for anybody while it is quiet).
DEFAULT_RETRY_THRESHOLD = 32

#: Seconds a Retry token stays valid (the client answers a Retry at once).
RETRY_TOKEN_LIFETIME = 10.0

# Per-version constants: initial salt (RFC 9001 §5.2 / RFC 9369 §3.3.1), HKDF label
# prefix, long-header packet types of Initial and Retry, Retry integrity key and nonce.
_VERSIONS: dict[int, tuple[bytes, str, int, int, bytes, bytes]] = {
    QUIC_V1: (
        bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a"),
        "quic",
        0,
        3,
        bytes.fromhex("be0c690b9f66575a1d766b54e368c84e"),
        bytes.fromhex("461599d35d632bf2239825bb"),
    ),
    QUIC_V2: (
        bytes.fromhex("0dede3def700a6db819381be6e269dcbf9bd2ed9"),
        "quicv2",
        1,
        0,
        bytes.fromhex("8fb4b01b56ac48e260fbcbcead7ccc92"),
        bytes.fromhex("d86969bc2d7c6d9990efb04a"),
    ),
}

_TOKEN_MAGIC = b"qrR1"
_TOKEN_MAC = 16


class InitialHeader(NamedTuple):
    """The unprotected fields of a client Initial (long header)."""

    version: int
    dcid: bytes
    scid: bytes
    token: bytes
    #: Offset of the (protected) packet number.
    pn_offset: int
    #: Offset just past this packet (the Length field counted from ``pn_offset``).
    end: int


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    first = data[pos]
    size = 1 << (first >> 6)
    if pos + size > len(data):
        raise ValueError("truncated varint")
    value = first & 0x3F
    for i in range(1, size):
        value = (value << 8) | data[pos + i]
    return value, pos + size


def parse_initial(data: bytes) -> InitialHeader | None:
    """The header of the Initial packet at the start of ``data``, None if it is not
    one (unknown version, other packet type, fields out of bounds)."""
    try:
        first = data[0]
        if first & 0xC0 != 0xC0:
            return None
        version = int.from_bytes(data[1:5], "big")
        constants = _VERSIONS.get(version)
        if constants is None or (first >> 4) & 0x03 != constants[2]:
            return None
        pos = 5
        dcid_len = data[pos]
        if dcid_len > 20:
            return None
        dcid = data[pos + 1 : pos + 1 + dcid_len]
        pos += 1 + dcid_len
        scid_len = data[pos]
        if scid_len > 20:
            return None
        scid = data[pos + 1 : pos + 1 + scid_len]
        pos += 1 + scid_len
        token_len, pos = _varint(data, pos)
        token = data[pos : pos + token_len]
        pos += token_len
        length, pos = _varint(data, pos)
    except (IndexError, ValueError):
        return None
    end = pos + length
    if len(dcid) != dcid_len or len(token) != token_len or end > len(data) or length < 20:
        return None
    return InitialHeader(version, bytes(dcid), bytes(scid), bytes(token), pos, end)


def _expand_label(secret: bytes, label: str, length: int) -> bytes:
    full = b"tls13 " + label.encode()
    info = struct.pack("!HB", length, len(full)) + full + b"\x00"
    # HKDF-Expand for length <= 32 is a single HMAC block.
    return hmac.digest(secret, info + b"\x01", hashlib.sha256)[:length]


def initial_decrypts(data: bytes, header: InitialHeader) -> bool:
    """True if the Initial packet's protection can be removed with the client
    Initial keys of its destination connection id (RFC 9001 §5.2-5.4)."""
    salt, prefix = _VERSIONS[header.version][:2]
    initial_secret = hmac.digest(salt, header.dcid, hashlib.sha256)
    client_secret = _expand_label(initial_secret, "client in", 32)
    key = _expand_label(client_secret, f"{prefix} key", 16)
    iv = _expand_label(client_secret, f"{prefix} iv", 12)
    hp = _expand_label(client_secret, f"{prefix} hp", 16)
    pn_offset = header.pn_offset
    sample = data[pn_offset + 4 : pn_offset + 20]
    if len(sample) != 16:
        return False
    encryptor = Cipher(algorithms.AES(hp), modes.ECB()).encryptor()
    mask = encryptor.update(sample) + encryptor.finalize()
    first = data[0] ^ (mask[0] & 0x0F)
    pn_length = (first & 0x03) + 1
    pn_bytes = bytes(data[pn_offset + i] ^ mask[1 + i] for i in range(pn_length))
    packet_number = int.from_bytes(pn_bytes, "big")
    aad = bytes([first]) + data[1:pn_offset] + pn_bytes
    nonce = (int.from_bytes(iv, "big") ^ packet_number).to_bytes(12, "big")
    try:
        AESGCM(key).decrypt(nonce, data[pn_offset + pn_length : header.end], aad)
    except Exception:  # InvalidTag, or a payload shorter than the tag
        return False
    return True


def _address_bytes(addr: Any) -> bytes:
    try:
        host = ipaddress.ip_address(str(addr[0]).split("%", 1)[0]).packed
    except ValueError:
        host = str(addr[0]).encode()
    return host + int(addr[1]).to_bytes(2, "big")


class RetryTokens:
    """Makes and checks Retry tokens: ``magic | expiry | len | odcid | MAC``.

    The MAC (HMAC-SHA256, truncated to 16 bytes) covers the client address, the
    expiry, the original destination connection id and the Retry's source
    connection id (which the client's next Initial carries as its destination), so a
    token is useless from another address, after its expiry, or for another Retry.
    """

    def __init__(self, key: bytes, *, lifetime: float = RETRY_TOKEN_LIFETIME) -> None:
        self._key = key
        self._lifetime = lifetime

    def _mac(self, addr: Any, expiry: bytes, odcid: bytes, rscid: bytes) -> bytes:
        message = _address_bytes(addr) + expiry + bytes([len(odcid)]) + odcid + rscid
        return hmac.digest(self._key, message, hashlib.sha256)[:_TOKEN_MAC]

    def create(self, addr: Any, odcid: bytes, rscid: bytes) -> bytes:
        expiry = struct.pack("!Q", int((time.time() + self._lifetime) * 1000))
        mac = self._mac(addr, expiry, odcid, rscid)
        return _TOKEN_MAGIC + expiry + bytes([len(odcid)]) + odcid + mac

    @staticmethod
    def is_ours(token: bytes) -> bool:
        """True if ``token`` has this class's format (other tokens, e.g. a peer stack's
        NEW_TOKEN, are treated as no token at all)."""
        return token.startswith(_TOKEN_MAGIC) and len(token) >= len(_TOKEN_MAGIC) + 9 + _TOKEN_MAC

    def validate(self, addr: Any, token: bytes, rscid: bytes) -> bytes | None:
        """The original destination connection id if ``token`` is valid for a client
        at ``addr`` whose Initial carries ``rscid``; None otherwise."""
        if not self.is_ours(token):
            return None
        pos = len(_TOKEN_MAGIC)
        expiry = token[pos : pos + 8]
        odcid_len = token[pos + 8]
        odcid = token[pos + 9 : pos + 9 + odcid_len]
        mac = token[pos + 9 + odcid_len :]
        if len(odcid) != odcid_len or len(mac) != _TOKEN_MAC:
            return None
        if not hmac.compare_digest(mac, self._mac(addr, expiry, odcid, rscid)):
            return None
        if struct.unpack("!Q", expiry)[0] < time.time() * 1000:
            return None
        return odcid


def encode_retry(version: int, *, dcid: bytes, scid: bytes, odcid: bytes, token: bytes) -> bytes:
    """A Retry packet (RFC 9000 §17.2.5) with its integrity tag (RFC 9001 §5.8)."""
    _, _, _, retry_type, key, nonce = _VERSIONS[version]
    first = 0xC0 | (retry_type << 4) | (os.urandom(1)[0] & 0x0F)
    packet = (
        bytes([first])
        + version.to_bytes(4, "big")
        + bytes([len(dcid)])
        + dcid
        + bytes([len(scid)])
        + scid
        + token
    )
    pseudo = bytes([len(odcid)]) + odcid + packet
    tag = AESGCM(key).encrypt(nonce, b"", pseudo)
    return packet + tag
