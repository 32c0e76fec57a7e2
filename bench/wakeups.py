"""Where a decoded token's time goes: a scheduler trace of hsmdif and of llama.cpp RPC
by hand on the same split.

    sudo python -m bench.wakeups [--hosts 2 3] [--pairs N] [--tokens N]

bench.distributed gives the ratio of the two speeds; on a shared machine the speed of
the computation itself drifts by several percent from one generation to the next,
which hides a cost of that size. This one records the kernel's scheduler events
(tracefs: sched_switch and sched_waking, in a trace instance of its own) during each
generation of back-to-back pairs, on the hosts and split of bench.distributed, and
splits each path's time per token by what its computing threads did (as many as there
are hosts, the busiest: llama.cpp's on the root and each rpc-worker's): "compute", one of
them on a CPU; "runnable", none on a CPU but one woken and waiting for one; "transit",
all of them asleep, waiting for a message on its way (through the relays, on
hsmdif's path). It prints those per token for each path, their difference, and how
often the relays' copy threads were woken per token and how long each wake-up took
to get a CPU. Nothing is written.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from bench.common import HandRpc, Timing, hsmdif_prompt
from bench.distributed import MODEL, RELAY_THREAD, loaded_split

TRACEFS = Path("/sys/kernel/tracing")
INSTANCE = "hsmdif-wakeups"
EVENTS = ("sched/sched_switch", "sched/sched_waking")
BUFFER_KB = 65536  # per CPU: a 64-token generation on 3 hosts writes about 6 MB of text

_LINE = re.compile(r"^\s*.+?-\d+\s+\[(\d+)\]\s+\S+\s+([\d.]+): (sched_switch|sched_waking): (.*)$")
_SWITCH = re.compile(
    r"prev_pid=(\d+) prev_prio=-?\d+ prev_state=(\S+) ==> next_comm=(.*) next_pid=(\d+)"
)
_WAKING = re.compile(r"comm=(.*) pid=(\d+) prio")


class Switch(NamedTuple):
    """A CPU went from task `prev` (leaving in `prev_state`) to task `next`."""

    ts: float
    prev: int
    prev_state: str
    next: int
    next_comm: str


class Waking(NamedTuple):
    """Task `pid` was woken."""

    ts: float
    pid: int
    comm: str


Event = Switch | Waking


def parse(lines: Iterable[str]) -> list[Event]:
    """The sched_switch and sched_waking events of tracefs's text, in order."""
    events: list[Event] = []
    for line in lines:
        m = _LINE.match(line)
        if m is None:
            continue
        ts, name, fields = float(m[2]), m[3], m[4]
        if name == "sched_switch" and (s := _SWITCH.search(fields)):
            events.append(Switch(ts, int(s[1]), s[2], int(s[4]), s[3]))
        elif name == "sched_waking" and (w := _WAKING.search(fields)):
            events.append(Waking(ts, int(w[2]), w[1]))
    return events


def run_time(events: Sequence[Event]) -> dict[int, float]:
    """Seconds on a CPU of each task (the idle task, 0, left out)."""
    since: dict[int, float] = {}
    total: defaultdict[int, float] = defaultdict(float)
    for e in events:
        if isinstance(e, Switch):
            if e.prev in since:
                total[e.prev] += e.ts - since.pop(e.prev)
            since[e.next] = e.ts
    total.pop(0, None)
    return dict(total)


def busiest(events: Sequence[Event], n: int) -> set[int]:
    """The `n` tasks that were on a CPU longest."""
    times = run_time(events)
    return set(sorted(times, key=times.__getitem__, reverse=True)[:n])


@dataclass(frozen=True)
class Breakdown:
    """Seconds of a traced stretch by what its computing threads were doing."""

    compute: float = 0.0
    runnable: float = 0.0
    transit: float = 0.0

    @property
    def window(self) -> float:
        return self.compute + self.runnable + self.transit

    def per_token_ms(self, tokens: int) -> dict[str, float]:
        return {
            k: 1000 * getattr(self, k) / tokens
            for k in ("window", "compute", "runnable", "transit")
        }


def breakdown(events: Sequence[Event], computing: set[int]) -> Breakdown:
    """Split the time from the first time one of `computing` got a CPU to the last time
    one left it: "compute" while one of them runs, "runnable" while none runs and one
    waits for a CPU (woken, or preempted), "transit" while all of them sleep."""
    switches = [e for e in events if isinstance(e, Switch)]
    starts = [e.ts for e in switches if e.next in computing]
    ends = [e.ts for e in switches if e.prev in computing]
    if not starts or not ends:
        return Breakdown()
    first, last = min(starts), max(ends)
    state = dict.fromkeys(computing, "sleep")
    spent: defaultdict[str, float] = defaultdict(float)
    previous = first
    for e in events:
        if e.ts > last:
            break
        if e.ts >= first:
            states = state.values()
            now = (
                "compute"
                if "running" in states
                else "runnable"
                if "runnable" in states
                else "transit"
            )
            spent[now] += e.ts - previous
            previous = e.ts
        if isinstance(e, Waking):
            if state.get(e.pid) == "sleep":
                state[e.pid] = "runnable"
        else:
            if e.prev in state:
                state[e.prev] = "runnable" if e.prev_state.startswith("R") else "sleep"
            if e.next in state:
                state[e.next] = "running"
    return Breakdown(spent["compute"], spent["runnable"], spent["transit"])


@dataclass(frozen=True)
class Wakes:
    """Wake-ups of the tasks of one name: how many, and seconds from each to its CPU."""

    count: int
    latencies: tuple[float, ...]


