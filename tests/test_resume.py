"""An answer goes on when a device holding layers is lost mid-answer: the root places
the model again over the devices left and continues the same stream, on real daemons in
network namespaces with memory caps. One cluster of four hosts serves every case."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdif.proto import hsmdif_pb2_grpc as pb_grpc
from hsmdifd.cluster.cluster_secret import write_secret_file
from tests import oracle_client
from tests.conftest import REPO, Daemon, child_pids, stop_all
from tests.netns import Cluster, require_root_netns
from tests.test_cluster import agree, alive_names, status_of, view, wait_until
from tests.test_distributed import LIMIT, PROMPT, big_model, root_of, start
from tests.test_replan import kill_with_children

pytestmark = pytest.mark.netns

__all__ = ["big_model"]  # the module-scoped fixture, shared with test_distributed

TOKENS = 96
CHECKED = 32  # tokens of a continuation checked against llama.cpp by hand
API = "127.0.0.1:9998"  # each host's own loopback: no key needed
RESUMED = re.compile(r"(\S+) was lost; resumed on (.+) after ([\d.]+) s")


@pytest.fixture(scope="module")
def four(big_model: Path) -> Iterator[tuple[Cluster, list[Daemon]]]:
    """Four hosts of 600 MiB each, the 690 MB model loaded on the root."""
    require_root_netns()
    base = Path(tempfile.mkdtemp(prefix="hsm-", dir="/tmp"))
    secret = base / "cluster.secret"
    write_secret_file(secret)
    try:
        with Cluster(4, memory_limit_bytes=LIMIT) as cluster:
            daemons = [
                start(h, base, f"h{h.index}", big_model, secret, http=API) for h in cluster.hosts
            ]
            try:
                wait_until(lambda: agree(daemons), 30, "agreement")
                r = root_of(daemons).ctl("load")
                assert r.returncode == 0, r.stderr
                yield cluster, daemons
            finally:
                stop_all(daemons)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def holders(root: Daemon) -> list[str]:
    """The devices holding layers of the loaded model, root first."""
    return [d["name"] for d in view(root)["devices"] if d["layers"]]


def a_worker_holding_layers(root: Daemon, daemons: list[Daemon]) -> Daemon:
    held = holders(root)
    return next(d for d in daemons if d.dir.name in held and d is not root)


class Stream:
    """A greedy raw answer read on the root's control socket, every token timed; `lose`
    runs once `lose_at` tokens have come."""

    def __init__(
        self, root: Daemon, tokens: int, lose_at: int = 0, produced: tuple[int, ...] = ()
    ) -> None:
        self.request = pb.GenerateRequest(
            prompt=PROMPT, raw=True, max_tokens=tokens, temperature=0.0
        )
        self.request.produced_tokens.extend(produced)
        self.root = root
        self.lose_at = lose_at
        self.tokens: list[int] = []
        self.arrivals: list[tuple[float, int]] = []  # (when, tokens so far)
        self.notices: list[str] = []
        self.stats: pb.GenerateStats | None = None
        self.error = ""
        self.started = self.lost_at = 0.0

    def run(self, lose: Callable[[], None] | None = None) -> Stream:
        self.started = time.monotonic()
        with grpc.insecure_channel(f"unix:{self.root.socket}") as channel:
            try:
                for event in pb_grpc.ControlStub(channel).Generate(self.request, timeout=300):
                    kind = event.WhichOneof("event")
                    if kind == "text":
                        self.tokens.extend(event.tokens)
                        self.arrivals.append((time.monotonic(), len(self.tokens)))
                        due = len(self.tokens) >= self.lose_at
                        if lose is not None and due and not self.lost_at:
                            lose()
                            self.lost_at = time.monotonic()
                    elif kind == "notice":
                        self.notices.append(event.notice)
                    elif kind == "done":
                        self.stats = event.done
            except grpc.RpcError as e:
                self.error = str(e.details())
        return self

    def gap(self) -> float:
        """Seconds from the loss to the next token at the client."""
        after = [t for t, _ in self.arrivals if t > self.lost_at]
        return after[0] - self.lost_at if after else float("nan")

    def first_token_seconds(self) -> float:
        return self.arrivals[0][0] - self.started if self.arrivals else float("nan")


def ctl_losing(
    root: Daemon, lose: Callable[[], None], tokens: int = TOKENS
) -> tuple[int, str, str, float]:
    """`hsmdifctl prompt`, a long greedy raw answer during which `lose` runs once text
    flows: the exit status, stdout, stderr, and seconds from the loss to the exit."""
    answer = root.ctl_popen(
        "prompt", PROMPT, "--raw", "--temperature", "0", "--max-tokens", str(tokens)
    )
    assert answer.stdout is not None
    first = answer.stdout.read(8)  # the answer is streaming
    lost_at = time.monotonic()
    lose()
    out, err = answer.communicate(timeout=180)
    return answer.returncode, first + out, err, time.monotonic() - lost_at


def resumed_lines(err: str) -> list[tuple[str, list[str], float]]:
    return [(m[1], m[2].split(", "), float(m[3])) for m in RESUMED.finditer(err)]


def by_hand(
    cluster: Cluster, root: Daemon, model: Path, after: list[int], tokens: int
) -> list[int]:
    """The token ids llama.cpp driven by hand produces on the split the root plans now,
    from the prompt followed by `after`: fresh rpc-workers on the same hosts."""
    info = json.loads(root.ctl("plan", "--json").stdout)
    assert [d["name"] for d in info["devices"]] == holders(root)
    assert root.ctl("unload").returncode == 0
    by_name = {f"h{h.index}": h for h in cluster.hosts}
    ids = [str(t) for t in after]
    args = ["--n-ctx", "512", "--tokens", str(tokens), "--ids", "--after", *ids]
    oracle = oracle_client.by_hand(by_name, info, model, PROMPT, *args)
    assert oracle.returncode == 0, oracle.stderr[-2000:]
    return [int(t) for t in oracle.stdout.split()]


def placed(root: Daemon) -> bool:
    """The model is ready on the root and a worker."""
    model = status_of(root)["model"]
    return bool(model) and model["state"] == "ready" and len(holders(root)) > 1


def back(daemons: list[Daemon], *returning: Daemon) -> None:
    """Start `returning` again; once all agree, the model is placed over them (an idle
    root may be placing it anew after the change), loaded if it is not."""
    for d in returning:
        if d.proc is None or d.proc.poll() is not None:
            d.start()
    wait_until(lambda: agree(daemons), 30, "all back")
    root = root_of(daemons)
    with contextlib.suppress(AssertionError):
        wait_until(lambda: placed(root), 20, "the model placed again")
    if not placed(root):
        r = root.ctl("load")
        assert r.returncode == 0 and placed(root), r.stderr


def up(daemons: list[Daemon], *lost: Daemon) -> bool:
    return all(d.proc is not None and d.proc.poll() is None for d in daemons if d not in lost)


def test_a_killed_worker_costs_the_answer_nothing(
    four: tuple[Cluster, list[Daemon]], big_model: Path
) -> None:
    """SIGKILL a worker holding layers mid-answer: the answer goes on over the devices
    left, every token once, and the continuation is llama.cpp's on the new split from
    the prompt and the tokens already produced."""
    cluster, daemons = four
    root = root_of(daemons)
    victim = a_worker_holding_layers(root, daemons)
    answer = Stream(root, TOKENS, lose_at=8).run(lambda: kill_with_children(victim))
    assert not answer.error and answer.stats is not None, answer.error
    assert answer.stats.completion_tokens == TOKENS and len(answer.tokens) == TOKENS
    assert answer.stats.resumes == 1, answer.stats
    (at,) = answer.stats.resumed_at
    assert 8 <= at < TOKENS, answer.stats
    ((lost, on, gap),) = resumed_lines("\n".join(answer.notices))
    assert lost == victim.dir.name and lost not in on and on == holders(root), answer.notices
    assert 0 < gap < 10 and answer.stats.resume_gap_seconds == pytest.approx(gap, abs=0.06)
    print(f"resumed at token {at} on {on} after {gap:.2f} s ({answer.gap():.2f} s here)")
    tokens = answer.tokens
    assert by_hand(cluster, root, big_model, tokens[:at], CHECKED) == tokens[at : at + CHECKED]
    assert up(daemons, victim)
    back(daemons, victim)  # by_hand unloaded the model: this loads it again


def test_a_frozen_worker_costs_the_answer_nothing(four: tuple[Cluster, list[Daemon]]) -> None:
    """SIGSTOP a worker holding layers mid-answer: once it counts as dead the answer
    goes on over the devices left."""
    _, daemons = four
    root = root_of(daemons)
    victim = a_worker_holding_layers(root, daemons)
    assert victim.proc is not None
    frozen = [victim.proc.pid, *child_pids(victim.proc.pid)]

    def freeze() -> None:
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)

    try:
        code, _, err, _ = ctl_losing(root, freeze)
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    assert code == 0, err
    ((lost, on, gap),) = resumed_lines(err)
    assert lost == victim.dir.name and lost not in on, err
    assert 1.0 < gap < 15, err  # it counts as dead after dead_after (1.5 s)
    assert f"Generated {TOKENS} tokens" in err and "Resumed once after losing a device" in err
    back(daemons)


def test_a_chat_answer_survives_two_losses_and_is_kept_once(
    four: tuple[Cluster, list[Daemon]],
) -> None:
    """`hsmdifctl chat`: two workers lost one after the other in one answer, which goes
    on each time; the next turn is answered with that answer in its history once (its
    prompt is no longer than the conversation with the answer in it once)."""
    _, daemons = four
    root = root_of(daemons)
    first = a_worker_holding_layers(root, daemons)
    lost: list[Daemon] = [first]

    def lose_two() -> None:
        kill_with_children(first)
        wait_until(
            lambda: first.dir.name not in holders(root) and len(holders(root)) > 1,
            60,
            "the answer placed again",
        )
        second = a_worker_holding_layers(root, daemons)
        lost.append(second)
        time.sleep(0.5)
        kill_with_children(second)

    chat = root.ctl_popen("chat", "--temperature", "0", "--max-tokens", str(TOKENS))
    assert chat.stdin is not None and chat.stdout is not None
    chat.stdin.write("once upon a time\nand then?\n")
    chat.stdin.close()
    assert chat.stderr is not None
    chat.stdout.read(8)  # the first answer is streaming
    lose_two()
    chat.stdout.read()
    err = chat.stderr.read()
    chat.wait(240)
    assert chat.returncode == 0, err
    assert [line[0] for line in resumed_lines(err)] == [d.dir.name for d in lost], err
    assert "Resumed 2 times after losing a device" in err, err
    figures = [
        (int(n), int(p)) for n, p in re.findall(r"Generated (\d+) tokens \(prompt (\d+)", err)
    ]
    assert len(figures) == 2 and figures[0][0] == TOKENS, err
    (answered, asked), (_, again) = figures
    # The answer's text tokenized again takes 1.5 to 2 times its tokens (this model's
    # text has many replacement characters); twice over, it would take twice that.
    assert asked + answered < again < asked + answered * 27 // 10 + 40, figures
    assert up(daemons, *lost)
    back(daemons, *lost)


SSE = """
import json, sys, urllib.request
body = json.dumps({"model": "big", "prompt": sys.argv[1], "max_tokens": int(sys.argv[2]),
                   "temperature": 0, "stream": True}).encode()
