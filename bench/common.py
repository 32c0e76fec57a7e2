"""What the cluster benchmarks share: models, hosts, by-hand llama.cpp RPC and hsmdif daemons.

Hosts are tests.netns hosts (network namespaces with cgroup limits). llama.cpp RPC
"by hand" means rpc-workers started directly in the hosts and bench.llama_rpc, the
timed client, in the root host: the same split and endpoints the engine would use.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from hsmdifd.cluster.cluster_secret import write_secret_file
from hsmdifd.placement.gguf_model import ModelShape
from hsmdifd.placement.memory_estimate import estimate_memory
from hsmdifd.placement.planner import DeviceCapacity, PlanError, plan
from tests.conftest import REPO, Daemon, NotifySocket, free_port_in
from tests.netns import Cluster, Host
from tests.test_cluster import agree, view, wait_until
from tests.tinymodel import write_tiny_llama

RESULTS = Path(__file__).parent / "results.json"
MIB = 1024 * 1024
PROMPT = "once upon a time"
N_CTX = 512
PREFIX = "hsmbench"  # of the benchmarks' namespaces and cgroups (tests.netns.Cluster)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hsmdif"


def merge_results(path: Path, key: str, value: dict[str, Any]) -> None:
    """Set `key` in the JSON file at `path`, keeping the other keys."""
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    results[key] = value
    path.write_text(json.dumps(results, indent=2) + "\n")


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


# --- models ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Synthetic:
    """A random-weight llama model made with tests.tinymodel, f32 unless told."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int = 8
    n_head_kv: int = 4
    dtype: str = "f32"

    @property
    def name(self) -> str:
        return f"synthetic-{self.n_layer}x{self.n_embd}x{self.n_ff}-{self.dtype}"

    def path(self) -> Path:
        """The model file, written once into the cache."""
        target = cache_dir() / "bench-models" / f"{self.name}.gguf"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".partial-{os.getpid()}")
        try:
            write_tiny_llama(
                partial,
                n_layer=self.n_layer,
                n_embd=self.n_embd,
                n_ff=self.n_ff,
                n_head=self.n_head,
                n_head_kv=self.n_head_kv,
                n_ctx_train=2048,
                dtype=self.dtype,
            )
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        return target


# --- hosts -----------------------------------------------------------------------------


def link_bytes(host: Host) -> int:
    """Bytes received plus sent on the host's veth (its only link)."""
    out = subprocess.run(
        ["ip", "-n", host.name, "-s", "-j", "link", "show", host.interface],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    stats = json.loads(out)[0]["stats64"]
    return int(stats["rx"]["bytes"]) + int(stats["tx"]["bytes"])


def run_in(host: Host, code: str, timeout: float = 120) -> str:
    """Run Python `code` in `host` (its namespace and cgroups); its stdout."""
    r = host.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        check=False,
    )
    if r.returncode != 0:
        raise RuntimeError(f"in {host.name}: {r.stderr.strip()[-2000:]}")
    return str(r.stdout)


def measure_speed_in(host: Host, seconds: float = 0.3) -> float:
    """profile.measure_speed with one thread, run inside `host` under its quota."""
    code = (
        f"from hsmdifd.placement.profile import measure_speed; print(measure_speed(1, {seconds}))"
    )
    return float(run_in(host, code))


# --- llama.cpp RPC by hand ---------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    ttft_ms: float
    tokens_per_s: float
    tokens: int


