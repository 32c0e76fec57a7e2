"""Random input to the Peer service of a real daemon, over its real TLS socket.

Requests are random bytes and random valid protobuf messages, built from the message
descriptors in hsmdif/proto, sent by a caller holding the cluster secret (each with a
valid proof: authenticated, its content arbitrary) and by callers without it. What a
user would check afterwards: no reply was UNKNOWN or INTERNAL, every refusal said why
in a sentence, the daemon still runs and answers `hsmdifctl status` within a second,
its model still answers a prompt, the policy version stayed within its bounds, and the
log did not grow with every bad request.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import secrets
import shutil
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdifd.cluster import auth, tls
from hsmdifd.cluster.cluster_secret import generate_secret, load_secret, write_secret_file
from hsmdifd.engine.rpc import free_port
from tests.conftest import Daemon, stop_all, write_config
from tests.tinymodel import write_tiny_llama

CALLER = "fuzzer-0001"
SERVICE = pb.DESCRIPTOR.services_by_name["Peer"]
METHODS = {m.name: m for m in SERVICE.methods}
CALL_TIMEOUT = 5.0
MAX_POLICY_VERSION = 2**53
POLICY_AHEAD = 1000
EXAMPLES = 400  # the module takes 10 to 25 s on 2 busy cores
BAD_CODES = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
OK_OR_GONE = (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)

# --------------------------------------------------------------- strategies

_INTS = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "0", "/", "/etc/passwd", "capacity", "latency", "4bit", "8bit"]),
    st.just("x" * 5000),
)


def _integers(field: FieldDescriptor) -> st.SearchStrategy[int]:
    lo, hi = _INTS[field.type]
    edges = [v for v in (lo, hi, -1, 0, 1, 2, 1000, 2**53, 2**53 + 1) if lo <= v <= hi]
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi), st.integers(0, 100))


def scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.type in _INTS:
        return _integers(field)
    if field.type == FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32)
    if field.type == FieldDescriptor.TYPE_DOUBLE:
        return st.floats()
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type == FieldDescriptor.TYPE_STRING:
        return _TEXT
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if field.type == FieldDescriptor.TYPE_ENUM:  # proto3 enums are open: any int32 is valid
        assert field.enum_type is not None
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-(2**31), 2**31 - 1))
    raise AssertionError(f"no strategy for field {field.full_name}")


def messages(descriptor: Descriptor, depth: int = 3) -> st.SearchStrategy[Message]:
    """Random valid messages of `descriptor`: any subset of fields set, any values."""
    cls = _class(descriptor)

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message = cls()
        for field in descriptor.fields:
            if not draw(st.booleans()):
                continue
            is_message = field.type == FieldDescriptor.TYPE_MESSAGE
            if is_message and depth == 0:
                continue
            values = (
                messages(field.message_type, depth - 1)
                if field.message_type is not None
                else scalar(field)
            )
            if field.is_repeated:
                items = draw(st.lists(values, max_size=3))
                target = getattr(message, field.name)
                if is_message:
                    for item in items:
                        target.add().CopyFrom(item)
                else:
                    target.extend(items)
            elif is_message:
                getattr(message, field.name).CopyFrom(draw(values))
            else:
                setattr(message, field.name, draw(values))
        return message

    return build()


def _class(descriptor: Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(descriptor)


def requests_for(name: str) -> st.SearchStrategy[Message]:
    """Random requests to `name`; a status names the caller itself now and then (else it
    is refused at once), so the handler behind the check is reached too."""
    base = messages(METHODS[name].input_type)
    if name != "Status":
        return base

    def as_caller(status: Message) -> Message:
        status.device.id = CALLER  # type: ignore[attr-defined]
        return status

    return st.one_of(base, base.map(as_caller))


calls = st.sampled_from(sorted(METHODS)).flatmap(
    lambda name: st.tuples(st.just(name), st.one_of(requests_for(name), st.binary(max_size=200)))
)

# --------------------------------------------------------------- the daemon and callers


@dataclass
class Peer:
    daemon: Daemon
    target: str
    secret: bytes
    node_id: str
    channel: grpc.Channel  # holds a certificate of the cluster
    outsider: grpc.Channel  # holds a certificate of another cluster
    adoptive_calls: int = 0  # calls that may carry a policy to adopt (SetPolicy, Status)
    replies: Counter[tuple[str, grpc.StatusCode]] = dataclasses.field(default_factory=Counter)
    started_policy: int = 0


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    base = Path(tmp_path_factory.mktemp("peer"))
    short = Path(f"/tmp/hsm-peer-{secrets.token_hex(4)}")
    short.mkdir()
    secret_file = base / "cluster.secret"
    write_secret_file(secret_file)
    model = write_tiny_llama(base / "tiny.gguf")
    port = free_port("127.0.0.1")
    config = write_config(short / "hsmdifd.toml", model)
    d = Daemon(dir=short, config=config)
    d.extra_args = ["--secret-file", str(secret_file), "--listen", "127.0.0.1"]
    d.extra_args += ["--port", str(port), "--advertise", "127.0.0.1"]
    d.start()
    try:
        r = d.ctl("load")
        assert r.returncode == 0, r.stderr
        secret = load_secret(secret_file)
        node_id = (d.state_dir / "node_id").read_text().strip()
        ours = tls.device_credentials(secret, CALLER, base / "caller")
        theirs = tls.device_credentials(generate_secret(), CALLER, base / "other")
        target = f"127.0.0.1:{port}"
        options = tls.CHANNEL_OPTIONS
        channel = grpc.secure_channel(target, tls.channel_credentials(ours), options)
        outsider = grpc.secure_channel(target, tls.channel_credentials(theirs), options)
        p = Peer(d, target, secret, node_id, channel, outsider)
        # A policy of its own (version 1): from there on a version climbs at most 1000 a
        # step (a device at version 0 catches up with any version, as a late joiner).
        r = d.ctl("devices", "--priority", node_id)
        assert r.returncode == 0, r.stderr
        p.started_policy = policy_version(d)
        assert p.started_policy > 0
        yield p
        channel.close()
        outsider.close()
    finally:
        stop_all([d])
        shutil.rmtree(short, ignore_errors=True)


def policy_version(d: Daemon) -> int:
    r = d.ctl("--json", "status", timeout=10)
    assert r.returncode == 0, r.stderr
    version: int = json.loads(r.stdout)["policy"]["version"]
    return version


def _identity(data: bytes) -> bytes:
    return data


def call(
    channel: grpc.Channel, name: str, request: Message | bytes, metadata: Any
) -> tuple[grpc.StatusCode, str]:
    """One call, its reply (every message of a stream) read; its code and details."""
    method = METHODS[name]
    path = f"/{SERVICE.full_name}/{name}"
    serialize: Callable[[Any], bytes] = (
        _identity if isinstance(request, bytes) else lambda m: m.SerializeToString()
    )
    try:
        if method.server_streaming:
            stream = channel.unary_stream(path, serialize, _identity)
            for _ in stream(request, timeout=CALL_TIMEOUT, metadata=metadata):
                pass
        else:
            channel.unary_unary(path, serialize, _identity)(
                request, timeout=CALL_TIMEOUT, metadata=metadata
            )
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def proof(p: Peer, name: str, request: Message | bytes) -> Any:
    metadata, _nonce = auth.sign(
        p.secret, CALLER, p.node_id, f"/{SERVICE.full_name}/{name}", auth.digest(request)
    )
    return metadata


def assert_said_why(code: grpc.StatusCode, details: str, what: str) -> None:
    assert code not in BAD_CODES, f"{what}: {code.name} {details!r}"
    if code not in OK_OR_GONE:
        assert len(details) >= 12 and " " in details, f"{what}: {code.name} {details!r}"


# --------------------------------------------------------------- the tests


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(calls)
def test_random_requests_from_a_secret_holder_are_answered_or_refused_with_a_sentence(
    peer: Peer, name_request: tuple[str, Message | bytes]
) -> None:
    name, request = name_request
    code, details = call(peer.channel, name, request, proof(peer, name, request))
    peer.replies[name, code] += 1
    assert_said_why(code, details, f"{name}({request!r})")
    if name in ("SetPolicy", "Status"):
        peer.adoptive_calls += 1
    assert peer.daemon.proc is not None and peer.daemon.proc.poll() is None, peer.daemon.log()


@settings(max_examples=EXAMPLES // 3, deadline=None, suppress_health_check=list(HealthCheck))
@given(calls, st.booleans())
def test_random_requests_without_the_secret_are_refused_with_a_sentence(
    peer: Peer, name_request: tuple[str, Message | bytes], outsider: bool
) -> None:
    """A caller with another cluster's certificate never gets through TLS; one with a
    certificate but a proof made with another secret is refused by the proof check."""
    name, request = name_request
    if outsider:
        code, details = call(peer.outsider, name, request, proof(peer, name, request))
        assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
    else:
        forged, _ = auth.sign(
            secrets.token_bytes(32),
            CALLER,
            peer.node_id,
            f"/{SERVICE.full_name}/{name}",
            auth.digest(request),
        )
        code, details = call(peer.channel, name, request, forged)
        if name != "Hello":
            assert code == grpc.StatusCode.UNAUTHENTICATED, (code, details)
    assert_said_why(code, details, f"{name} without the secret")


def test_random_bytes_on_the_port_leave_the_daemon_serving(peer: Peer) -> None:
    host, port = peer.target.rsplit(":", 1)
    for size in (0, 1, 24, 100, 5000):
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(secrets.token_bytes(size))
            s.settimeout(2)
            with contextlib.suppress(TimeoutError, ConnectionError):
                s.recv(100)
    assert peer.daemon.proc is not None and peer.daemon.proc.poll() is None
    code, details = call(peer.channel, "Unload", b"", proof(peer, "Unload", b""))
    assert code == grpc.StatusCode.OK, details  # and it still serves its peers


def test_afterwards_the_daemon_serves_as_before(peer: Peer) -> None:
    """Runs after the random requests (tests in a module run in order), whose replies it
    counts."""
    d = peer.daemon
    # Proofs held: every method was reached past the proof check, and refused often.
    for name in METHODS:
        reached = sum(n for (m, code), n in peer.replies.items() if m == name)
        assert reached > peer.replies[name, grpc.StatusCode.UNAUTHENTICATED], name
    refused = sum(n for (_, code), n in peer.replies.items() if code not in OK_OR_GONE)
    start = time.monotonic()
    r = d.ctl("--json", "status", timeout=10)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - start < 1.0
    version = json.loads(r.stdout)["policy"]["version"]
    assert version <= MAX_POLICY_VERSION
    assert version <= peer.started_policy + POLICY_AHEAD * peer.adoptive_calls
    # The model answers (loaded again if a random Unload or Load took it away).
    deadline = time.monotonic() + 30
    while True:
        r = d.ctl("prompt", "once upon a time", "--raw", "--max-tokens", "4", timeout=60)
        if r.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)  # the fuzzer's device, if it became root, is forgotten meanwhile
    assert r.returncode == 0, r.stderr + d.log()[-3000:]
    # Hundreds of bad requests cost a few log lines, not one each.
    lines = [line for line in d.log().splitlines() if " WARNING " in line or " ERROR " in line]
    assert refused >= 100 and len(lines) <= max(20, refused // 5), "\n".join(lines[-80:])
