"""The rpc-worker child: lends this device's CPU to the root's llama.cpp over ggml RPC.

Started by the daemon as
`python -m hsmdifd.rpc_worker --endpoint IPv4:PORT [--cache-dir DIR] [--threads N]`.
It prints one line, `ready`, on stdout once the port is listening, and exits as
soon as its parent closes its stdin (so it never outlives a daemon that was
killed). It exits with status 1 if the server cannot listen (the port was taken:
see `rpc.free_port`) and 2 on bad arguments or a llama.cpp without RPC.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

import psutil

from hsmdifd import rpc, timing
from hsmdifd.children import exit_when_parent_goes

log = logging.getLogger("hsmdifd.rpc_worker")

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
    parser = argparse.ArgumentParser(prog="hsmdifd.rpc_worker")
    parser.add_argument("--endpoint", required=True, help="IPv4:PORT to listen on")
    parser.add_argument("--cache-dir", type=Path, help="where to cache weight tensors")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="rpc-worker %(levelname)s %(message)s")
    out = _private_stdout()
    try:
        _, port = rpc.parse_endpoint(args.endpoint, listen=True)
        if port == 0:
            raise ValueError("choose the port (rpc.free_port): port 0 would not be reported")
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, not {args.threads}")
        rpc.require_rpc()
    except (ValueError, rpc.RpcError) as e:
        log.error("%s", e)
        sys.exit(2)
    threading.Thread(target=exit_when_parent_goes, name="stdin", daemon=True).start()
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
    server.join()  # returns only if the server stops, which it does not on its own
    os._exit(1)


if __name__ == "__main__":
    main()
