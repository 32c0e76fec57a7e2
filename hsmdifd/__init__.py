"""hsmdifd: the HSM-DIF daemon."""

__version__ = "0.1.0"

import os as _os

# gRPC's core logs every failed TLS handshake at INFO: a device on the LAN without the
# secret would fill the journal. Its errors still show.
_os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
