"""The relays' TLS: mutual TLS 1.3 under the cluster CA, done by the native module.

The relays' connections are not Python `ssl` sockets: the handshake, the records and
the copy loop are C (`_native.c`, OpenSSL), so that relaying a message costs a poll
wake-up and two system calls rather than a Python thread's wake-up and the GIL. What
is checked is what `hsmdifd.cluster.tls` checks for gRPC: TLS 1.3 only, a
certificate of the cluster CA required both ways, the server's naming `TARGET_NAME`;
the peer's node id is its certificate's CN, read by `tls.cert_node_id`.
"""

from __future__ import annotations

import socket
from typing import NewType

from hsmdifd.cluster import tls
from hsmdifd.engine.relay import _native

Context = NewType("Context", object)
"""A TLS context of one relay (the device's key and certificate, the cluster CA)."""


def server_context(creds: tls.DeviceCredentials) -> Context:
    return Context(_native.context(True, creds.cert_pem, creds.key_pem, creds.ca_pem))


def client_context(creds: tls.DeviceCredentials) -> Context:
    return Context(_native.context(False, creds.cert_pem, creds.key_pem, creds.ca_pem))


class Session:
    """TLS over a connected socket, which stays the caller's to shut down and close.

    The socket is non-blocking from the handshake on; use it only through this
    session or `splice.Splice` (a `socket.shutdown` from any thread wakes them).
    """

    def __init__(self, sock: socket.socket, handle: object) -> None:
        self.sock = sock
        self.handle = handle

    @classmethod
    def accept(cls, context: Context, sock: socket.socket, timeout: float) -> Session:
        """The server's side of the handshake; raises `OSError` (`TimeoutError`) on failure."""
        return cls(sock, _native.handshake(context, sock.fileno(), None, timeout))

    @classmethod
    def connect(cls, context: Context, sock: socket.socket, timeout: float) -> Session:
        """The client's side; the server's certificate must name `tls.TARGET_NAME`."""
        return cls(sock, _native.handshake(context, sock.fileno(), tls.TARGET_NAME, timeout))

    def peer_node_id(self) -> str:
        """The node id of the certificate the handshake verified; raises `tls.TlsError`."""
        return tls.cert_node_id(_native.peer_certificate(self.handle))

    def send_all(self, data: bytes, timeout: float) -> None:
        _native.send_all(self.handle, data, timeout)

    def recv_exact(self, size: int, timeout: float) -> bytes:
        """`size` bytes within `timeout` seconds; raises `OSError` otherwise."""
        return _native.recv_exact(self.handle, size, timeout)
