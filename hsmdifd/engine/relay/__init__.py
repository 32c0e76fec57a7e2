"""The guarded data plane: llama.cpp RPC through a per-lease mutual-TLS relay.

llama.cpp's RPC server has no authentication and serves whoever connects first, so
the rpc-worker listens on 127.0.0.1 only and the daemon holding the lease relays to it:

    root: engine child --TCP--> RootRelay (127.0.0.1:eph) ==TLS 1.3==> WorkerRelay
          (worker's cluster address:eph) --TCP--> rpc-worker (127.0.0.1:eph)

A `WorkerRelay` accepts one connection at a time, and only from the root holding
the lease: a certificate of the cluster CA whose node id is the holder's, followed
by the lease's 32-byte token as the first bytes. Anything else is closed without a
byte of the RPC server's, and a connection arriving while one is spliced is closed
at once rather than left in a backlog (unless the root already closed the live one:
llama.cpp reconnects at once, and the newcomer is admitted, after the same checks,
when the old one's teardown is done). The TLS and the copying are native code
(`_native.c` on the system's OpenSSL, see `secure` and `splice`): one thread per
connection polls both sockets and moves what is ready, without the GIL and with no
Python work per RPC message; Python decides only who may connect and when a relay
closes.

How the root uses it (the integration in `Cluster.acquire_leases` / `Models`): each
`pb.Lease` reply carries `endpoint` (the worker relay) and `token`. After acquiring
the leases, call

    relays = await open_root_relays(creds, [(lease.endpoint, lease.token, worker_node_id),
                                            ...], data_plane)

and give the engine child `relays.local_endpoints` (same order) instead of the
workers' endpoints. Keep `relays` with the held leases and `await relays.close()`
when the leases are released or the engine child ends (before or after StopRpc,
either is fine), so that nothing local can reach the workers any more. The local
endpoints accept connections from loopback only, one at a time; a connection
llama.cpp makes right after closing the previous one waits for the previous to be
closed all the way to the worker (otherwise the worker would refuse it as a second
connection).

`data_plane="plain"` (for a link the person trusts) keeps the same relays without
TLS and without the token: the rpc-worker is still reachable only through the relay,
one connection at a time, but anyone on the LAN can be that connection.

The modules: `secure` (the relays' TLS sessions), `splice` (the copy loop and socket
helpers), `listen` (the listening socket, the mode, refused connections), `worker`
(`WorkerRelay`), `root` (`RootRelay`, `open_root_relays`); `_native.c` under the first two.
"""

from hsmdifd.engine.relay.listen import DATA_PLANES
from hsmdifd.engine.relay.root import RootRelay, RootRelays, open_root_relays
from hsmdifd.engine.relay.splice import BUFFER_BYTES, Traffic
from hsmdifd.engine.relay.worker import TOKEN_BYTES, WorkerRelay

__all__ = [
    "BUFFER_BYTES",
    "DATA_PLANES",
    "TOKEN_BYTES",
    "RootRelay",
    "RootRelays",
    "Traffic",
    "WorkerRelay",
    "open_root_relays",
]