def wakes_by_name(events: Sequence[Event], prefix: str) -> Wakes:
    """The wake-ups of the tasks whose name starts with `prefix`."""
    woken: dict[int, float] = {}
    latencies: list[float] = []
    for e in events:
        if isinstance(e, Waking):
            if e.comm.startswith(prefix):
                woken.setdefault(e.pid, e.ts)
        elif e.next in woken:
            latencies.append(e.ts - woken.pop(e.next))
    return Wakes(len(latencies), tuple(latencies))


class Tracer:
    """A tracefs instance of its own recording the scheduler's events."""

    def __init__(self, root: Path = TRACEFS) -> None:
        if not (root / "instances").is_dir():
            raise SystemExit(
                f"no tracefs at {root}: mount it (mount -t tracefs nodev {root}) and run as root"
            )
        self.dir = root / "instances" / INSTANCE
        with contextlib.suppress(FileExistsError):
            self.dir.mkdir()
        (self.dir / "tracing_on").write_text("0")
        (self.dir / "buffer_size_kb").write_text(str(BUFFER_KB))
        (self.dir / "trace_clock").write_text("mono")
        for event in EVENTS:
            (self.dir / "events" / event / "enable").write_text("1")

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[Event]]:
        """Record for the length of the block; the events fill the list after it."""
        events: list[Event] = []
        (self.dir / "trace").write_text("")
        (self.dir / "tracing_on").write_text("1")
        try:
            yield events
        finally:
            (self.dir / "tracing_on").write_text("0")
        with (self.dir / "trace").open() as text:
            events.extend(parse(text))

    def close(self) -> None:
        (self.dir / "tracing_on").write_text("0")
        with contextlib.suppress(OSError):
            self.dir.rmdir()  # the kernel empties an instance as it removes it


@dataclass
class Traced:
    """The traced generations of one path."""

    speeds: list[float]
    tokens: list[int]
    per_token: list[dict[str, float]]
    relay_wakes: list[Wakes]

    def median(self, key: str) -> float:
        return statistics.median(t[key] for t in self.per_token)


def trace_one(
    tracer: Tracer, generate: Callable[[int], Timing], tokens: int, hosts: int, into: Traced
) -> None:
    """Generate `tokens` tokens under the trace and add what it shows to `into`."""
    with tracer.recording() as events:
        timing = generate(tokens)
    into.speeds.append(timing.tokens_per_s)
    into.tokens.append(timing.tokens)
    into.per_token.append(breakdown(events, busiest(events, hosts)).per_token_ms(timing.tokens))
    into.relay_wakes.append(wakes_by_name(events, RELAY_THREAD))


def measure(hosts: int, pairs: int, tokens: int, tracer: Tracer) -> tuple[Traced, Traced]:
    """hsmdif and llama.cpp RPC by hand on `hosts` hosts, `pairs` traced pairs."""
    ours, theirs = Traced([], [], [], []), Traced([], [], [], [])
    with loaded_split(hosts, MODEL.path()) as (_daemons, root, order, plan, _usable):
        hsmdif_prompt(root, 8)  # warm up
        with HandRpc(order[0], order[1:], MODEL.path(), plan["n_ctx"]) as by_hand:
            by_hand.load(plan["n_gpu_layers"], plan["tensor_split"])
            by_hand.generate(8)
            for i in range(pairs):  # alternate which goes first
                runs = [
                    (lambda n: hsmdif_prompt(root, n), ours),
                    (by_hand.generate, theirs),
                ]
                for generate, into in runs[:: 1 if i % 2 else -1]:
                    trace_one(tracer, generate, tokens, hosts, into)
                print(
                    f"{hosts} hosts, pair {i + 1}: {ours.speeds[-1]:.2f} / "
                    f"{theirs.speeds[-1]:.2f} tokens/s",
                    flush=True,
                )
    return ours, theirs


def report(hosts: int, ours: Traced, theirs: Traced) -> None:
    """Medians per token of each path's parts, their difference, and the relays' wakes."""
    ratio = statistics.median(a / b for a, b in zip(ours.speeds, theirs.speeds, strict=True))
    print(f"\n{hosts} hosts, {len(ours.speeds)} pairs, median speed ratio {ratio:.3f}")
    print(f"{'ms per token':<16}{'window':>9}{'compute':>9}{'runnable':>10}{'transit':>9}")
    keys = ("window", "compute", "runnable", "transit")
    for name, t in (("hsmdif", ours), ("by hand", theirs)):
        print(f"{name:<16}" + "".join(f"{t.median(k):>{len(k) + 3}.2f}" for k in keys))
    print(
        f"{'difference':<16}"
        + "".join(f"{ours.median(k) - theirs.median(k):>+{len(k) + 3}.2f}" for k in keys)
    )
    latencies = sorted(x for w in ours.relay_wakes for x in w.latencies)
    if latencies:
        count = sum(w.count for w in ours.relay_wakes) / sum(ours.tokens)
        print(
            f"relay threads: {count:.1f} wake-ups per token, from wake-up to a CPU "
            f"median {1e6 * statistics.median(latencies):.0f} us, "
            f"mean {1e6 * statistics.mean(latencies):.0f} us"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hosts", type=int, nargs="+", default=[2, 3], choices=[2, 3])
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    tracer = Tracer()
    try:
        results = {n: measure(n, args.pairs, args.tokens, tracer) for n in args.hosts}
    finally:
        tracer.close()
    for n, (ours, theirs) in results.items():
        report(n, ours, theirs)


if __name__ == "__main__":
    main()
