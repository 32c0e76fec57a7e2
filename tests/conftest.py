"""Fixtures: tiny models, and real hsmdifd daemons on temporary sockets."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.tinymodel import write_tiny_llama

READY_TIMEOUT = 60.0


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny.gguf")


def slow_model(directory: Path) -> Path:
    """A tiny model big enough that a long answer takes a while."""
    return write_tiny_llama(
        directory / "slow.gguf", n_layer=4, n_embd=256, n_ff=512, n_ctx_train=2048
    )


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: Unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="hsm-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait_for(self, wanted: str, timeout: float = READY_TIMEOUT) -> list[str]:
        """Collect datagrams until one holds `wanted`; return all seen so far."""
        deadline = time.monotonic() + timeout
        while not any(wanted in m.split("\n") for m in self.messages):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {wanted} within {timeout} s; got {self.messages}")
            self.sock.settimeout(remaining)
            self.messages.append(self.sock.recv(4096).decode())
        return self.messages

    def close(self) -> None:
        self.sock.close()


@dataclass
class Daemon:
    """A real hsmdifd subprocess and the means to drive it with hsmdifctl."""

    dir: Path
    config: Path
    proc: subprocess.Popen[str] | None = None
    notify: NotifySocket | None = None
    extra_args: list[str] = field(default_factory=list)
    host: Any = None  # a tests.netns.Host to run in, or None for this machine
    mdns: bool = False
    http: str = "off"  # --http: ADDRESS:PORT for the HTTP API; off so daemons never collide

    @property
    def socket(self) -> Path:
        return self.dir / "ctl.sock"

    @property
    def state_dir(self) -> Path:
        return self.dir / "state"

    @property
    def log_path(self) -> Path:
        """The daemon's stderr: a file, so that a chatty daemon never blocks on a pipe."""
        return self.dir / "hsmdifd.log"

    def start(self, env: dict[str, str] | None = None) -> None:
        self.notify = NotifySocket(self.dir / f"notify-{time.monotonic_ns()}.sock")
        cmd = [
            sys.executable,
            "-m",
            "hsmdifd",
            "--config",
            str(self.config),
            "--socket",
            str(self.socket),
            "--state-dir",
            str(self.state_dir),
            *([] if self.mdns else ["--no-mdns"]),
            "--http",
            self.http,
            *self.extra_args,
        ]
        full_env = {**os.environ, "NOTIFY_SOCKET": str(self.notify.path), **(env or {})}
        if self.host is not None:
            cmd = self.host.command(cmd)
        with self.log_path.open("a") as log:
            self.proc = subprocess.Popen(
                cmd, env=full_env, stdout=subprocess.DEVNULL, stderr=log, text=True
            )
        try:
            self.notify.wait_for("READY=1")
        except TimeoutError:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"hsmdifd did not become ready:\n{self.log()}") from None

    def ctl(
        self, *args: str, input: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return run_ctl("--socket", str(self.socket), *args, input=input, timeout=timeout)

    def ctl_popen(self, *args: str) -> subprocess.Popen[str]:
        """hsmdifctl in the background, its stdin, stdout and stderr as text pipes."""
        return subprocess.Popen(
            [sys.executable, "-m", "hsmdifctl", "--socket", str(self.socket), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def stop(self, timeout: float = 20) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.notify is not None:
            self.notify.close()
        return self.proc.returncode

    def log(self) -> str:
        """Everything the daemon has written to stderr so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def stop_all(daemons: list[Daemon]) -> None:
    """Stop the daemons still running and print what each one logged: pytest shows
    it when the test failed."""
    for d in daemons:
        if d.proc is not None and d.proc.poll() is None:
            children = child_pids(d.proc.pid)
            d.stop()
            for pid in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    for d in daemons:
        print(f"---- {d.dir.name}: hsmdifd's log ----\n{d.log()}")


REPO = Path(__file__).parent.parent


def run_hsmdifd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run hsmdifd in the foreground (for --check-config and refused starts)."""
    return subprocess.run(
        [sys.executable, "-m", "hsmdifd", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=REPO,
    )


def free_port_in(host: Any) -> int:
    """A free TCP port on a tests.netns.Host's address, found inside its namespace."""
    code = f"from hsmdifd.engine.rpc import free_port; print(free_port({host.address!r}))"
    r = host.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    return int(r.stdout)


def run_ctl(
    *args: str, input: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hsmdifctl", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def write_config(path: Path, model: Path | None, extra: str = "", resources: str = "") -> Path:
    """A test configuration; `extra` adds tables after [model], `resources` keys to [resources]."""
    default = f'default = "{model}"\n' if model else ""
    path.write_text(
        f"[resources]\nthreads = 2\n{resources or 'memory_reserve_mb = 0'}\n"
        f"[model]\n{default}context_length = 512\nmax_tokens = 32\n{extra}"
    )
    return path


def child_pids(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


MakeDaemon = Callable[..., Daemon]


@pytest.fixture
def make_daemon(short_dir: Path, tiny_model: Path) -> Iterator[MakeDaemon]:
    """Make daemons on temporary sockets (started by the test); each is stopped afterwards."""
    made: list[Daemon] = []

    def make(
        model: Path | None = tiny_model, extra: str = "", resources: str = "", name: str = "d"
    ) -> Daemon:
        directory = short_dir / name
        directory.mkdir()
        config = write_config(directory / "hsmdifd.toml", model, extra, resources)
        made.append(Daemon(dir=directory, config=config))
        return made[-1]

    yield make
    stop_all(made)


@pytest.fixture
def daemon(make_daemon: MakeDaemon) -> Daemon:
    d = make_daemon()
    d.start()
    return d
