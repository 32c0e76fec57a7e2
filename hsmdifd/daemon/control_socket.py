"""The control socket `hsmdifctl` talks to: claimed, served, shared with the group, removed."""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import socket
from pathlib import Path

import grpc

from hsmdifd.api.control_service import ControlService, add_control_service
from hsmdifd.daemon.errors import StartupError

log = logging.getLogger(__name__)


def claim_socket(path: Path) -> None:
    """Make `path` free for a new server: replace a stale socket, refuse a live one."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _claim(path)
    except PermissionError as e:
        raise StartupError(f"cannot create the control socket {path}: {e.strerror}") from e


def _claim(path: Path) -> None:
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_socket():
        raise StartupError(
            f"{path} exists and is not a socket; remove it or choose another --socket"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        log.info("replacing the stale socket %s", path)
        path.unlink()
        return
    except OSError as e:
        raise StartupError(f"cannot check the existing socket {path}: {e.strerror}") from None
    finally:
        probe.close()
    raise StartupError(
        f"another hsmdifd is already running on {path}; stop it first "
        "(systemctl stop hsmdifd) or give this one another --socket"
    )


async def enter_control_server(
    stack: contextlib.AsyncExitStack, path: Path, group: str, service: ControlService
) -> grpc.aio.Server:
    """Serve `service` on the claimed socket `path` until `stack` closes, which stops the
    server and removes the socket."""
    server = grpc.aio.server()
    add_control_service(service, server)
    if server.add_insecure_port(f"unix:{path}") == 0:
        raise StartupError(f"cannot listen on {path}")
    await server.start()
    stack.callback(path.unlink, missing_ok=True)
    stack.push_async_callback(server.stop, 0)
    _share_socket(path, group)
    if not _accepts(path):
        raise StartupError(f"the control socket {path} does not accept connections")
    return server


def _share_socket(path: Path, group: str) -> None:
    """Mode 0660, and the configured group where that group exists."""
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        gid = -1
    if gid != -1:
        try:
            os.chown(path, -1, gid)
        except PermissionError:
            log.warning("cannot give %s to group %s: not a member", path, group)
    os.chmod(path, 0o660)


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True
