"""Re-plans on real daemons in network namespaces: the person's model survives them."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from pathlib import Path

import psutil
import pytest

from hsmdifd.cluster.cluster_secret import write_secret_file
from tests.conftest import Daemon, child_pids, stop_all
from tests.netns import Cluster, require_root_netns
from tests.test_cluster import agree, view, wait_until
from tests.test_distributed import LIMIT, PROMPT, big_model, prompt, root_of, start

pytestmark = pytest.mark.netns

__all__ = ["big_model"]  # the module-scoped fixture, shared with test_distributed


@pytest.fixture(autouse=True)
def _needs_namespaces() -> None:
    require_root_netns()


def model_of(d: Daemon) -> dict[str, object] | None:
    r = d.ctl("--json", "status", timeout=30)
    assert r.returncode == 0, r.stderr
    model = json.loads(r.stdout)["model"]
    return model if isinstance(model, dict) else None


def kill_with_children(d: Daemon) -> None:
    assert d.proc is not None
    children = child_pids(d.proc.pid)
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    for pid in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()


def test_a_returning_worker_never_swaps_the_persons_model(
    short_dir: Path, big_model: Path, tiny_model: Path
) -> None:
    """The default model is a small one; the person loads a big one split over two
    hosts. A worker holding layers is killed mid-answer, the root plans over the two
    left; when the worker comes back the idle root plans again. Whatever the channel to
    the returning worker says meanwhile, the big model is the one that answers next."""
    secret = short_dir / "cluster.secret"
    write_secret_file(secret)
    with Cluster(3, memory_limit_bytes=LIMIT) as cluster:
        daemons = [start(h, short_dir, f"h{h.index}", tiny_model, secret) for h in cluster.hosts]
        try:
            wait_until(lambda: agree(daemons), 30, "agreement")
            root = root_of(daemons)
            r = root.ctl("load", str(big_model))
            assert r.returncode == 0, r.stderr
            for round in range(3):
                holders = {d["name"] for d in view(root)["devices"] if d["layers"]}
                worker = next(d for d in daemons if d.dir.name in holders and d is not root)
                answer = root.ctl_popen(
                    "prompt", PROMPT, "--raw", "--temperature", "0", "--max-tokens", "400"
                )
                assert answer.stdout is not None
                answer.stdout.read(1)  # the answer has started
                kill_with_children(worker)
                answer.communicate(timeout=120)
                assert answer.returncode == 0, f"round {round}"  # it went on without it
                # The next prompt plans over the two left, with the person's model.
                assert prompt(root, 4)["completion_tokens"] == 4
                model = model_of(root)
                assert model is not None and model["path"] == str(big_model), (round, model)

                replans = root.log().count("re-planning")
                worker.start()
                wait_until(lambda: agree(daemons), 30, f"{worker.dir.name} back")
                with contextlib.suppress(AssertionError):  # a plan may be as good as before
                    wait_until(lambda n=replans: root.log().count("re-planning") > n, 10, "re-plan")
                # The idle root may plan again now: it never ends up without the model.
                deadline = time.monotonic() + 60
                while (model := model_of(root)) is None or model["state"] != "ready":
                    assert model is not None, f"round {round}: the model was dropped"
                    assert model["path"] == str(big_model), (round, model)
                    assert time.monotonic() < deadline, f"round {round}: {model}"
                    time.sleep(0.2)
                assert model["path"] == str(big_model), (round, model)
                assert prompt(root, 4)["completion_tokens"] == 4
                model = model_of(root)
                assert model is not None and model["path"] == str(big_model), (round, model)
            assert "following a change in the cluster failed" not in root.log()
            assert all(d.proc is not None and d.proc.poll() is None for d in daemons)
        finally:
            stop_all(daemons)
