"""The guarded data plane on 127.0.0.1: a real rpc-worker behind WorkerRelay and RootRelay,
probed the way an outsider on the LAN would (plain TCP, foreign certificates, another
secret holder, a wrong token, a second connection)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdifd.cluster import tls
from hsmdifd.engine import relay, rpc, rpc_worker
from hsmdifd.placement.leases import Leases
from tests.tinymodel import write_tiny_llama

REPO = Path(__file__).parent.parent
HOST = "127.0.0.1"
SECRET = bytes(range(32))
OTHER = bytes(range(100, 132))
ROOT, WORKER, BYSTANDER = "root-node", "worker-node", "bystander-node"
CHILD_ENV = {**os.environ, "GGML_NO_BACKTRACE": "1"}
RPC_CMD_HELLO, RPC_CMD_DEVICE_COUNT = 14, 15
HELLO_REQUEST_BYTES = 24  # rpc_msg_hello_req: conn_caps
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


# ---------------------------------------------------------------- llama.cpp RPC client


def _exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def _command(sock: socket.socket, cmd: int, payload: bytes = b"") -> bytes:
    sock.sendall(bytes([cmd]) + struct.pack("<Q", len(payload)) + payload)
    (size,) = struct.unpack("<Q", _exact(sock, 8))
    return _exact(sock, size)


def hello(sock: socket.socket) -> tuple[int, int, int]:
    """Send llama.cpp's RPC HELLO; the server's protocol version."""
    reply = _command(sock, RPC_CMD_HELLO, bytes(HELLO_REQUEST_BYTES))
    return reply[0], reply[1], reply[2]


def device_count(sock: socket.socket) -> int:
    (count,) = struct.unpack("<I", _command(sock, RPC_CMD_DEVICE_COUNT))
    return int(count)


def served_nothing(sock: socket.socket, token: bytes = b"") -> bool:
    """Send `token` and a HELLO; True if not one byte ever comes back (the connection ends)."""
    sock.settimeout(10)
    try:
        sock.sendall(token + bytes([RPC_CMD_HELLO]) + struct.pack("<Q", 24) + bytes(24))
        return sock.recv(1) == b""
    except (ConnectionError, ssl.SSLError):
        return True


# ---------------------------------------------------------------- fixtures


@dataclass(frozen=True)
class Creds:
    root: tls.DeviceCredentials
    worker: tls.DeviceCredentials
    bystander: tls.DeviceCredentials  # holds the secret, not the lease
    stranger: tls.DeviceCredentials  # another cluster's secret


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Creds:
    state = tmp_path_factory.mktemp("state")
    return Creds(
        tls.device_credentials(SECRET, ROOT, state / "root"),
        tls.device_credentials(SECRET, WORKER, state / "worker"),
        tls.device_credentials(SECRET, BYSTANDER, state / "bystander"),
        tls.device_credentials(OTHER, ROOT, state / "stranger"),
    )


@dataclass
class Worker:
    port: int
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_worker(*extra: str) -> Worker:
    for _ in range(3):  # free_port's race
        port = rpc.free_port(HOST)
        cmd = [sys.executable, "-m", "hsmdifd.engine.rpc_worker", f"--endpoint={HOST}:{port}"]
        proc = subprocess.Popen(
            [*cmd, "--threads=1", *extra],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=REPO,
            env=CHILD_ENV,
        )
        worker = Worker(port, proc)
        assert proc.stdout is not None
        if proc.stdout.readline().strip() == b"ready":
            return worker
        worker.stop()
    raise AssertionError("no rpc-worker started after 3 tries")


@pytest.fixture
def worker() -> Iterator[Worker]:
    started = start_worker()
    yield started
    started.stop()


@dataclass
class Relays:
    worker: relay.WorkerRelay
    root: relay.RootRelay
    token: bytes

    @property
    def local(self) -> tuple[str, int]:
        host, port = self.root.local_endpoint.split(":")
        return host, int(port)


@contextlib.asynccontextmanager
async def relays(creds: Creds, worker: Worker, data_plane: str = "tls") -> AsyncIterator[Relays]:
    token = secrets.token_bytes(relay.TOKEN_BYTES)
    worker_creds = creds.worker if data_plane == "tls" else None
    root_creds = creds.root if data_plane == "tls" else None
    worker_relay = relay.WorkerRelay(
        worker_creds, ROOT, token, HOST, worker.port, data_plane=data_plane
    )
    await worker_relay.start()
    roots = await relay.open_root_relays(
        root_creds, [(worker_relay.endpoint, token, WORKER)], data_plane
    )
    try:
        yield Relays(worker_relay, roots._relays[0], token)
    finally:
        await roots.close()
        await worker_relay.close()


def connect(address: tuple[str, int]) -> socket.socket:
    return socket.create_connection(address, timeout=10)


def tls_connect(
    port: int, client: tls.DeviceCredentials, trusted: tls.DeviceCredentials
) -> ssl.SSLSocket:
    """TLS to the worker relay with `client`'s key and certificate, trusting `trusted`'s CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=trusted.ca_pem.decode())
    with tls._chain_file(client) as path:
        context.load_cert_chain(path)
    return context.wrap_socket(connect((HOST, port)), server_hostname=tls.TARGET_NAME)