class HandRpc:
    """rpc-workers in `workers` and the timed client in `root`, one thread each."""

    def __init__(
        self,
        root: Host,
        workers: Sequence[Host],
        model: Path,
        n_ctx: int = N_CTX,
        log: Path | None = None,
    ) -> None:
        self.log = log  # llama.cpp's verbose log of the client, when given
        self.root = root
        self.workers = list(workers)
        self.model = model
        self.n_ctx = n_ctx
        self.endpoints: list[str] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self._client: subprocess.Popen[str] | None = None
        self._cache = Path(tempfile.mkdtemp(prefix="hsm-rpc-cache-", dir="/tmp"))

    def __enter__(self) -> HandRpc:
        try:
            for host in self.workers:
                self._start_worker(host)
            endpoints = [f"--endpoint={e}" for e in self.endpoints]
            options = ["--n-ctx", str(self.n_ctx), "--threads", "1"]
            options += ["--verbose"] if self.log else []
            client = [sys.executable, "-m", "bench.llama_rpc", str(self.model)]
            with open(self.log or os.devnull, "w") as log:
                self._client = self.root.popen(
                    [*client, *endpoints, *options],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    text=True,
                    cwd=REPO,
                )
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start_worker(self, host: Host) -> None:
        for _attempt in range(5):  # the free port may be taken before the worker binds it
            endpoint = f"{host.address}:{free_port_in(host)}"
            cache = self._cache / host.name
            options = ["--endpoint", endpoint, "--threads", "1", "--cache-dir", str(cache)]
            proc = host.popen(
                [sys.executable, "-m", "hsmdifd.engine.rpc_worker", *options],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                cwd=REPO,
            )
            assert proc.stdout is not None
            if proc.stdout.readline().strip() == b"ready":
                self._procs.append(proc)
                self.endpoints.append(endpoint)
                return
            proc.kill()
            proc.wait()
        raise RuntimeError(f"no rpc-worker started in {host.name}")

    def _ask(self, line: str) -> dict[str, Any]:
        client = self._client
        assert client is not None and client.stdin is not None and client.stdout is not None
        client.stdin.write(line + "\n")
        client.stdin.flush()
        reply = client.stdout.readline()
        if not reply:
            raise RuntimeError(f"the llama.cpp RPC client died on {line!r}")
        answer: dict[str, Any] = json.loads(reply)
        return answer

    def load(self, n_gpu_layers: int, tensor_split: Sequence[float]) -> float:
        """Load with this split; the seconds it took."""
        split = " ".join(f"{x:g}" for x in tensor_split)
        return float(self._ask(f"load {n_gpu_layers} {split}".strip())["load_seconds"])

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    @property
    def client_pid(self) -> int:
        assert self._client is not None
        return self._client.pid

    def ask(self, line: str) -> dict[str, Any]:
        """Any other command of bench.llama_rpc (fill, rss)."""
        return self._ask(line)

    def generate(self, tokens: int) -> Timing:
        a = self._ask(f"gen {tokens}")
        return Timing(float(a["ttft_ms"]), float(a["tokens_per_s"]), int(a["tokens"]))

    def close(self) -> None:
        procs: list[subprocess.Popen[Any]] = [*self._procs]
        if self._client is not None:
            procs.append(self._client)
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()
        self._procs.clear()
        self._client = None
        shutil.rmtree(self._cache, ignore_errors=True)


def splits_for(counts: Sequence[int]) -> tuple[int, list[float]]:
    """n_gpu_layers and tensor_split for layer counts in pipeline order (root first).

    The last device with layers after the root also holds the output layer, as
    hsmdifd.placement.planner.Plan maps it; with no layers off the root, the output is the
    last device's all the same.
    """
    remote = list(counts[1:])
    last = max((i for i, k in enumerate(remote) if k), default=len(remote) - 1)
    split = [float(k + (i == last)) for i, k in enumerate(remote)]
    return sum(remote) + 1, split


# --- hsmdif daemons --------------------------------------------------------------------


def write_daemon_config(
    path: Path, model: Path, *, usable_mb: int = 0, data_plane: str = "tls"
) -> Path:
    """One thread, no reserve; `usable_mb` declares the memory the planner sees."""
    resources = "threads = 1\nmemory_reserve_mb = 0\n"
    if usable_mb:
        resources += f"memory_override_mb = {usable_mb}\n"
    model_lines = f'default = "{model}"\ncontext_length = {N_CTX}\nmax_tokens = 512\n'
    cluster = f'[cluster]\ndata_plane = "{data_plane}"\n'
    path.write_text(f"[resources]\n{resources}[model]\n{model_lines}{cluster}")
    return path


class BenchDaemon(Daemon):
    """A tests.conftest.Daemon whose log goes to a file, not an unread pipe."""

    def start(self, env: dict[str, str] | None = None) -> None:
        self.notify = NotifySocket(self.dir / f"notify-{time.monotonic_ns()}.sock")
        cmd = [sys.executable, "-m", "hsmdifd", "--config", str(self.config)]
        cmd += ["--socket", str(self.socket), "--state-dir", str(self.state_dir)]
        cmd += [*([] if self.mdns else ["--no-mdns"]), "--http", "off", *self.extra_args]
        full_env = {**os.environ, "NOTIFY_SOCKET": str(self.notify.path), **(env or {})}
        if self.host is not None:
            cmd = self.host.command(cmd)
        with (self.dir / "hsmdifd.log").open("w") as log:
            self.proc = subprocess.Popen(
                cmd, env=full_env, stdout=subprocess.DEVNULL, stderr=log, text=True
            )
        try:
            self.notify.wait_for("READY=1")
        except TimeoutError:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"hsmdifd did not become ready:\n{self.log()}") from None

    def log(self) -> str:
        return (self.dir / "hsmdifd.log").read_text(errors="replace")


def start_daemon(
    host: Host | None, base: Path, name: str, config: Path, secret: Path | None
) -> BenchDaemon:
    """A real hsmdifd in `host` (or here), named `name`, ready when this returns."""
    directory = base / name
    directory.mkdir(parents=True, exist_ok=True)
    d = BenchDaemon(dir=directory, config=config, host=host, mdns=secret is not None)
    d.extra_args = ["--name", name]
    if secret is not None:
        d.extra_args += ["--secret-file", str(secret)]
    d.start()
    return d


