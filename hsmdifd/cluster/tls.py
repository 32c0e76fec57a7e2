"""Per-device TLS credentials under a cluster CA that only secret holders can sign with.

The scheme, chosen over pinning fingerprints exchanged through the HMAC proofs: the
cluster CA's EC P-256 private key is derived from the cluster secret (HKDF-SHA256,
info "hsmdif cluster ca v1"), so every device computes the same CA and only a
device holding the secret can issue a certificate the others accept. A forged
certificate needs the CA key, which needs the secret: the same strength as a pin
carried in a MAC keyed by the secret, but there is nothing to exchange, store or
expire, and gRPC verifies it with its ordinary root-certificate options.

Each device makes its own P-256 key at first start (`STATE/tls/device.key`, mode
0600, never overwritten) and a certificate for it, CN = its node id, DNS SAN
`TARGET_NAME` and URI SAN `hsmdif:node:<id>`. The certificate is issued again
whenever it was not signed by the current CA (the secret changed), names another
node, or has less than a year left. The CA certificate itself is rebuilt in memory
at every start, byte for byte the same on every device (RFC 6979 signature); it is
never a file.

Clients connect with `TARGET_NAME` as the expected server name and learn the peer's
node id from its verified certificate (`peer_node_id_from_auth_context` for gRPC,
`cert_node_id` for `ssl` sockets). A leaked device key lets its holder act as that
device until the secret is changed, exactly as a leaked secret would.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import ssl
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hsmdifd.cluster.certificates import (
    ca_certificate,
    ca_private_key,
    common_name,
    device_certificate,
    is_current,
)

TARGET_NAME = "hsmdif"
"""The DNS name in every device certificate; clients expect it instead of a host name."""

CHANNEL_OPTIONS: list[tuple[str, Any]] = [("grpc.ssl_target_name_override", TARGET_NAME)]
"""Options for every peer `grpc.aio.secure_channel`."""


class TlsError(RuntimeError):
    """The TLS credentials cannot be made or read; `str()` says why and where."""


@dataclass(frozen=True)
class DeviceCredentials:
    """What this device needs to speak TLS with the others (PEM throughout)."""

    node_id: str
    ca_pem: bytes
    key_pem: bytes
    cert_pem: bytes

    def fingerprint(self) -> str:
        """SHA-256, hex, of this device's certificate in DER."""
        cert = x509.load_pem_x509_certificate(self.cert_pem)
        return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _write(path: Path, data: bytes, mode: int, *, replace: bool) -> None:
    """Write `path` whole or not at all with `mode` from the start; replacing what is
    there, or else FileExistsError if it exists."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as f:
            os.fchmod(f.fileno(), mode)  # whatever the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # atomic, and refuses an existing `path`
    finally:
        tmp.unlink(missing_ok=True)


def _device_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """This device's key in `path`, made on first use; never overwritten."""
    if not path.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        with contextlib.suppress(FileExistsError):  # another process made it first
            _write(path, pem, 0o600, replace=False)
    try:
        with path.open("rb") as f:
            if os.fstat(f.fileno()).st_mode & 0o077:
                raise TlsError(f"{path} is readable by others: chmod 600 {path}")
            loaded = serialization.load_pem_private_key(f.read(), password=None)
    except OSError as e:
        raise TlsError(f"cannot read this device's TLS key {path}: {e.strerror}") from None
    except ValueError as e:
        raise TlsError(f"{path} is not a PEM private key ({e}): remove it to make a new one") from e
    if not isinstance(loaded, ec.EllipticCurvePrivateKey) or loaded.curve.name != "secp256r1":
        raise TlsError(f"{path} is not an EC P-256 key: remove it to make a new one")
    return loaded


