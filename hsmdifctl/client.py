"""The transport: find the daemon's socket, connect, and turn failures into sentences.

A daemon that accepts connections but never answers (stopped with SIGSTOP, or stuck) is
noticed by asking it for its status: every command starts with that question, and a
call that has been quiet for ANSWER_SECONDS asks it again. No answer within
ANSWER_SECONDS means Unreachable, so no command waits for ever.
"""

from __future__ import annotations

import grp
import os
import queue
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from hsmdif.paths import default_socket_path
from hsmdif.proto import hsmdif_pb2 as pb
from hsmdif.proto import hsmdif_pb2_grpc as pb_grpc

SYSTEM_SOCKET = Path("/run/hsmdifd/control.sock")
# The longest path a Unix socket address holds (sun_path is 108 bytes with its NUL).
MAX_SOCKET_PATH = 107
# Seconds hsmdifd may take to answer a status request before it counts as not answering.
ANSWER_SECONDS = 5.0


class Unreachable(Exception):
    """The daemon cannot be reached; the message says why and what to do."""


def socket_path(explicit: str | None) -> Path:
    """--socket, else $HSMDIF_SOCKET, else this user's daemon, else the system service's."""
    if explicit:
        return Path(explicit)
    if env := os.environ.get("HSMDIF_SOCKET"):
        return Path(env)
    mine = default_socket_path()
    # os.path.exists: a directory we may not search is "not there", not an exception.
    if os.path.exists(mine) or not os.path.exists(SYSTEM_SOCKET):
        return mine
    return SYSTEM_SOCKET


def socket_path_problem(path: Path) -> str | None:
    """Why `path` cannot name a Unix socket at all (a usage error), or None."""
    try:
        raw = os.fsencode(path)
    except UnicodeError:
        raw = b""
    if len(raw) > MAX_SOCKET_PATH:
        return (
            f"the socket path {path} is {len(raw)} bytes long, longer than a Unix socket "
            f"path can be ({MAX_SOCKET_PATH} bytes); give a shorter --socket path"
        )
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return (
            f"the socket path {os.fsencode(path)!r} is not valid UTF-8, which gRPC cannot "
            "connect to; give a --socket path in UTF-8"
        )
    return None


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


# Where hsmdifd's configuration names the group it gives its socket to.
_GROUP_HINT = "[control] group in hsmdifd.toml, the hsmdif group by default"


def _permission_sentence(path: Path) -> str:
    """Name the group that would let this user in: the socket's own, from stat, since
    hsmdifd gives its socket to the configured group; the default when it cannot be seen."""
    try:
        st = path.stat()
    except OSError:
        return (
            f"permission denied on {path}: its directory is closed to you; add yourself to "
            f"the group hsmdifd gives its socket to ({_GROUP_HINT}): "
            "sudo usermod -aG GROUP $USER, then log in again"
        )
    group = _group_name(st.st_gid)
    sentence = (
        f"permission denied on {path}: the socket belongs to the group {group}; add "
        f"yourself to it (sudo usermod -aG {group} $USER, then log in again)"
    )
    if group != "hsmdif":
        sentence += f", or give hsmdifd another group ({_GROUP_HINT})"
    return sentence


def _not_a_socket(path: Path) -> str | None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if stat.S_ISSOCK(mode):
        return None
    kind = "a directory" if stat.S_ISDIR(mode) else "a regular file"
    if stat.S_ISDIR(mode):
        hint = f"point --socket at the socket in it (such as {path / 'control.sock'})"
    elif stat.S_ISREG(mode):
        hint = "point --socket at hsmdifd's socket (its log names it), or start hsmdifd"
    else:
        kind = "not a socket"
        hint = "point --socket at hsmdifd's socket"
    if kind.startswith("a "):
        return f"{path} is {kind}, not hsmdifd's socket; {hint}"
    return f"{path} is {kind}; {hint}"


def probe(path: Path) -> None:
    """Raise Unreachable with a useful sentence unless something accepts on `path`."""
    if problem := socket_path_problem(path):
        raise Unreachable(problem)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(os.fsencode(path))
        except FileNotFoundError:
            raise Unreachable(
                f"hsmdifd is not running (no socket at {path}); start it with "
                "`systemctl start hsmdifd` or `hsmdifd`, or point --socket at its socket"
            ) from None
        except PermissionError:
            raise Unreachable(_permission_sentence(path)) from None
        except ConnectionRefusedError:
            raise Unreachable(
                _not_a_socket(path)
                or f"hsmdifd is not running (nothing listens on {path}, a stale socket); "
                "start it with `systemctl start hsmdifd` or `hsmdifd`"
            ) from None
        except OSError as e:
            why = _not_a_socket(path) or f"cannot connect to hsmdifd at {path}: {e.strerror or e}"
            raise Unreachable(why) from None


def connect(path: Path) -> tuple[grpc.Channel, pb_grpc.ControlStub]:
    probe(path)
    channel = grpc.insecure_channel(f"unix:{path}")
    return channel, pb_grpc.ControlStub(channel)


def not_answering(path: Path, seconds: float = ANSWER_SECONDS) -> Unreachable:
    return Unreachable(
        f"hsmdifd at {path} does not answer (no reply within {seconds:g} s): it is stopped "
        "or stuck; see `systemctl status hsmdifd` or its log, and restart it if need be"
    )


def ping(stub: pb_grpc.ControlStub, path: Path, seconds: float = ANSWER_SECONDS) -> pb.StatusReply:
    """The daemon's status; Unreachable if it does not answer within `seconds`."""
    try:
        return stub.Status(pb.StatusRequest(), timeout=seconds)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise not_answering(path, seconds) from None
        raise


def answering(stub: pb_grpc.ControlStub, path: Path) -> bool:
    """False when the daemon does not answer a status request in time; other errors
    (it stopped, say) are left to the call being watched."""
    try:
        ping(stub, path)
    except Unreachable:
        return False
    except grpc.RpcError:
        return True
    return True


def unary(method: Any, request: Any, stub: pb_grpc.ControlStub, path: Path) -> Any:
    """`method(request)`, asking after the daemon whenever the answer takes a while."""
    future = method.future(request)
    try:
        while True:
            try:
                return future.result(timeout=ANSWER_SECONDS)
            except grpc.FutureTimeoutError:
                if not answering(stub, path):
                    raise not_answering(path) from None
    finally:
        future.cancel()


def watched(call: Any, stub: pb_grpc.ControlStub, path: Path) -> Iterator[Any]:
    """The events of a streaming `call`; when it is quiet for ANSWER_SECONDS, ask after
    the daemon, and cancel the call (raising Unreachable) if it does not answer."""
    events: queue.Queue[tuple[bool, Any]] = queue.Queue()

    def pump() -> None:
        try:
            for event in call:
                events.put((True, event))
            events.put((False, None))
        except BaseException as e:  # handed to the reading thread
            events.put((False, e))

    threading.Thread(target=pump, name="hsmdifctl-events", daemon=True).start()
    try:
        while True:
            try:
                is_event, item = events.get(timeout=ANSWER_SECONDS)
            except queue.Empty:
                if not answering(stub, path):
                    raise not_answering(path) from None
                continue
            if is_event:
                yield item
            elif item is None:
                return
            else:
                raise item
    finally:
        call.cancel()
