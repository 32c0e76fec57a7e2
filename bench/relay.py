"""What the data-plane relay costs: bulk throughput, CPU per MB and round-trip latency.

    python -m bench.relay [--mb 200] [--pings 2000] [--decode [--model GGUF] [--tokens 64]]

On loopback, the same process runs a RootRelay and a WorkerRelay, as the root's and
the worker's daemons each do for one lease; a child process plays llama.cpp on one
end and the rpc-worker on the other, so that the CPU this process uses is the two
relays' (TLS both ways, and the copy loop's thread on each side). It pushes
`--mb` MB through tls, plain and no relay at all, and times `--pings` round trips of
64 bytes. The figures of "direct" are the child's own cost, for scale. With
`--decode`, it also generates `--tokens` tokens with bench.llama_rpc, every layer on
an rpc-worker, straight to the worker and through the TLS relays: tokens per second
of each, the relays' CPU per token and how many reads each relay made per token each
way (the model: `--model`, or a small generated llama). llama.cpp writes about seven
requests per token to each worker, in one send each or two, and reads one answer: a
token costs each relay that many wake-ups each way, and one round trip. Prints one line per
figure, and JSON last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import secrets
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hsmdifd.cluster import tls
from hsmdifd.engine import relay, rpc
from tests.tinymodel import write_tiny_llama

MB = 1_000_000
CHUNK = 256 * 1024
PING = 64
SECRET = bytes(range(32))


# ---------------------------------------------------------------- the child


def _exact(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError("closed")
        data += chunk
    return bytes(data)


def _sink(listener: socket.socket) -> None:
    """The rpc-worker's stand-in: 'B' + size: swallow it, answer; 'P': echo 64-byte pings."""
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            kind = conn.recv(1)
            if kind == b"B":
                (size,) = struct.unpack("<Q", _exact(conn, 8))
                buffer = bytearray(CHUNK)
                left = size
                while left:
                    n = conn.recv_into(buffer, min(left, CHUNK))
                    if not n:
                        break
                    left -= n
                conn.sendall(struct.pack("<Q", size - left))
            elif kind == b"P":
                while ping := conn.recv(PING, socket.MSG_WAITALL):
                    conn.sendall(ping)


def _bulk(port: int, size: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"B" + struct.pack("<Q", size))
        block = bytes(CHUNK)
        left = size
        while left:
            n = min(left, CHUNK)
            sock.sendall(block[:n])
            left -= n
        (got,) = struct.unpack("<Q", _exact(sock, 8))
        assert got == size, (got, size)


def _pings(port: int, count: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"P")
        message = bytes(PING)
        for _ in range(count):
            sock.sendall(message)
            _exact(sock, PING)


def child() -> None:
    """Serve the sink in a thread; run `bulk PORT SIZE` / `ping PORT N` lines from stdin."""
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_sink, args=(listener,), daemon=True).start()
    print(listener.getsockname()[1], flush=True)
    for line in sys.stdin:
        command, port, amount = line.split()
        started = time.perf_counter()
        if command == "bulk":
            _bulk(int(port), int(amount))
        else:
            _pings(int(port), int(amount))
        print(f"{time.perf_counter() - started:.6f}", flush=True)


# ---------------------------------------------------------------- the relays


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Child:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.relay", "--child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.sink_port = int(self.proc.stdout.readline())

    def run(self, command: str, port: int, amount: int) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{command} {port} {amount}\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


async def measure(child: Child, port: int, size: int, pings: int) -> dict[str, float]:
    cpu = _cpu()
    wall = await asyncio.to_thread(child.run, "bulk", port, size)
    cpu = _cpu() - cpu
    ping_cpu = _cpu()
    ping_wall = await asyncio.to_thread(child.run, "ping", port, pings)
    ping_cpu = _cpu() - ping_cpu
    return {
        "mb_per_s": size / MB / wall,
        "relay_cpu_s_per_mb": cpu / (size / MB),
        "round_trip_us": ping_wall / pings * 1e6,
        "relay_cpu_us_per_round_trip": ping_cpu / pings * 1e6,
    }


async def main_async(size: int, pings: int) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory() as state:
        root = tls.device_credentials(SECRET, "root", Path(state) / "root")
        worker = tls.device_credentials(SECRET, "worker", Path(state) / "worker")
        child = Child()
        results: dict[str, dict[str, float]] = {}
        try:
            results["direct"] = await measure(child, child.sink_port, size, pings)
            for mode in ("plain", "tls"):
                token = secrets.token_bytes(relay.TOKEN_BYTES)
                tls_mode = mode == "tls"
                worker_relay = relay.WorkerRelay(
                    worker if tls_mode else None,
                    "root",
                    token,
                    "127.0.0.1",
                    child.sink_port,
                    data_plane=mode,
                )
                await worker_relay.start()
                roots = await relay.open_root_relays(
                    root if tls_mode else None, [(worker_relay.endpoint, token, "worker")], mode
                )
                try:
                    local = int(roots.local_endpoints[0].rsplit(":", 1)[1])
                    results[mode] = await measure(child, local, size, pings)
                finally:
                    await roots.close()
                    await worker_relay.close()
        finally:
            child.close()
    return results