def device_credentials(secret: bytes, node_id: str, state_dir: Path) -> DeviceCredentials:
    """This device's key and certificate under the cluster CA of `secret`, made if missing.

    Blocking file and crypto work of a few milliseconds: call it at startup.
    """
    directory = state_dir / "tls"
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise TlsError(f"cannot create {directory}: {e.strerror}") from None
    ca_key = ca_private_key(secret)
    ca_cert = ca_certificate(ca_key)
    key = _device_key(directory / "device.key")
    cert_path = directory / "device.crt"
    cert: x509.Certificate | None
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError):
        cert = None
    if cert is None or not is_current(cert, node_id, key.public_key(), ca_cert):
        cert = device_certificate(node_id, TARGET_NAME, key.public_key(), ca_key, ca_cert)
        try:
            _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644, replace=True)
        except OSError as e:
            raise TlsError(f"cannot write {cert_path}: {e.strerror}") from None
    return DeviceCredentials(
        node_id=node_id,
        ca_pem=ca_cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
    )


# ---------------------------------------------------------------- gRPC


def server_credentials(creds: DeviceCredentials) -> grpc.ServerCredentials:
    """Mutual TLS for a peer server: a client needs a certificate of the cluster CA."""
    return grpc.ssl_server_credentials(
        [(creds.key_pem, creds.cert_pem)],
        root_certificates=creds.ca_pem,
        require_client_auth=True,
    )


def channel_credentials(creds: DeviceCredentials) -> grpc.ChannelCredentials:
    """For a peer channel: trust the cluster CA only, present this device's certificate."""
    return grpc.ssl_channel_credentials(
        root_certificates=creds.ca_pem,
        private_key=creds.key_pem,
        certificate_chain=creds.cert_pem,
    )


def peer_node_id_from_auth_context(auth_context: Mapping[str, Iterable[bytes]]) -> str | None:
    """The node id (CN) of the verified client certificate in `context.auth_context()`.

    None on a call without TLS or without a client certificate.
    """
    kind = list(auth_context.get("transport_security_type") or [])
    names = list(auth_context.get("x509_common_name") or [])
    if kind != [b"ssl"] or len(names) != 1:
        return None
    return names[0].decode("utf-8", errors="replace")


# ---------------------------------------------------------------- ssl sockets


@contextlib.contextmanager
def _chain_file(creds: DeviceCredentials) -> Iterator[str]:
    """A path `ssl.SSLContext.load_cert_chain` can read key and certificate from.

    `ssl` reads files only. On Linux the file is an anonymous memfd that never
    touches a disk; elsewhere a 0600 temporary file, removed at once.
    """
    data = creds.cert_pem + creds.key_pem
    if not sys.platform.startswith("linux"):
        with tempfile.NamedTemporaryFile(prefix="hsmdif-tls-") as f:  # 0600
            f.write(data)
            f.flush()
            yield f.name
        return
    fd = os.memfd_create("hsmdif-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _context(creds: DeviceCredentials, purpose: int) -> ssl.SSLContext:
    context = ssl.SSLContext(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=creds.ca_pem.decode("ascii"))
    with _chain_file(creds) as path:
        context.load_cert_chain(path)
    return context


def server_context(creds: DeviceCredentials) -> ssl.SSLContext:
    """TLS 1.3 server side: the client must show a certificate of the cluster CA."""
    context = _context(creds, ssl.PROTOCOL_TLS_SERVER)
    # No session tickets: nothing is resumed, and no post-handshake message reaches
    # a reader while another thread writes on the same connection.
    context.num_tickets = 0
    return context


def client_context(creds: DeviceCredentials) -> ssl.SSLContext:
    """TLS 1.3 client side: connect with `server_hostname=TARGET_NAME`."""
    context = _context(creds, ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = True
    return context


def cert_node_id(der_or_ssl_socket: bytes | ssl.SSLSocket) -> str:
    """The node id (CN) of a peer certificate that the TLS handshake verified.

    Raises `TlsError` when there is no certificate or it names no node.
    """
    der = (
        der_or_ssl_socket.getpeercert(binary_form=True)
        if isinstance(der_or_ssl_socket, ssl.SSLSocket)
        else der_or_ssl_socket
    )
    if not der:
        raise TlsError("the peer showed no certificate")
    try:
        name = common_name(x509.load_der_x509_certificate(der))
    except ValueError as e:
        raise TlsError(f"the peer's certificate cannot be read: {e}") from e
    if not name:
        raise TlsError("the peer's certificate names no node")
    return name
