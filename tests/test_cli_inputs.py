"""A table of careless and hostile hsmdifctl inputs against a real daemon: each gets its
exit code and a sentence, never a traceback, and a prompt still works afterwards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Daemon, MakeDaemon, slow_model

# argv as the shell passes bytes that are not UTF-8: Python sees them as surrogates.
NOT_UTF8 = os.fsdecode(b"\xff\xfe")
NOT_UTF8_PATH = os.fsdecode(b"/tmp/\xff.gguf")
NO_TRACEBACK = "Traceback"

# (arguments, stdin, exit code, fragments of stderr); MODEL stands for the tiny model.
TABLE: list[tuple[list[str], str | None, int, list[str]]] = [
    (["prompt", "hi", "--max-tokens", "2147483648"], None, 2, ["must be at most 1,048,576"]),
    (["prompt", "hi", "--max-tokens", "0"], None, 2, ["must be at least 1 (got 0)"]),
    (["prompt", "hi", "--max-tokens", "9" * 5000], None, 2, ["is not a whole number"]),
    (["load", "x", "--max-seq-len", "99999999999"], None, 2, ["must be at most 16,777,216"]),
    (["load", "x", "--max-seq-len", "8"], None, 2, ["must be at least 16 (got 8)"]),
    (["prompt", NOT_UTF8], None, 2, ["the prompt given is not valid UTF-8", "'\\xff\\xfe'"]),
    (["load", NOT_UTF8_PATH], None, 2, ["the model path '/tmp/\\xff.gguf' is not valid UTF-8"]),
    (["load", "MODEL", "--threads", "100000"], None, 2, ["--threads: must be at most 1,024"]),
    (["load", "MODEL", "--threads", "-4"], None, 2, ["must be at least 1 (got -4)"]),
    (
        ["load", "MODEL", "--threads", "1000"],
        None,
        1,
        ["--threads 1000 is more than this device has", "CPUs"],
    ),
    (["prompt", "hi", "--temperature", "nan"], None, 2, ["between 0 and 5 (got nan)"]),
    (["prompt", "hi", "--temperature", "inf"], None, 2, ["between 0 and 5 (got inf)"]),
    (["prompt", "hi", "--temperature", "-1"], None, 2, ["between 0 and 5 (got -1)"]),
    (["prompt", "hi", "--seed", "-1"], None, 2, ["must be at least 0"]),
    (["prompt", "hi", "--seed", str(2**32)], None, 2, ["must be at most 4,294,967,295"]),
    (["plan", "--num-parameters", "inf", "--quantize", "4bit"], None, 2, ["(got inf)"]),
    (["plan", "--num-parameters", "nan", "--quantize", "4bit"], None, 2, ["(got nan)"]),
    (["plan", "--num-parameters", "-1", "--quantize", "4bit"], None, 2, ["(got -1)"]),
    (["plan", "--num-parameters", "1e9"], None, 2, ["--num-parameters and --quantize go"]),
    (["plan", "--num-parameters", "1e9", "--quantize", "4bit"], None, 0, []),
    (["prompt", "-"], "a" * (1 << 20) + "b", 2, ["more than hsmdifd takes (1,048,576 bytes)"]),
    (["prompt", "-"], None, 1, ["the prompt is empty"]),
    (["load", "/nonexistent/" + "x" * 300], None, 1, ["model file not found", "…"]),
    (["devices", "--priority", "x" * 5000], None, 2, ["is not a name hsmdifd can know"]),
    (["devices", "--priority", "nosuchdevice"], None, 1, ["unknown device: 'nosuchdevice'"]),
]


def ctl(d: Daemon, args: list[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hsmdifctl", "--socket", str(d.socket), *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        errors="backslashreplace",
        timeout=120,
        check=False,
    )


def assert_prompt_works(d: Daemon) -> None:
    r = ctl(d, ["prompt", "Say something", "--max-tokens", "4", "--json"], None)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["completion_tokens"] >= 1


def test_each_bad_input_gets_its_exit_code_and_a_sentence(daemon: Daemon, tiny_model: Path) -> None:
    assert ctl(daemon, ["load", str(tiny_model)], None).returncode == 0
    for row_args, stdin, code, says in TABLE:
        args = [a.replace("MODEL", str(tiny_model)) for a in row_args]
        r = ctl(daemon, args, stdin)
        row = f"{[a[:40] for a in args]}: exit {r.returncode}, {r.stderr[-600:]!r}"
        assert r.returncode == code, row
        assert NO_TRACEBACK not in r.stderr, row
        for fragment in says:
            assert fragment in r.stderr, row
        if code:
            assert r.stderr.startswith(("hsmdifctl", "usage:")), row
            assert len(r.stderr) < 2000, row
        assert_prompt_works(daemon)
    assert NO_TRACEBACK not in daemon.log()


def test_socket_paths_that_cannot_be_the_daemons(short_dir: Path) -> None:
    regular = short_dir / "file"
    regular.write_text("")
    cases = [
        (regular, 3, f"{regular} is a regular file, not hsmdifd's socket"),
        (short_dir, 3, f"{short_dir} is a directory, not hsmdifd's socket"),
        (short_dir / ("s" * 120), 2, "longer than a Unix socket path can be (107 bytes)"),
        (short_dir / "none.sock", 3, "hsmdifd is not running (no socket at"),
    ]
    for path, code, says in cases:
        r = subprocess.run(
            [sys.executable, "-m", "hsmdifctl", "--socket", str(path), "status"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert r.returncode == code, (path, r.stderr)
        assert says in r.stderr, r.stderr
        assert "stale" not in r.stderr


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv"
)
def test_permission_denied_names_the_sockets_group(daemon: Daemon) -> None:
    # Let nobody reach the socket but not connect to it (mode 0660, not its group).
    dirs = [daemon.socket.parent, daemon.socket.parent.parent]
    modes = [p.stat().st_mode & 0o777 for p in dirs]
    for p in dirs:
        p.chmod(0o711)
    try:
        r = subprocess.run(
            [
                *("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"),
                *(sys.executable, "-m", "hsmdifctl", "--socket", str(daemon.socket), "status"),
            ],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent.parent,
            timeout=60,
            check=False,
        )
    finally:
        for p, mode in zip(dirs, modes, strict=True):
            p.chmod(mode)
    import grp

    group = grp.getgrgid(daemon.socket.stat().st_gid).gr_name
    assert r.returncode == 3, r.stderr
    assert f"the socket belongs to the group {group}; add yourself to it" in r.stderr
    assert f"sudo usermod -aG {group} $USER" in r.stderr


def test_a_frozen_daemon_is_reported_within_seconds(daemon: Daemon, tiny_model: Path) -> None:
    assert ctl(daemon, ["load", str(tiny_model)], None).returncode == 0
    assert daemon.proc is not None
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        for args in (["status"], ["prompt", "hi", "--max-tokens", "3"], ["unload"]):
            started = time.monotonic()
            r = ctl(daemon, args, None)
            elapsed = time.monotonic() - started
            assert r.returncode == 3, (args, r.stderr)
            assert f"hsmdifd at {daemon.socket} does not answer" in r.stderr, r.stderr
            assert elapsed < 15, (args, elapsed)
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
    assert_prompt_works(daemon)


def test_a_daemon_frozen_mid_answer_is_reported(make_daemon: MakeDaemon, short_dir: Path) -> None:
    d = make_daemon(model=slow_model(short_dir))
    d.start()
    assert ctl(d, ["load"], None).returncode == 0
    assert d.proc is not None
    answer = d.ctl_popen(
        "prompt", "once upon", "--raw", "--max-tokens", "2000", "--temperature", "0"
    )
    try:
        assert answer.stdout is not None
        assert answer.stdout.read(1)  # the answer has begun
        os.kill(d.proc.pid, signal.SIGSTOP)
        started = time.monotonic()
        _, err = answer.communicate(timeout=60)
        elapsed = time.monotonic() - started
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
        if answer.poll() is None:
            answer.kill()
            answer.wait()
    assert answer.returncode == 3, err
    assert "does not answer" in err
    assert elapsed < 20
    assert_prompt_works(d)
