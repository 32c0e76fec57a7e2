"""Run every benchmark and write bench/results.json, bench/RESULTS.md and bench/results.png.

    sudo python -m bench.run [--quick] [--only NAME ...]

Each benchmark runs as its own process, one after the other (they share the
machine's two cores), and merges its key into a fresh results file (with `--only`,
into the existing one). A benchmark that fails is reported and the others still
run; the exit status is then 1. A benchmark that outlives its time budget is
interrupted, so that `--quick` ends within 10 minutes on 2 cores even when the
machine is busy with other work (the figures of a busy machine are not worth
waiting for). An interrupted benchmark that kept figures (`partial` in its key) is
reported as partial, not failed: the run still succeeds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.common import PREFIX
from bench.report import PLOT, write_plot, write_report
from tests.conftest import REPO
from tests.netns import cleanup_stale

BENCH = Path(__file__).parent
TIMED_OUT = -1000  # run_step's status for a benchmark stopped at its budget


@dataclass(frozen=True)
class Step:
    full: list[str]  # arguments of the full run
    quick: list[str]  # of the quick run
    root: bool  # needs root (network namespaces)
    budget: tuple[float, float]  # seconds allowed, full and quick: about 4x and 2x the usual


STEPS: dict[str, Step] = {
    # bench.standalone's own --quick is CI's smoke run; these are its arguments here.
    "standalone": Step([], ["--reps", "5", "--tokens", "32"], False, (300, 60)),
    "control": Step(["--rounds", "10"], ["--rounds", "2"], True, (300, 60)),
    "distributed": Step(["--reps", "15"], ["--quick"], True, (600, 150)),
    "heterogeneous": Step(["--rounds", "7", "--tokens", "48"], ["--quick"], True, (900, 180)),
    "scaling": Step(["--reps", "11", "--tokens", "64"], ["--quick"], True, (600, 90)),
    "memory": Step([], ["--quick"], True, (300, 30)),
    "limit": Step(["--reps", "7", "--tokens", "96"], ["--quick"], False, (300, 50)),
    "api": Step([], ["--quick"], False, (720, 60)),
    "resume": Step(["--reps", "5"], ["--quick"], True, (600, 150)),
}
INTERRUPT_GRACE = 60.0  # seconds a benchmark gets to tear its hosts down after SIGINT


def run_step(argv: list[str], budget: float) -> int:
    """Run one benchmark; past its budget, interrupt it (it then removes its hosts).

    Its exit status, or TIMED_OUT.
    """
    proc = subprocess.Popen(argv, cwd=REPO, start_new_session=True)
    try:
        return proc.wait(budget)
    except subprocess.TimeoutExpired:
        pass
    except KeyboardInterrupt:  # its own session does not get the terminal's Ctrl-C
        stop(proc)
        raise
    stop(proc)
    return TIMED_OUT


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Interrupt a benchmark, kill it if it lingers, and remove what its hosts left."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(INTERRUPT_GRACE)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    cleanup_stale(PREFIX)  # whatever its hosts left, now that their creator is gone


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.partition(":")[2].strip()
            break
    os_name = platform.platform()
    release = Path("/etc/os-release")
    if release.exists():
        fields = dict(
            line.split("=", 1) for line in release.read_text().splitlines() if "=" in line
        )
        os_name = fields.get("PRETTY_NAME", os_name).strip('"')
    import psutil

    versions = {}
    for package in ("hsmdif", "llama_cpp_python", "numpy", "grpcio", "gguf"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    commit = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": os_name,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
        "commit": commit or "unknown",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the short run")
    parser.add_argument("--only", nargs="+", choices=list(STEPS), help="these benchmarks alone")
    parser.add_argument("--out", type=Path, default=BENCH, help="where to write the three files")
    args = parser.parse_args()
    steps = args.only or list(STEPS)
    if os.geteuid() != 0 and any(STEPS[s].root for s in steps):
        print("bench.run: the cluster benchmarks need root (network namespaces)", file=sys.stderr)
        return 2
    started = datetime.datetime.now(datetime.timezone.utc)
    durations: dict[str, float] = {}
    failed: list[str] = []
    partly: list[str] = []  # stopped at their budget, with the figures measured by then
    with tempfile.TemporaryDirectory(prefix="hsm-bench-") as tmp:
        partial = Path(tmp) / "results.json"
        earlier = args.out / "results.json"
        earlier_run: dict[str, Any] = {}
        if args.only and earlier.exists():  # the other benchmarks' figures stay
            kept = json.loads(earlier.read_text())
            earlier_run = kept.pop("run", {})
            partial.write_text(json.dumps(kept))
        for name in steps:
            step = STEPS[name]
            options = step.quick if args.quick else step.full
            budget = step.budget[args.quick]
            print(f"== bench.{name} {' '.join(options)}", flush=True)
            t = time.monotonic()
            argv = [sys.executable, "-m", f"bench.{name}", *options, "--results", str(partial)]
            status = run_step(argv, budget)
            durations[name] = round(time.monotonic() - t, 1)
            kept = json.loads(partial.read_text()).get(name, {}) if partial.exists() else {}
            if status == TIMED_OUT and isinstance(kept, dict) and kept.get("partial"):
                partly.append(f"{name} ({kept['partial']})")
                print(f"== bench.{name}: {partly[-1]}; its figures so far are kept", flush=True)
                continue
            if status == TIMED_OUT:
                failed.append(f"{name} (stopped after {budget:.0f} s)")
            elif status != 0:
                failed.append(f"{name} (exit status {status})")
            if status != 0:
                print(f"== bench.{name} failed: {failed[-1]}", flush=True)
        results: dict[str, Any] = json.loads(partial.read_text()) if partial.exists() else {}
    took = sum(durations.values())
    date = started.isoformat(timespec="seconds")
    run = {"date": date, "quick": args.quick, "machine": machine()}
    if earlier_run:  # a re-run of some: the rest keep their run's figures
        run = earlier_run
        again = [f for f in run.get("failed", []) if f.split()[0] in steps]
        run["failed_then_rerun"] = [*run.get("failed_then_rerun", []), *again]
        failed = [f for f in run.get("failed", []) if f not in again] + failed
        durations = {**run.get("seconds", {}), **durations}
        run["rerun"] = {**run.get("rerun", {}), **dict.fromkeys(steps, date)}
    results["run"] = {**run, "seconds": durations, "failed": failed, "partial": partly}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_plot(results, args.out / PLOT)
    write_report(results, args.out / "RESULTS.md")
    print(f"== wrote {args.out}/results.json, RESULTS.md, results.png in {took / 60:.1f} min")
    if failed:
        print(f"== failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
