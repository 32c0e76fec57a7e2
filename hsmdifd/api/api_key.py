"""The HTTP API's key: made by `hsmdifctl api-key`, read by the daemon, compared in
constant time."""

from __future__ import annotations

import hmac
import ipaddress
import socket
from pathlib import Path

from hsmdif import keyfiles

MAKE_HINT = (
    "make a key with `hsmdifctl api-key --out /etc/hsmdif/api.key` (or `python3 -c "
    "'import secrets; print(secrets.token_hex(32))' > FILE; chmod 600 FILE`) and set "
    "api_key_file in [api]"
)


class ApiKeyError(Exception):
    """A key file that cannot be used; the message says what to do."""


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) only ever means this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def api_key_for(listen: str, key_file: str) -> bytes | None:
    """The key the HTTP API asks for (None: none); ApiKeyError when `listen` can be
    reached from other machines and no key is set, or the key file is unusable."""
    if not listen:
        return None
    if key_file:
        return load_key(Path(key_file))
    host = listen.rpartition(":")[0].strip("[]")
    if not is_loopback(host):
        raise ApiKeyError(
            f"the HTTP API would listen on {listen}, which other machines can reach, "
            f"without a key: {MAKE_HINT}; or listen on 127.0.0.1"
        )
    return None


def write_key_file(path: Path) -> str:
    """Write a new key to `path` (mode 0600, never over an existing file); return it."""
    with keyfiles.failing_as(ApiKeyError):
        return keyfiles.new_api_key(path)


def load_key(path: Path) -> bytes:
    """The key in `path`, or ApiKeyError saying what is wrong and what to do."""
    with keyfiles.failing_as(ApiKeyError):
        key = keyfiles.read_private(path, "the API key", MAKE_HINT).strip()
    if len(key) < 16:
        raise ApiKeyError(f"the API key in {path} is shorter than 16 characters: {MAKE_HINT}")
    return key


def matches(key: bytes, authorization: str | None) -> bool:
    """Whether an Authorization header carries `key` (constant-time comparison)."""
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(errors="replace"), key)
