"""The rpc-worker child: lends this device's CPU to the root's llama.cpp over ggml RPC.

Started by the daemon as `python -m hsmdifd.engine.rpc_worker --endpoint 127.0.0.1:PORT
[--cache-dir DIR] [--threads N] [--keepalive SECONDS]`. The daemon listens on
loopback only: the network reaches it through the lease's relay (`hsmdifd.engine.relay`).

It prints one line, `ready`, on stdout once the port is listening. It never
outlives its daemon's attention: it exits with status 0 as soon as its stdin (a
pipe from the daemon) closes, so a killed daemon takes it along, and, given
`--keepalive`, with status 3 when no byte arrived on stdin for that many seconds
(the daemon is frozen, SIGSTOPped say, and can no longer end a lease). It exits
with status 1 if the server cannot listen (the port was taken: see
`rpc.free_port`) and 2 on bad arguments or a llama.cpp without RPC.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

import psutil

from hsmdifd.daemon import timing
from hsmdifd.daemon.children import first_to_go_when_memory_runs_out
from hsmdifd.engine import rpc

log = logging.getLogger("hsmdifd.engine.rpc_worker")

"""Seconds the server gets to start listening before the worker gives up."""
_LISTEN_POLL = 0.01


def _listening(port: int) -> bool:
    """Whether this process has a TCP socket listening on `port`."""
    return any(
        c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
        for c in psutil.Process().net_connections(kind="tcp")
    )


def _wait_listening(port: int, server: threading.Thread, timeout: float) -> bool:
    """Wait until the server listens on `port`; False if it stopped or took too long."""
    deadline = time.monotonic() + timeout
    while server.is_alive() and time.monotonic() < deadline:
        if _listening(port):
            return True
        time.sleep(_LISTEN_POLL)
    return False


KEEPALIVE_MISSED = 3
"""Exit status of a worker whose daemon stopped sending keepalive bytes."""


def watch_parent(keepalive: float | None, serving: threading.Event | None = None) -> int:
    """Block until stdin closes (0) or, with `keepalive`, no byte came for that long (3).

    The time before `serving` is set does not count: the daemon starts its beats
    once it read `ready`.
    """
    fd = sys.stdin.fileno()
    counting = serving is None
    last = time.monotonic()
    while True:
        timeout = None if keepalive is None else max(0.0, last + keepalive - time.monotonic())
        ready, _, _ = select.select([fd], [], [], timeout)
        if ready:
            try:
                if not os.read(fd, 4096):
                    return 0
            except OSError:
                return 0
            last = time.monotonic()
        elif not counting:
            counting = serving is None or serving.is_set()
            last = time.monotonic()  # a whole interval from when the beats may start
        else:
            log.error(
                "no keepalive from the daemon for %.1f s (frozen or stopped): exiting", keepalive
            )
            return KEEPALIVE_MISSED


def _exit_with_parent(keepalive: float | None, serving: threading.Event) -> None:
    os._exit(watch_parent(keepalive, serving))


def _serve(endpoint: str, cache_dir: Path | None, threads: int) -> None:
    try:
        rpc.serve(endpoint, cache_dir, threads)
    except Exception as e:
        log.error("%s", e)


def _private_stdout() -> TextIO:
    """Keep stdout for the `ready` line; what ggml prints there goes to stderr instead."""
    sys.stdout.flush()
    ours = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    return ours


def main(argv: list[str] | None = None) -> None:
    first_to_go_when_memory_runs_out()
    parser = argparse.ArgumentParser(prog="hsmdifd.engine.rpc_worker")
    parser.add_argument("--endpoint", required=True, help="IPv4:PORT to listen on")
    parser.add_argument("--cache-dir", type=Path, help="where to cache weight tensors")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--keepalive",
        type=float,
        metavar="SECONDS",
        help="exit when no byte arrives on stdin for this long (the daemon writes one a beat)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="rpc-worker %(levelname)s %(message)s")
    out = _private_stdout()
    try:
        _, port = rpc.parse_endpoint(args.endpoint, listen=True)
        if port == 0:
            raise ValueError("choose the port (rpc.free_port): port 0 would not be reported")
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, not {args.threads}")
        if args.keepalive is not None and not args.keepalive > 0:
            raise ValueError(f"--keepalive must be positive, not {args.keepalive}")
        rpc.require_rpc()
    except (ValueError, rpc.RpcError) as e:
        log.error("%s", e)
        sys.exit(2)
    serving = threading.Event()
    threading.Thread(
        target=_exit_with_parent, args=(args.keepalive, serving), name="parent", daemon=True
    ).start()
    server = threading.Thread(
        target=_serve, args=(args.endpoint, args.cache_dir, args.threads), name="rpc", daemon=True
    )
    server.start()
    if not _wait_listening(port, server, timing.RPC_LISTEN_TIMEOUT):
        if server.is_alive():  # else it has said why
            log.error(
                "the RPC server is not listening on %s after %.0f s",
                args.endpoint,
                timing.RPC_LISTEN_TIMEOUT,
            )
        os._exit(1)
    print("ready", file=out, flush=True)
    serving.set()
    server.join()  # returns only if the server stops, which it does not on its own
    os._exit(1)


if __name__ == "__main__":
    main()
