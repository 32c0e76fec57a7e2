# ruff: noqa: E501  (tracefs lines, verbatim)
"""bench.wakeups's reading of scheduler traces: the parse of tracefs's text and the split
of a stretch into compute, runnable and transit."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.wakeups import Switch, Waking, breakdown, busiest, parse, wakes_by_name

TRACE = """\
# tracer: nop
          python-4831    [000] d..2. 100.000000: sched_switch: prev_comm=python prev_pid=4831 prev_prio=120 prev_state=S ==> next_comm=swapper/0 next_pid=0 next_prio=120
          <idle>-0       [001] d..2. 100.000010: sched_switch: prev_comm=swapper/1 prev_pid=0 prev_prio=120 prev_state=R ==> next_comm=relay root next_pid=7 next_prio=120
      relay root-7       [001] d..4. 100.000020: sched_waking: comm=relay worker pid=8 prio=120 target_cpu=000
      relay root-7       [001] d..2. 100.000030: sched_switch: prev_comm=relay root prev_pid=7 prev_prio=120 prev_state=S ==> next_comm=swapper/1 next_pid=0 next_prio=120
          <idle>-0       [000] d..2. 100.000070: sched_switch: prev_comm=swapper/0 prev_pid=0 prev_prio=120 prev_state=R ==> next_comm=relay worker next_pid=8 next_prio=120
 CPU:1 [LOST 3 EVENTS]
"""


def test_parse_reads_switches_and_wakings_with_spaces_in_names() -> None:
    events = parse(TRACE.splitlines())
    assert events == [
        Switch(100.0, 4831, "S", 0, "swapper/0"),
        Switch(100.00001, 0, "R", 7, "relay root"),
        Waking(100.00002, 8, "relay worker"),
        Switch(100.00003, 7, "S", 0, "swapper/1"),
        Switch(100.00007, 0, "R", 8, "relay worker"),
    ]


def test_a_wake_up_is_timed_to_its_cpu() -> None:
    wakes = wakes_by_name(parse(TRACE.splitlines()), "relay ")
    assert wakes.count == 1
    assert wakes.latencies == pytest.approx((50e-6,))


def test_the_stretch_splits_into_compute_runnable_and_transit() -> None:
    # A computes 10 ms, sends to B and sleeps; B is woken 1 ms later, gets a CPU 0.5 ms
    # after that, computes 5 ms and is preempted for 0.2 ms, then 3 ms more.
    events: list[Switch | Waking] = [
        Switch(0.0, 0, "R", 1, "a"),
        Switch(0.010, 1, "S", 0, "idle"),
        Waking(0.011, 2, "b"),
        Switch(0.0115, 0, "R", 2, "b"),
        Switch(0.0165, 2, "R+", 9, "other"),
        Switch(0.0167, 9, "S", 2, "b"),
        Switch(0.0197, 2, "S", 0, "idle"),
    ]
    b = breakdown(events, {1, 2})
    assert b.compute == pytest.approx(0.018)
    assert b.runnable == pytest.approx(0.0007)
    assert b.transit == pytest.approx(0.001)
    assert b.window == pytest.approx(0.0197)
    assert busiest(events, 1) == {1}


def test_no_computing_thread_seen_is_an_empty_stretch() -> None:
    assert breakdown([Waking(1.0, 3, "x")], {1}).window == 0


@st.composite
def schedules(draw: st.DrawFn) -> list[Switch | Waking]:
    """Events of 2 CPUs running tasks 1-4 (0 is idle), in time order."""
    on_cpu = [0, 0]
    events: list[Switch | Waking] = []
    ts = 0.0
    for _ in range(draw(st.integers(1, 40))):
        ts += draw(st.floats(0, 0.01))
        if draw(st.booleans()):
            events.append(Waking(ts, draw(st.integers(1, 4)), "t"))
            continue
        cpu = draw(st.integers(0, 1))
        nxt = draw(st.sampled_from([t for t in range(5) if t == 0 or t not in on_cpu]))
        events.append(Switch(ts, on_cpu[cpu], draw(st.sampled_from(["S", "R", "D"])), nxt, "t"))
        on_cpu[cpu] = nxt
    return events


@given(schedules(), st.sets(st.integers(1, 4), min_size=1))
def test_the_parts_add_up_to_the_stretch(
    events: list[Switch | Waking], computing: set[int]
) -> None:
    b = breakdown(events, computing)
    starts = [e.ts for e in events if isinstance(e, Switch) and e.next in computing]
    ends = [e.ts for e in events if isinstance(e, Switch) and e.prev in computing]
    expected = max(ends) - min(starts) if starts and ends else 0.0
    assert min(b.compute, b.runnable, b.transit) >= 0
    assert b.window == pytest.approx(max(expected, 0.0), abs=1e-12)
