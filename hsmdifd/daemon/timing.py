"""Every timing constant of the daemon, in one place so tests can shrink them.

The configuration's `[timing]` section takes its defaults from here.
"""

# Membership (used by the cluster plane).
HEARTBEAT_INTERVAL = 0.5
"""Seconds between heartbeats to each peer."""
DEAD_AFTER = 1.5
"""Seconds without a heartbeat after which a peer is dead."""
MDNS_TTL = 120
"""TTL, in seconds, of the mDNS records this device announces."""
UNPROVEN_TIMEOUT = 30.0
"""Seconds an announced address gets to prove it holds the cluster secret before it is
forgotten."""
HINT_INTERVAL = 1.0
"""Seconds between new announced addresses followed, past a small burst."""
MDNS_RESOLVE_TIMEOUT = 3.0
"""Seconds an mDNS look-up of an announced service gets."""
PROOF_WINDOW = 30.0
"""Seconds a peer request proof stays good: older ones are stale, newer than the clock
by more than this are refused as clock skew, and nonces are remembered this long."""
HELLO_BACKOFF_MAX = 8.0
"""Seconds at most between two challenges to an announced address that does not prove
itself (the pause doubles from a heartbeat interval)."""
KEEPALIVE_FLOOR = 1.0
"""Seconds at least between gRPC keepalive pings on peer connections, and for their
answers (twice the heartbeat interval above that)."""
PING_FLOOR = 0.5
"""Seconds at least the peer server lets pass between a client's pings."""

# Lifecycle.
LOG_EVERY = 10.0
"""Seconds between two log lines of one kind that may repeat (refusals, floods)."""
SHUTDOWN_GRACE = 5.0
"""Seconds a graceful shutdown waits for in-flight requests before cancelling them."""
CHILD_STOP_TIMEOUT = 3.0
"""Seconds a child process gets after SIGTERM before SIGKILL."""
ENGINE_START_TIMEOUT = 30.0
"""Seconds the engine child gets to open its socket."""
DEVICE_REFRESH = 2.0
"""Seconds between measurements of this device's free memory and load."""
LEASE_TIMEOUT = 30.0
"""Seconds the root waits for a worker to start (or end) an RPC lease."""
LEASE_RETRY = 5.0
"""Seconds the root keeps asking a worker that refuses a lease because its view of the
root or the policy lags behind (views agree within a heartbeat or two)."""
RPC_CONNECT_TIMEOUT = 5.0
"""Seconds to reach an RPC endpoint before registering it with llama.cpp."""
RPC_LISTEN_TIMEOUT = 30.0
"""Seconds an rpc-worker gets to start listening."""
RELAY_HANDSHAKE_TIMEOUT = 5.0
"""Seconds a connection to a lease's relay gets to finish TLS and send its token."""
RELAY_LINGER = 5.0
"""Seconds a relayed connection, closed on one side, waits for the other side's close."""
ACCEPT_PAUSE = 1.0
"""Seconds a relay stops accepting after accept() failed (out of descriptors, say)."""
WATCHDOG_FRACTION = 0.5
"""WATCHDOG=1 is sent at this fraction of WATCHDOG_USEC."""
RPC_PROBE_TIMEOUT = 0.5
"""Seconds an RPC worker's endpoint gets to accept a connection, to name which worker
stopped answering when a load or an answer fails."""

# Models.
HEADER_SECONDS = 5.0
"""Seconds a GGUF header may take to read, checked between entries: a file on a stalled
or very slow disk is refused rather than holding the model lock."""
SPEED_BENCHMARK = 0.3
"""Seconds the memory-bandwidth benchmark runs (its best repetition counts)."""

# Generation.
PREFILL_CHUNK = 0.03
"""Seconds of prompt evaluation between two looks at whether the request was cancelled:
a cancelled request frees the engine well within 100 ms at any stage (or within two
evaluations of one token, for a model that takes longer than that for one)."""
STREAM_INTERVAL = 0.05
"""Seconds an answer's text is gathered before it is passed on (the first piece goes at
once): a message per 50 ms instead of one per token through every hop, 20 updates a
second on the screen."""
NEW_ROOT = 15.0
"""Seconds an answer whose root was lost waits for the devices left to choose another
before it ends with the error."""
METRICS_WATCH = 0.5
"""Seconds between looks for root changes and engine failures, for /metrics."""