request = urllib.request.Request("http://%s/v1/completions" % sys.argv[3], body,
                                 {"Content-Type": "application/json"})
with urllib.request.urlopen(request, timeout=180) as r:
    for line in r:
        print(line.decode().rstrip(), flush=True)
"""


def test_an_http_stream_just_goes_on(four: tuple[Cluster, list[Daemon]]) -> None:
    """/v1/completions with stream: a worker SIGKILLed mid-answer, the SSE stream goes
    on to its last token and [DONE], with no error in it."""
    cluster, daemons = four
    root = root_of(daemons)
    victim = a_worker_holding_layers(root, daemons)
    host = cluster.hosts[int(root.dir.name[1:])]
    stream = host.popen(
        [sys.executable, "-c", SSE, PROMPT, str(TOKENS), API],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert stream.stdout is not None
    lines = [stream.stdout.readline() for _ in range(6)]  # text is streaming
    kill_with_children(victim)
    out, err = stream.communicate(timeout=180)
    assert stream.returncode == 0, err
    events = [e[len("data: ") :] for e in lines + out.splitlines() if e.startswith("data: ")]
    assert events[-1].strip() == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks), chunks
    text = "".join(c["choices"][0].get("text", "") for c in chunks if c.get("choices"))
    assert len(text) > TOKENS // 2, text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length", chunks[-1]
    assert f"{victim.dir.name} was lost mid-answer" in root.log()
    back(daemons, victim)


def test_a_lost_root_hands_the_answer_to_the_next(four: tuple[Cluster, list[Daemon]]) -> None:
    """The root SIGKILLed mid-answer while the prompt was given on another device: that
    device asks the root elected next to go on from the tokens it relayed."""
    _, daemons = four
    root = root_of(daemons)
    asker = next(d for d in daemons if d is not root)
    code, out, err, _ = ctl_losing(asker, lambda: kill_with_children(root))
    assert code == 0, err
    ((lost, on, _),) = resumed_lines(err)
    assert lost == root.dir.name and on == [view(asker)["status"]["root"]], err
    assert f"Generated {TOKENS} tokens" in err and "Resumed once" in err, err
    assert out.strip()
    back(daemons, root)


def test_a_lost_root_whose_model_file_the_next_lacks_ends_with_a_sentence(
    four: tuple[Cluster, list[Daemon]], big_model: Path
) -> None:
    """The same, when the root elected next has no file at the model's path (here the
    file is moved away once the model is loaded): the answer ends with a sentence that
    names the new root and the path, and the daemons stay up."""
    _, daemons = four
    root = root_of(daemons)
    asker = next(d for d in daemons if d is not root)
    aside = big_model.with_name(big_model.name + ".aside")
    big_model.rename(aside)
    try:
        code, _, err, _ = ctl_losing(asker, lambda: kill_with_children(root))
        new_root = view(asker)["status"]["root"]
    finally:
        aside.rename(big_model)
    assert code == 1, err
    assert f"cannot go on on {new_root}, the new root" in err, err
    assert f"no model file {big_model}" in err, err
    assert up(daemons, root)
    back(daemons, root)


def test_devices_left_too_small_end_the_answer_within_5_s(
    four: tuple[Cluster, list[Daemon]],
) -> None:
    """With only the root and one worker left, losing the worker ends the answer with a
    sentence naming it and the shortfall; the next prompt after it returns works."""
    _, daemons = four
    root = root_of(daemons)
    worker = a_worker_holding_layers(root, daemons)
    spare = [d for d in daemons if d not in (root, worker)]
    for d in spare:
        d.stop()
    wait_until(lambda: alive_names(view(root)) == {root.dir.name, worker.dir.name}, 30, "two left")
    code, _, err, took = ctl_losing(root, lambda: kill_with_children(worker))
    assert code == 1, err
    assert f"{worker.dir.name} was lost mid-answer and the devices left cannot hold" in err, err
    assert "MiB" in err, err
    assert took < 5, f"{took:.1f} s to end the answer"
    assert up([root])
    back(daemons, worker, *spare)
    r = root.ctl("prompt", PROMPT, "--raw", "--temperature", "0", "--max-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["completion_tokens"] == 4