class Timed:
    """bench.llama_rpc with one endpoint: load every layer there, time generations."""

    def __init__(self, model: Path, endpoint: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.llama_rpc", str(model), "--endpoint", endpoint],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )

    def ask(self, line: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        if not reply:
            raise RuntimeError(f"bench.llama_rpc ended on {line!r}")
        answer: dict[str, Any] = json.loads(reply)
        return answer

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(30)


def _carried(relays: list[relay.Traffic]) -> dict[str, float]:
    """Reads and bytes per direction, summed over `relays`."""
    return {
        "reads_out": sum(t.reads_out for t in relays),
        "bytes_out": sum(t.bytes_out for t in relays),
        "reads_in": sum(t.reads_in for t in relays),
        "bytes_in": sum(t.bytes_in for t in relays),
    }


async def _generation(
    timed: Timed, tokens: int, meters: dict[str, list[relay.Traffic]]
) -> dict[str, float]:
    """Generate `tokens`: tokens/s, this process's CPU, and what each relay carried."""
    before = {k: _carried(t) for k, t in meters.items()}
    cpu = _cpu()
    reply = await asyncio.to_thread(timed.ask, f"gen {tokens}")
    figures = {"tokens_per_s": float(reply["tokens_per_s"]), "cpu_ms": (_cpu() - cpu) * 1000}
    for name, traffic in meters.items():
        after = _carried(traffic)
        figures.update({f"{name}_{k}": v - before[name][k] for k, v in after.items()})
    return figures


async def decode(
    model: Path, tokens: int, port: int, creds: tuple[tls.DeviceCredentials, ...]
) -> dict[str, dict[str, float]]:
    """Time a decode straight to the rpc-worker on `port`, then through the relays.

    Per token: a generation of `tokens` less one of 1 (the prompt is the same).
    """
    results: dict[str, dict[str, float]] = {}
    for path in ("direct", "tls"):
        token = secrets.token_bytes(relay.TOKEN_BYTES)
        worker_relay = relay.WorkerRelay(creds[1], "root", token, "127.0.0.1", port)
        await worker_relay.start()
        roots = await relay.open_root_relays(creds[0], [(worker_relay.endpoint, token, "worker")])
        endpoint = f"127.0.0.1:{port}" if path == "direct" else roots.local_endpoints[0]
        meters = {"root": roots.traffic, "worker": [worker_relay.traffic]}
        timed = await asyncio.to_thread(Timed, model, endpoint)
        try:
            await asyncio.to_thread(timed.ask, "load 999 1")
            await asyncio.to_thread(timed.ask, "gen 8")  # warm
            one = await _generation(timed, 1, meters)
            many = await _generation(timed, tokens, meters)
        finally:
            await asyncio.to_thread(timed.close)
            await roots.close()
            await worker_relay.close()
        figures = {k: (many[k] - one[k]) / (tokens - 1) for k in many if k != "tokens_per_s"}
        figures["relay_cpu_ms_per_token"] = figures.pop("cpu_ms")
        results[f"decode_{path}"] = {"tokens_per_s": many["tokens_per_s"], **figures}
    return results


def run_decode(model: Path | None, tokens: int) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory() as scratch:
        model = model or write_tiny_llama(
            Path(scratch) / "decode.gguf", n_layer=8, n_embd=512, n_head=8, n_ff=1024
        )
        creds = (
            tls.device_credentials(SECRET, "root", Path(scratch) / "root"),
            tls.device_credentials(SECRET, "worker", Path(scratch) / "worker"),
        )
        port = rpc.free_port("127.0.0.1")
        worker = subprocess.Popen(
            # One thread, as the client's: more would spin beside the relays and the
            # client for the same cores and make every figure of the decode erratic.
            [
                sys.executable,
                "-m",
                "hsmdifd.engine.rpc_worker",
                f"--endpoint=127.0.0.1:{port}",
                "--threads=1",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert worker.stdout is not None and worker.stdout.readline().strip() == b"ready"
            return asyncio.run(decode(model, tokens, port, creds))
        finally:
            assert worker.stdin is not None
            worker.stdin.close()
            worker.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.relay")
    parser.add_argument("--mb", type=int, default=200, help="MB pushed through each path")
    parser.add_argument("--pings", type=int, default=2000, help="64-byte round trips")
    parser.add_argument("--decode", action="store_true", help="also time a real decode")
    parser.add_argument("--model", type=Path, help="GGUF for --decode")
    parser.add_argument("--tokens", type=int, default=64, help="tokens --decode generates")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child()
        return
    results = asyncio.run(main_async(args.mb * MB, args.pings))
    decoded = run_decode(args.model, args.tokens) if args.decode else {}
    for path, figures in decoded.items():
        print(
            f"{path}: {figures['tokens_per_s']:7.1f} tokens/s, "
            f"{figures['relay_cpu_ms_per_token']:6.3f} ms relay CPU per token"
        )
    if decoded:
        f = decoded["decode_tls"]
        for end in ("root", "worker"):
            print(
                f"per token, the {end} relay read {f[end + '_reads_out']:.1f} times "
                f"({f[end + '_bytes_out']:.0f} B) towards the rpc-worker and "
                f"{f[end + '_reads_in']:.1f} times ({f[end + '_bytes_in']:.0f} B) back"
            )
    if decoded:
        ratio = decoded["decode_tls"]["tokens_per_s"] / decoded["decode_direct"]["tokens_per_s"]
        print(f"decode through the TLS relays / straight: {ratio:.3f}")
    for path, figures in results.items():
        print(
            f"{path:>6}: {figures['mb_per_s']:7.0f} MB/s, "
            f"{figures['relay_cpu_s_per_mb'] * 1000:6.2f} ms relay CPU per MB, "
            f"round trip {figures['round_trip_us']:6.1f} us "
            f"({figures['relay_cpu_us_per_round_trip']:5.1f} us relay CPU)"
        )
    print(json.dumps({**results, **decoded}))


if __name__ == "__main__":
    main()
