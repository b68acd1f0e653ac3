"""TLS with pinned certificates (docs/protocol.md §2.1).

A node started with `--tls` serves HTTPS with a self-signed certificate made at its first start. Clients
do not ask a CA about it: the grid file pins the certificate itself, as `fingerprint = "sha256:HEX"`, the
SHA-256 of the certificate's DER bytes. A client fetches the node's certificate once, checks it against
the pin, and from then on connects with an SSLContext whose only trust anchor is that certificate.

The certificate is built here from pycryptodome's ECDSA P-256 (already a dependency) rather than by the
`cryptography` package: it is one fixed DER structure, and nothing about it matters to security except
the key it carries, since clients trust it by hash alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import socket
import ssl
import time
from pathlib import Path

CERT_FILE = "tls-cert.pem"
KEY_FILE = "tls-key.pem"
FINGERPRINT_PREFIX = "sha256:"
_FINGERPRINT_RE = re.compile(r"sha256:[0-9a-fA-F]{64}")
MISMATCH = "certificate does not match the pinned fingerprint"


def fingerprint(der: bytes) -> str:
    """`sha256:` and the lowercase hex SHA-256 of a certificate's DER bytes."""
    return FINGERPRINT_PREFIX + hashlib.sha256(der).hexdigest()


def check_fingerprint(text: str) -> str:
    """The fingerprint in canonical form (lowercase hex); ValueError with a sentence if malformed."""
    if not _FINGERPRINT_RE.fullmatch(text):
        raise ValueError(f"a fingerprint is 'sha256:' followed by 64 hex digits, got {text!r}")
    return text.lower()


# --- the node's certificate ----------------------------------------------------------------------


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def _seq(*parts: bytes) -> bytes:
    return _der(0x30, b"".join(parts))


def _oid(dotted: str) -> bytes:
    nums = [int(x) for x in dotted.split(".")]
    out = bytearray([40 * nums[0] + nums[1]])
    for num in nums[2:]:
        chunk = [num & 0x7F]
        num >>= 7
        while num:
            chunk.append(0x80 | (num & 0x7F))
            num >>= 7
        out += bytes(reversed(chunk))
    return _der(0x06, bytes(out))


def _name(common_name: str) -> bytes:
    cn = _seq(_oid("2.5.4.3"), _der(0x0C, common_name.encode()))
    return _seq(_der(0x31, cn))


def make_self_signed(common_name: str) -> tuple[bytes, str]:
    """A new ECDSA P-256 key and a self-signed X.509 v3 certificate for it: (certificate DER, key PEM).

    Valid from a day ago to 9999-12-31 (RFC 5280's "no expiry": a pin does not expire), basicConstraints
    CA:FALSE (critical), so the certificate can vouch for no other certificate, even when a client
    trusts it as its anchor."""
    from Crypto.Hash import SHA256
    from Crypto.PublicKey import ECC
    from Crypto.Signature import DSS

    key = ECC.generate(curve="P-256")
    ecdsa_sha256 = _seq(_oid("1.2.840.10045.4.3.2"))
    serial = secrets.randbits(119) | (1 << 118)  # 15 bytes, minimal DER: first byte in 0x40..0x7f
    not_before = time.strftime("%y%m%d%H%M%SZ", time.gmtime(time.time() - 86400)).encode()
    basic_constraints = _seq(_oid("2.5.29.19"), _der(0x01, b"\xff"), _der(0x04, _seq()))
    tbs = _seq(
        _der(0xA0, _der(0x02, b"\x02")),  # version v3
        _der(0x02, serial.to_bytes(15, "big")),
        ecdsa_sha256,
        _name(common_name),
        _seq(_der(0x17, not_before), _der(0x18, b"99991231235959Z")),
        _name(common_name),
        key.public_key().export_key(format="DER"),
        _der(0xA3, _seq(basic_constraints)),
    )
    signature = DSS.new(key, "fips-186-3", encoding="der").sign(SHA256.new(tbs))
    cert = _seq(tbs, ecdsa_sha256, _der(0x03, b"\x00" + signature))
    return cert, key.export_key(format="PEM")


def load_or_create_certificate(directory: Path, common_name: str) -> tuple[Path, Path, str]:
    """The node's certificate and key files in `directory` (made on first use, the key 0600), and the
    certificate's fingerprint. A folder holding only one of the two files gets a new pair. Raises
    OSError, or ValueError when the files exist but do not load as a certificate and its key."""
    cert_path, key_path = directory / CERT_FILE, directory / KEY_FILE
    if not (cert_path.exists() and key_path.exists()):
        cert_der, key_pem = make_self_signed(common_name)
        # The key first: a certificate on disk always has its key beside it.
        _write_private(key_path, key_pem.encode() + b"\n", 0o600)
        _write_private(cert_path, ssl.DER_cert_to_PEM_cert(cert_der).encode(), 0o644)
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_path, key_path)
        der = ssl.PEM_cert_to_DER_cert(cert_path.read_text())
    except (ssl.SSLError, ValueError) as exc:
        raise ValueError(
            f"{cert_path} and {key_path} are not a certificate and its key ({exc}); delete both to get a new "
            "pair (clients must then pin the new fingerprint)"
        ) from None
    return cert_path, key_path, fingerprint(der)


def _write_private(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- the client's side ---------------------------------------------------------------------------


def host_port(url: str) -> tuple[str, int]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.hostname or "", parts.port or 443


def fetch_certificate(url: str, timeout: float) -> bytes:
    """The DER certificate a TLS server at `url` presents, unverified (blocking; the caller checks it
    against a pin). Raises OSError (ssl.SSLError included) when there is none to be had."""
    host, port = host_port(url)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection((host, port), timeout=timeout) as sock,
        context.wrap_socket(sock, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    if not der:
        raise ssl.SSLError("the server presented no certificate")
    return der


def pinned_context(cert_der: bytes) -> ssl.SSLContext:
    """A client context that accepts exactly this (self-signed) certificate and nothing else: it is the
    only trust anchor, hostnames are not checked (the pin names the node, not its address)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=cert_der)
    return context


def certificate_failure(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification error behind a connection error, if that is what caused it."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLCertVerificationError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
