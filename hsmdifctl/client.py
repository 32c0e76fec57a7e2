"""The transport: find the daemon's socket, connect, and turn failures into sentences."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import grpc

from hsmdifd.config import default_socket_path
from hsmdifd.proto import hsmdif_pb2_grpc as pb_grpc

SYSTEM_SOCKET = Path("/run/hsmdifd/control.sock")


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


def probe(path: Path) -> None:
    """Raise Unreachable with a useful sentence unless something accepts on `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except FileNotFoundError:
            raise Unreachable(
                f"hsmdifd is not running (no socket at {path}); start it with "
                "`systemctl start hsmdifd` or `hsmdifd`, or point --socket at its socket"
            ) from None
        except PermissionError:
            raise Unreachable(
                f"permission denied on {path}: add yourself to the hsmdif group "
                "(sudo usermod -aG hsmdif $USER, then log in again)"
            ) from None
        except ConnectionRefusedError:
            raise Unreachable(
                f"hsmdifd is not running (nothing listens on {path}, a stale socket); "
                "start it with `systemctl start hsmdifd` or `hsmdifd`"
            ) from None
        except OSError as e:
            raise Unreachable(f"cannot connect to hsmdifd at {path}: {e.strerror}") from None


def connect(path: Path) -> tuple[grpc.Channel, pb_grpc.ControlStub]:
    probe(path)
    channel = grpc.insecure_channel(f"unix:{path}")
    return channel, pb_grpc.ControlStub(channel)