async def in_thread(function: Callable[..., T], *args: Any) -> T:
    return await asyncio.to_thread(function, *args)


# ---------------------------------------------------------------- the root's path


def test_hello_through_root_and_worker_relays(creds: Creds, worker: Worker) -> None:
    def session(address: tuple[str, int]) -> tuple[tuple[int, int, int], int]:
        with connect(address) as sock:
            return hello(sock), device_count(sock)

    def probe_then_session(address: tuple[str, int]) -> tuple[tuple[int, int, int], int]:
        connect(address).close()  # what rpc.register_servers does before llama.cpp connects
        return session(address)

    async def main() -> None:
        async with relays(creds, worker) as r:
            assert r.root.local_endpoint.startswith("127.0.0.1:")
            version, devices = await in_thread(session, r.local)
            assert version[0] == 7, version
            assert devices == 1
            # llama.cpp closes and reopens at once: the next connection follows the last.
            for _ in range(3):
                assert await in_thread(probe_then_session, r.local) == (version, devices)

    run(main())


def test_plain_data_plane_relays_without_tls(creds: Creds, worker: Worker) -> None:
    def session(address: tuple[str, int]) -> tuple[int, int, int]:
        with connect(address) as sock:
            return hello(sock)

    async def main() -> None:
        async with relays(creds, worker, "plain") as r:
            # plain: the worker relay itself speaks llama.cpp RPC to whoever connects
            assert (await in_thread(session, (HOST, r.worker.port)))[0] == 7
            # right after a connection closed, the next is let in (llama.cpp reconnects)
            assert (await in_thread(session, r.local))[0] == 7

    run(main())


def test_tls_needs_credentials() -> None:
    with pytest.raises(ValueError, match="needs this device's TLS credentials"):
        relay.WorkerRelay(None, ROOT, bytes(32), HOST, 1)
    with pytest.raises(ValueError, match="data_plane must be one of tls, plain"):
        relay.RootRelay(None, "10.0.0.2:1", bytes(32), WORKER, data_plane="clear")


