"""The data plane's guard alone: llama.cpp RPC by hand, straight and through the relays.

    sudo python -m bench.guard [--rounds N] [--tokens N] [--hosts 2|3]

bench.distributed compares all of hsmdif (daemon, engine, relays, hsmdifctl) with
llama.cpp RPC by hand. This one keeps the hand-driven client and changes only the
path its bytes take, on the same network-namespace hosts (one core and one
llama.cpp thread each): "direct" to the rpc-workers; "plain" through two relays
per worker, one on the root's host (loopback, where the engine would connect) and
one on the worker's (in front of its rpc-worker), as a lease lays them out; "tls"
through the same two relays with mutual TLS 1.3 between them. The relays are the
daemon's own primitives (`_native.splice`, `secure.Session`), each in a process of
its own. Each round generates with the three in turn, the order rotating, and the
figures are the medians of each path's ratio to "direct" in the same round.
Prints one line per round and the two ratios; nothing is written.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import threading
from array import array
from collections.abc import Sequence
from pathlib import Path

from bench.common import MIB, N_CTX, HandRpc, hsmdif_cluster, scratch_dir, usable_for
from bench.distributed import CPU_QUOTA, MODEL
from hsmdifd.cluster import tls
from hsmdifd.engine.relay import _native, secure
from hsmdifd.placement.gguf_model import read_model_shape
from tests.conftest import REPO, free_port_in
from tests.netns import Host

SECRET = bytes(range(32))
PATHS = ("direct", "plain", "tls")


def serve(argv: Sequence[str]) -> None:
    """One relay, `LISTEN PORT TARGET TARGET_PORT MODE STATE`: accept on LISTEN:PORT and
    carry each connection to TARGET:TARGET_PORT.

    MODE: "plain", "tls-out" (TLS towards the target: the root's relay) or "tls-in"
    (TLS from the client: the worker's); STATE holds the relay's TLS key."""
    listen, port, target, target_port, mode, state = argv
    context = None
    if mode != "plain":
        creds = tls.device_credentials(SECRET, mode, Path(state))
        server = mode == "tls-in"
        context = secure.server_context(creds) if server else secure.client_context(creds)
    listener = socket.create_server((listen, int(port)))
    print("ready", flush=True)

    def carry(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        upstream = socket.create_connection((target, int(target_port)))
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn, upstream:
            a = b = None
            if context is not None and mode == "tls-in":
                a = secure.Session.accept(context, conn, 5.0).handle
            if context is not None and mode == "tls-out":
                b = secure.Session.connect(context, upstream, 5.0).handle
            _native.splice(conn.fileno(), a, upstream.fileno(), b, 5.0, array("Q", [0] * 4))

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=carry, args=(conn,), daemon=True).start()


class Relayed(HandRpc):
    """HandRpc whose client reaches each rpc-worker through a root and a worker relay."""

    def __init__(self, root: Host, workers: Sequence[Host], model: Path, n_ctx: int, tls_on: bool):
        super().__init__(root, workers, model, n_ctx)
        self._tls = tls_on

    def _relay(self, host: Host, listen: str, target: str, port: int, mode: str) -> int:
        mine = free_port_in(host)
        state = self._cache / f"tls-{host.name}-{mode}"
        argv = [sys.executable, "-m", "bench.guard", "--serve", listen, str(mine), target]
        proc = host.popen([*argv, str(port), mode, str(state)], stdout=subprocess.PIPE, cwd=REPO)
        self._procs.append(proc)
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"the relay on {host.name} did not start")
        return mine

    def _start_worker(self, host: Host) -> None:
        super()._start_worker(host)
        target, _, port = self.endpoints.pop().rpartition(":")
        inward, outward = ("tls-in", "tls-out") if self._tls else ("plain", "plain")
        worker_port = self._relay(host, host.address, target, int(port), inward)
        root_port = self._relay(self.root, "127.0.0.1", host.address, worker_port, outward)
        self.endpoints.append(f"127.0.0.1:{root_port}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--hosts", type=int, choices=(2, 3), default=2)
    parser.add_argument("--serve", nargs=6, help=argparse.SUPPRESS)  # one relay process
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    model = MODEL.path()
    shape = read_model_shape(model)
    usable = usable_for(shape, N_CTX, args.hosts)
    per_host = shape.n_layer // args.hosts
    n_gpu_layers = shape.n_layer - per_host + 1  # the root keeps its share, the output goes
    split = [float(per_host)] * (args.hosts - 2) + [
        float(shape.n_layer - per_host * (args.hosts - 1) + 1)
    ]
    with (
        scratch_dir() as base,
        hsmdif_cluster(
            args.hosts,
            model,
            base,
            usable_bytes=usable,
            memory_limit_bytes=4 * usable + 1024 * MIB,  # three clients' and workers' shares
            cpu_quota=CPU_QUOTA,
        ) as (cluster, _daemons),
    ):
        root, *workers = cluster.hosts
        with (
            HandRpc(root, workers, model, N_CTX) as direct,
            Relayed(root, workers, model, N_CTX, tls_on=False) as plain,
            Relayed(root, workers, model, N_CTX, tls_on=True) as secured,
        ):
            paths = {"direct": direct, "plain": plain, "tls": secured}
            for client in paths.values():
                client.load(n_gpu_layers, split)
                client.generate(8)
            speeds: dict[str, list[float]] = {p: [] for p in PATHS}
            for i in range(args.rounds):
                order = PATHS[i % 3 :] + PATHS[: i % 3]
                row = {p: paths[p].generate(args.tokens).tokens_per_s for p in order}
                for p in PATHS:
                    speeds[p].append(row[p])
                print("  ".join(f"{p} {row[p]:6.2f}" for p in PATHS), "tokens/s", flush=True)
    for p in ("plain", "tls"):
        ratios = [a / b for a, b in zip(speeds[p], speeds["direct"], strict=True)]
        print(
            f"{p} relays / direct: {statistics.median(ratios):.3f} (median of {len(ratios)} rounds)"
        )


if __name__ == "__main__":
    main()
