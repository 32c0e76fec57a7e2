"""The systemd unit: systemd accepts it, it is hardened, and it runs the daemon as designed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "hsmdifd.service"
SYSUSERS = ROOT / "systemd" / "hsmdif.sysusers.conf"
INSTALLED_DAEMON = "/usr/local/bin/hsmdifd"
MAX_EXPOSURE = 2.5


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} not found: install the Debian package systemd (apt-get install systemd)"
        )
    return path


def _settings(path: Path) -> dict[str, dict[str, list[str]]]:
    """Section -> key -> values, in order; enough of systemd's syntax for our own unit."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    lines = iter(path.read_text().splitlines())
    for raw in lines:
        line = raw.strip()
        while line.endswith("\\"):
            line = line[:-1] + " " + next(lines, "").strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}: {line!r} is outside any section"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _service() -> dict[str, list[str]]:
    return _settings(UNIT)["Service"]


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    analyze = _tool("systemd-analyze")
    # verify insists that every command exists; hsmdifd is only there after make install.
    stub = tmp_path / "hsmdifd"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = UNIT.read_text()
    assert INSTALLED_DAEMON in text
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(INSTALLED_DAEMON, str(stub)))

    result = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, check=False
    )

    # Unknown keys and bad values are only warnings (exit status 0), printed with the path.
    complaints = [
        line for line in (result.stdout + result.stderr).splitlines() if UNIT.name in line
    ]
    assert result.returncode == 0, result.stdout + result.stderr
    assert complaints == []


def test_security_exposure_is_low() -> None:
    analyze = _tool("systemd-analyze")

    result = subprocess.run(
        [analyze, "security", "--offline=yes", str(UNIT)],
        capture_output=True,
        text=True,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match is not None, result.stdout + result.stderr
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, result.stdout


def test_unit_is_a_notify_service_with_watchdog_and_restart() -> None:
    service = _service()
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert service.get("WatchdogSec"), "no WatchdogSec="
    assert service["Restart"] == ["on-failure"]
    assert service.get("TimeoutStopSec"), "no TimeoutStopSec="
    assert any("kill -HUP $MAINPID" in line for line in service["ExecReload"])


def test_unit_runs_the_daemon_as_hsmdif_in_its_own_directories() -> None:
    service = _service()
    assert service["User"] == ["hsmdif"]
    assert service["Group"] == ["hsmdif"]
    assert service["RuntimeDirectory"] == ["hsmdifd"]
    assert service["StateDirectory"] == ["hsmdifd"]
    (exec_start,) = service["ExecStart"]
    argv = exec_start.split()
    # make install rewrites this path when PREFIX is not /usr/local.
    assert argv[0] == INSTALLED_DAEMON
    assert argv[argv.index("--state-dir") + 1] == "%S/hsmdifd"
    assert argv[argv.index("--socket") + 1] == "%t/hsmdifd/control.sock"
    assert argv[argv.index("--config") + 1] == "/etc/hsmdif/hsmdifd.toml"


def test_sysusers_creates_the_user_the_unit_runs_as(tmp_path: Path) -> None:
    sysusers = _tool("systemd-sysusers")
    (tmp_path / "etc").mkdir()

    result = subprocess.run(
        [sysusers, f"--root={tmp_path}", str(SYSUSERS)],
        capture_output=True,
        text=True,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text().splitlines()
    group = (tmp_path / "etc" / "group").read_text().splitlines()
    users = {line.split(":")[0]: line.split(":") for line in passwd}
    gids = {line.split(":")[0]: line.split(":")[2] for line in group}
    _name, _password, _uid, gid, _gecos, home, shell = users["hsmdif"]
    assert gids["hsmdif"] == gid
    assert home == "/var/lib/hsmdifd"
    assert shell.endswith("nologin")


def test_hardening_leaves_the_daemon_what_it_needs() -> None:
    service = _service()
    families = set(" ".join(service["RestrictAddressFamilies"]).split())
    # gRPC on the Unix socket and TCP, mDNS, and interface discovery through netlink.
    assert {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"} <= families
    # Model files may be anywhere readable, home directories included.
    assert service["ProtectHome"] == ["read-only"]
    # psutil reads /proc/meminfo, /proc/stat and /proc/cpuinfo.
    assert "pid" not in service.get("ProcSubset", [])
    assert "yes" not in service.get("PrivateNetwork", [])
    # Killing on a refused system call would end `import llama_cpp`: NumPy's OpenBLAS
    # calls mbind() (in @resources) when it loads.
    assert service["SystemCallErrorNumber"] == ["EPERM"]