def test_llama_cpp_split_load_through_the_relays(
    creds: Creds, worker: Worker, tmp_path: Path
) -> None:
    """llama.cpp's own client, its probe and reconnects included, through both relays."""
    model = write_tiny_llama(tmp_path / "split.gguf", n_layer=4, n_embd=128, dtype="f32")

    def generate(endpoint: str) -> list[str]:
        client = [sys.executable, "-m", "tests.rpc_client", str(model), "--n-gpu-layers=4"]
        done = subprocess.run(
            [*client, "--endpoint", endpoint, "--split", "1", "--tokens=8"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=REPO,
            env=CHILD_ENV,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"RPC0[{endpoint}] model buffer size" in done.stderr
        return [line for line in done.stdout.splitlines() if line.startswith("token ")]

    async def main() -> list[str]:
        async with relays(creds, worker) as r:
            return await in_thread(generate, r.root.local_endpoint)

    relayed = run(main())
    assert len(relayed) == 8
    assert relayed == generate(f"{HOST}:{worker.port}")  # the same as straight to the worker


# ---------------------------------------------------------------- the attacker


def test_plain_tcp_to_the_relay_gets_nothing(creds: Creds, worker: Worker) -> None:
    async def main() -> None:
        async with relays(creds, worker) as r:
            assert await in_thread(lambda: served_nothing(connect((HOST, r.worker.port))))

    run(main())


def test_certificate_of_a_foreign_ca_is_refused(creds: Creds, worker: Worker) -> None:
    def attack(port: int, token: bytes) -> bool:
        try:
            sock = tls_connect(port, creds.stranger, trusted=creds.worker)
        except (ssl.SSLError, ConnectionError):
            return True
        with sock:
            return served_nothing(sock, token)  # even knowing the token

    async def main() -> None:
        async with relays(creds, worker) as r:
            assert await in_thread(attack, r.worker.port, r.token)
            assert await in_thread(hello_via, r.local)  # the root is still served

    run(main())


def hello_via(address: tuple[str, int]) -> bool:
    with connect(address) as sock:
        return hello(sock)[0] == 7


def test_another_secret_holder_is_refused(creds: Creds, worker: Worker) -> None:
    """A device with the secret but not the lease: a valid certificate, even the token."""

    def attack(port: int, token: bytes) -> bool:
        with tls_connect(port, creds.bystander, trusted=creds.bystander) as sock:
            return served_nothing(sock, token)

    async def main() -> None:
        async with relays(creds, worker) as r:
            assert await in_thread(attack, r.worker.port, r.token)
            assert await in_thread(hello_via, r.local)

    run(main())


def test_wrong_token_is_refused(creds: Creds, worker: Worker) -> None:
    def attack(port: int, token: bytes) -> bool:
        with tls_connect(port, creds.root, trusted=creds.root) as sock:
            return served_nothing(sock, token)

    async def main() -> None:
        async with relays(creds, worker) as r:
            wrong = bytes(b ^ 1 for b in r.token)
            assert await in_thread(attack, r.worker.port, wrong)
            assert await in_thread(attack, r.worker.port, r.token[:-1])  # and a short one
            assert await in_thread(hello_via, r.local)

    run(main())


def test_root_refuses_a_relay_of_another_node(creds: Creds, worker: Worker) -> None:
    """The root checks it reached the worker it leased from, not some other secret holder."""

    async def main() -> None:
        token = secrets.token_bytes(relay.TOKEN_BYTES)
        impostor = relay.WorkerRelay(creds.bystander, ROOT, token, HOST, worker.port)
        await impostor.start()
        roots = await relay.open_root_relays(creds.root, [(impostor.endpoint, token, WORKER)])
        try:
            host, port = roots.local_endpoints[0].split(":")
            assert await in_thread(lambda: served_nothing(connect((host, int(port)))))
        finally:
            await roots.close()
            await impostor.close()

    run(main())


def direct_attempt(port: int, token: bytes, client: tls.DeviceCredentials) -> bool:
    """TLS straight to the worker relay, then `token`: True if nothing is served."""
    try:
        sock = tls_connect(port, client, client)
    except (ssl.SSLError, ConnectionError):
        return True  # closed during the handshake
    with sock:
        return served_nothing(sock, token)


def test_second_connection_is_refused_while_the_first_is_served(
    creds: Creds, worker: Worker
) -> None:
    async def main() -> None:
        async with relays(creds, worker) as r:
            first = await in_thread(connect, r.local)
            with first:
                assert (await in_thread(hello, first))[0] == 7
                # the root itself, straight to the worker relay, with all it needs
                assert await in_thread(direct_attempt, r.worker.port, r.token, creds.root)
                # another local client of the root relay
                assert await in_thread(lambda: served_nothing(connect(r.local)))
                # a plain TCP squatter
                assert await in_thread(lambda: served_nothing(connect((HOST, r.worker.port))))
                assert await in_thread(device_count, first) == 1  # the first keeps working

    run(main())


def test_closed_relay_refuses_connections(creds: Creds, worker: Worker) -> None:
    async def main() -> None:
        async with relays(creds, worker) as r:
            live = await in_thread(connect, r.local)
            with live:
                assert (await in_thread(hello, live))[0] == 7
                started = time.monotonic()
                await r.worker.close()
                await r.root.close()
                assert time.monotonic() - started < 2
                assert await in_thread(lambda: live.recv(1)) == b""  # cut at once
            for address in (r.local, (HOST, r.worker.port)):
                with pytest.raises(ConnectionRefusedError):
                    connect(address)

    run(main())


# ---------------------------------------------------------------- the rpc-worker


def listening_addresses(pid: int) -> set[str]:
    return {
        c.laddr.ip
        for c in psutil.Process(pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    }


def test_relays_listen_where_they_should(creds: Creds, worker: Worker) -> None:
    assert listening_addresses(worker.proc.pid) == {HOST}

    async def main() -> None:
        token = secrets.token_bytes(relay.TOKEN_BYTES)
        worker_relay = relay.WorkerRelay(creds.worker, ROOT, token, "0.0.0.0", worker.port)
        await worker_relay.start()
        roots = await relay.open_root_relays(
            creds.root, [(f"{HOST}:{worker_relay.port}", token, WORKER)]
        )
        try:
            ours = {
                c.laddr.port: c.laddr.ip
                for c in psutil.Process().net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN
            }
            assert ours[worker_relay.port] == "0.0.0.0"
            assert ours[roots._relays[0]._listener.port] == HOST  # the root's: loopback only
        finally:
            await roots.close()
            await worker_relay.close()

    run(main())


def test_worker_exits_when_keepalive_stops() -> None:
    worker = start_worker("--keepalive=1.0")
    try:
        assert worker.proc.stdin is not None
        for _ in range(8):  # 2 s of a live daemon's beats: the worker stays
            worker.proc.stdin.write(b".")
            worker.proc.stdin.flush()
            time.sleep(0.25)
        assert worker.proc.poll() is None
        stopped = time.monotonic()  # the daemon freezes: no more beats, stdin still open

        assert worker.proc.wait(10) == rpc_worker.KEEPALIVE_MISSED
        assert 0.7 < time.monotonic() - stopped < 3
    finally:
        worker.stop()


def test_worker_exits_when_its_daemon_is_killed(tmp_path: Path) -> None:
    """The daemon (here a stand-in parent) is SIGKILLed: the worker's stdin closes."""
    script = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-m', 'hsmdifd.engine.rpc_worker', "
        f"'--endpoint={HOST}:{rpc.free_port(HOST)}', '--threads=1', '--keepalive=60'], "
        "stdin=subprocess.PIPE, stdout=subprocess.PIPE)\n"
        "assert p.stdout.readline().strip() == b'ready'\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=REPO, env=CHILD_ENV
    )
    child: psutil.Process | None = None
    try:
        assert parent.stdout is not None
        child = psutil.Process(int(parent.stdout.readline()))
        assert child.is_running()

        parent.send_signal(signal.SIGKILL)
        parent.wait()

        gone, _ = psutil.wait_procs([child], timeout=10)
        assert gone, "the rpc-worker outlived its daemon"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if child is not None and child.is_running():
            child.kill()


# ---------------------------------------------------------------- leases


def worker_leases(creds: Creds, tmp_path: Path, **options: Any) -> Leases:
    """The leases a worker grants, over TLS, with its rpc-workers' cache in `tmp_path`."""
    return Leases(
        HOST,
        tmp_path / "cache",
        1,
        lambda epoch: None,
        credentials=creds.worker,
        data_plane="tls",
        **options,
    )


def test_lease_serves_its_root_through_the_relay(creds: Creds, tmp_path: Path) -> None:
    async def main() -> None:
        leases = worker_leases(creds, tmp_path)
        request = pb.LeaseRequest(epoch=pb.Epoch(policy_version=1, root_id=ROOT, generation=1))
        try:
            lease = await leases.start(request, ROOT)
            assert len(lease.token) == relay.TOKEN_BYTES
            host, port = lease.endpoint.split(":")
            assert host == HOST
            worker_pid = leases._held.proc.pid if leases._held else 0
            assert listening_addresses(worker_pid) == {HOST}
            roots = await relay.open_root_relays(
                creds.root, [(lease.endpoint, lease.token, WORKER)]
            )
            try:
                host, local = roots.local_endpoints[0].split(":")
                assert await in_thread(hello_via, (host, int(local)))
                assert await in_thread(lambda: served_nothing(connect((HOST, int(port)))))
            finally:
                await roots.close()
            await leases.end(lease.lease_id)
            with pytest.raises(ConnectionRefusedError):
                connect((HOST, int(port)))
            assert not psutil.pid_exists(worker_pid) or (
                psutil.Process(worker_pid).status() == psutil.STATUS_ZOMBIE
            )
        finally:
            await leases.close()

    run(main())


def test_lease_relay_closes_when_the_worker_ends(creds: Creds, tmp_path: Path) -> None:
    async def main() -> None:
        leases = worker_leases(creds, tmp_path)
        request = pb.LeaseRequest(epoch=pb.Epoch(policy_version=1, root_id=ROOT, generation=1))
        try:
            lease = await leases.start(request, ROOT)
            port = int(lease.endpoint.split(":")[1])
            assert leases._held is not None
            leases._held.proc.kill()
            deadline = time.monotonic() + 10
            while True:
                try:
                    connect((HOST, port)).close()
                except ConnectionRefusedError:
                    break
                assert time.monotonic() < deadline, "the relay outlived its rpc-worker"
                await asyncio.sleep(0.05)
        finally:
            await leases.close()

    run(main())


def test_the_daemon_measures_again_once_a_leases_worker_has_exited(
    creds: Creds, tmp_path: Path
) -> None:
    """Ended by the root's going, or by the rpc-worker's own exit: `released` runs each
    time, and only once the process is gone (its memory counted free by then)."""

    async def main() -> None:
        exited: list[bool] = []
        held: list[asyncio.subprocess.Process] = []

        async def released() -> None:
            exited.append(held[-1].returncode is not None)

        leases = worker_leases(creds, tmp_path, released=released)
        request = pb.LeaseRequest(epoch=pb.Epoch(policy_version=1, root_id=ROOT, generation=1))
        try:
            lease = await leases.start(request, ROOT)
            assert leases._held is not None
            held.append(leases._held.proc)
            assert exited == []
            await leases.holder_gone(live={WORKER})
            assert exited == [True]

            await leases.start(request, ROOT)
            assert leases._held is not None and leases._held.lease_id != lease.lease_id
            held.append(leases._held.proc)
            leases._held.proc.kill()
            deadline = time.monotonic() + 10
            while len(exited) < 2:
                assert time.monotonic() < deadline, "released did not run after the exit"
                await asyncio.sleep(0.05)
            assert exited == [True, True]
        finally:
            await leases.close()

    run(main())


def test_a_failing_released_still_ends_the_lease(
    creds: Creds, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A measurement that fails after a lease ended is logged; the lease stays ended, its
    relay closed, and the next lease is granted."""

    async def main() -> None:
        async def released() -> None:
            raise OSError("cannot read /proc/meminfo")

        leases = worker_leases(creds, tmp_path, released=released)
        request = pb.LeaseRequest(epoch=pb.Epoch(policy_version=1, root_id=ROOT, generation=1))
        try:
            lease = await leases.start(request, ROOT)
            await leases.end(lease.lease_id)
            assert leases.holder is None
            with pytest.raises(ConnectionRefusedError):
                connect((HOST, int(lease.endpoint.split(":")[1])))
            again = await leases.start(request, ROOT)
            assert again.lease_id != lease.lease_id and leases.holder == ROOT
        finally:
            await leases.close()

    run(main())
    assert "what runs after a lease's rpc-worker exited failed" in caplog.text
    assert "cannot read /proc/meminfo" in caplog.text


def test_a_new_lease_cuts_the_old_root_at_once(creds: Creds, tmp_path: Path) -> None:
    """A root that was deposed (a new lease went to another) is cut off mid-connection."""

    async def main() -> None:
        leases = worker_leases(creds, tmp_path)
        old = pb.LeaseRequest(epoch=pb.Epoch(policy_version=1, root_id=ROOT, generation=1))
        new = pb.LeaseRequest(epoch=pb.Epoch(policy_version=2, root_id=BYSTANDER, generation=2))
        try:
            lease = await leases.start(old, ROOT)
            roots = await relay.open_root_relays(
                creds.root, [(lease.endpoint, lease.token, WORKER)]
            )
            try:
                host, local = roots.local_endpoints[0].split(":")
                live = await in_thread(connect, (host, int(local)))
                with live:
                    assert (await in_thread(hello, live))[0] == 7
                    await leases.start(new, BYSTANDER)
                    assert await in_thread(lambda: live.recv(1)) == b""
                with pytest.raises(ConnectionRefusedError):
                    connect((HOST, int(lease.endpoint.split(":")[1])))
            finally:
                await roots.close()
        finally:
            await leases.close()

    run(main())


FROZEN_DAEMON = """
import asyncio, sys
from pathlib import Path
from hsmdifd.placement.leases import Leases
from hsmdif.proto import hsmdif_pb2 as pb

async def main():
    leases = Leases("127.0.0.1", Path(sys.argv[1]), 1, lambda epoch: None,
                    keepalive_interval=0.2, dead_after=1.0)
    epoch = pb.Epoch(policy_version=1, root_id="root", generation=1)
    await leases.start(pb.LeaseRequest(epoch=epoch), "root")
    print(leases._held.proc.pid, flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def test_rpc_worker_of_a_frozen_daemon_exits(tmp_path: Path) -> None:
    """The daemon holding a lease is SIGSTOPped: its rpc-worker stops serving within
    dead_after, though the daemon still holds the pipe open."""
    daemon = subprocess.Popen(
        [sys.executable, "-c", FROZEN_DAEMON, str(tmp_path)],
        stdout=subprocess.PIPE,
        cwd=REPO,
        env=CHILD_ENV,
    )
    child: psutil.Process | None = None
    try:
        assert daemon.stdout is not None
        child = psutil.Process(int(daemon.stdout.readline()))
        time.sleep(1.5)  # beats keep it going past dead_after
        assert child.is_running() and child.status() != psutil.STATUS_ZOMBIE

        daemon.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        while child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() - stopped < 5, "the rpc-worker outlived its frozen daemon"
            time.sleep(0.05)
        assert time.monotonic() - stopped > 0.5
    finally:
        daemon.send_signal(signal.SIGCONT)
        daemon.kill()
        daemon.wait()
        if child is not None and child.is_running():
            child.kill()


def test_lease_refuses_another_caller(creds: Creds, tmp_path: Path) -> None:
    leases = Leases(
        HOST, tmp_path, 1, lambda epoch: None, credentials=creds.worker, data_plane="tls"
    )
    request = pb.LeaseRequest(epoch=pb.Epoch(policy_version=1, root_id=ROOT, generation=1))

    with pytest.raises(Exception, match="by the root only"):
        run(leases.start(request, BYSTANDER))
