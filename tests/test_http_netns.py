"""The HTTP API on real hosts: a request to a follower is answered by the root; with the
root killed, a clear 503, then answers from the new root."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import pytest

from tests.conftest import REPO
from tests.netns import Cluster, Host, require_root_netns
from tests.test_cluster import Nodes, agree_without, nodes, sigkill, start_agreeing, view

__all__ = ["nodes"]  # the fixture, used by name
pytestmark = pytest.mark.netns

API = "127.0.0.1:9998"  # each host's own loopback: no key needed
ASK = """
import json, sys, urllib.error, urllib.request
body = json.dumps({"model": sys.argv[1], "messages": [{"role": "user", "content": "hello"}],
                   "max_tokens": 4}).encode()
request = urllib.request.Request("http://%s/v1/chat/completions" % sys.argv[2], body,
                                 {"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(request, timeout=60) as r:
        print(json.dumps({"status": r.status, "body": json.load(r)}))
except urllib.error.HTTPError as e:
    print(json.dumps({"status": e.code, "retry": e.headers.get("Retry-After"),
                      "body": json.load(e)}))
"""


@pytest.fixture(autouse=True)
def _needs_namespaces() -> None:
    require_root_netns()


def ask(host: Host, model: str = "tiny") -> dict[str, Any]:
    r = host.run([sys.executable, "-c", ASK, model, API], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    answer: dict[str, Any] = json.loads(r.stdout)
    return answer


def test_a_follower_answers_through_the_root_and_a_new_root_takes_over(nodes: Nodes) -> None:
    with Cluster(3) as cluster:
        real_start = nodes.start
        nodes.start = lambda host, name, *extra, **kw: real_start(  # type: ignore[method-assign]
            host, name, "--http", API, *extra, **kw
        )
        daemons, root, followers = start_agreeing(nodes, cluster)
        hosts = {d.dir.name: cluster.hosts[int(d.dir.name[1:])] for d in daemons}
        answer = ask(hosts[followers[0].dir.name])
        assert answer["status"] == 200, answer
        assert answer["body"]["choices"][0]["message"]["content"]
        assert view(root)["status"]["model"]["state"] == "ready"  # the root ran it
        assert not list(followers[0].dir.glob("engine-*.sock"))

        sigkill(root)
        asker = hosts[followers[0].dir.name]
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            seen.append(ask(asker))
            if seen[-1]["status"] == 200:
                break
        statuses = [a["status"] for a in seen]
        assert statuses[-1] == 200, seen
        refused = [a for a in seen if a["status"] != 200]
        for a in refused:
            assert a["status"] == 503 and a["retry"], a
            assert "root" in a["body"]["error"]["message"], a
        print(f"after SIGKILL of the root: {statuses}", [a["body"] for a in refused])
        assert agree_without(followers, root.dir.name)