def root_of(daemons: Sequence[Daemon]) -> Daemon:
    name = view(daemons[0])["status"]["root"]
    return next(d for d in daemons if d.dir.name == name)


def usable_for(shape: ModelShape, n_ctx: int, hosts: int) -> int:
    """Usable bytes per host with which the planner needs exactly `hosts` equal hosts.

    A quarter of a layer above the least that `hosts` hosts need, so that speeds that
    differ a little never call for one more host. ValueError when no figure does.
    """

    def fits(usable: int, n: int) -> bool:
        devices = [DeviceCapacity(f"n{i}", f"h{i}", f"h{i}:1", usable, 1.0) for i in range(n)]
        try:
            plan(shape, n_ctx, devices)
        except PlanError:
            return False
        return True

    lo, hi = 0, 4 * estimate_memory(shape, n_ctx).total
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid, hosts):
            hi = mid
        else:
            lo = mid + 1
    usable = lo + max(shape.layer_bytes) // 4
    if hosts > 1 and fits(usable, hosts - 1):
        raise ValueError(f"{shape.name}: {hosts - 1} hosts hold it whenever {hosts} do")
    return usable


@contextmanager
def hsmdif_cluster(
    hosts: int,
    model: Path,
    base: Path,
    *,
    usable_bytes: int | None,
    memory_limit_bytes: int | None,
    cpu_quota: float | None,
    data_plane: str = "tls",
) -> Iterator[tuple[Cluster, list[BenchDaemon]]]:
    """`hosts` hosts, one hsmdifd each (one thread, `usable_bytes` declared), agreeing."""
    secret = None
    if hosts > 1:
        secret = base / "cluster.secret"
        write_secret_file(secret)
    usable_mb = -(-usable_bytes // MIB) if usable_bytes else 0
    daemons: list[BenchDaemon] = []
    with Cluster(
        hosts, memory_limit_bytes=memory_limit_bytes, cpu_quota=cpu_quota, prefix=PREFIX
    ) as cluster:
        try:
            for h in cluster.hosts:  # one at a time: each measures its speed at start
                name = f"h{h.index}"
                config = write_daemon_config(
                    base / f"{name}.toml", model, usable_mb=usable_mb, data_plane=data_plane
                )
                daemons.append(start_daemon(h, base, name, config, secret))
            if hosts > 1:
                wait_until(lambda: agree(list(daemons)), 60, "agreement")
            yield cluster, daemons
        finally:
            stop_all(daemons)


def loaded_plan(d: Daemon) -> dict[str, Any]:
    """The plan of the model the daemon has loaded, with the leased endpoints."""
    import grpc

    from hsmdif.proto import hsmdif_pb2 as pb
    from hsmdif.proto import hsmdif_pb2_grpc as pb_grpc
    from hsmdifctl import render

    with grpc.insecure_channel(f"unix:{d.socket}") as channel:
        reply = pb_grpc.ControlStub(channel).Status(pb.StatusRequest(), timeout=30)
    return render.plan_dict(reply.model.plan)


def hsmdif_prompt(d: Daemon, tokens: int) -> Timing:
    """`hsmdifctl prompt` with the benchmark prompt, greedy; timed by hsmdifctl."""
    r = d.ctl(
        "prompt", PROMPT, "--raw", "--json", "--temperature", "0", "--max-tokens", str(tokens)
    )
    if r.returncode != 0:
        raise RuntimeError(f"hsmdifctl prompt failed: {r.stderr.strip()}")
    a = json.loads(r.stdout)
    return Timing(
        float(a["time_to_first_token_ms"]),
        float(a["tokens_per_second"]),
        int(a["completion_tokens"]),
    )


def stop_all(daemons: Sequence[Daemon]) -> None:
    for d in daemons:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()


@contextmanager
def scratch_dir() -> Iterator[Path]:
    """A short temporary directory (Unix socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="hsm-bench-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def per_token(
    generate: Callable[[int], object], tokens: int, meters: dict[str, Callable[[], float]]
) -> dict[str, float]:
    """What each meter counts per decoded token: a generation of `tokens` less one of 1.

    Both generations re-use the cached prompt, so the difference is decoding alone.
    """

    def run(n: int) -> dict[str, float]:
        before = {k: m() for k, m in meters.items()}
        generate(n)
        return {k: m() - before[k] for k, m in meters.items()}

    one, many = run(1), run(tokens)
    return {k: max(0.0, (many[k] - one[k]) / (tokens - 1)) for k in meters}


def cpu_seconds(pid: int) -> float:
    """CPU time (user and system) of a process and its descendants so far."""
    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def children_cpu_seconds() -> float:
    """CPU time of this process's children that have ended (hsmdifctl runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
