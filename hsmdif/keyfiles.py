"""Private files of random bytes: the cluster secret and the HTTP API key. Made by
`hsmdifctl` (cluster init, api-key) and read by hsmdifd."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

SECRET_BYTES = 32
API_KEY_BYTES = 32


class KeyFileError(Exception):
    """A key file that cannot be written or read; the message says why."""


def write_private(path: Path, text: str, what: str) -> None:
    """Write `text` to `path`: mode 0600 from the start, whole or not at all, never over an
    existing file. `what` names it in the errors ("the cluster secret")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            os.fchmod(f.fileno(), 0o600)  # whatever the umask
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # atomic, and refuses an existing `path`
    except FileExistsError:
        raise KeyFileError(f"{path} already exists: remove it first to replace {what}") from None
    except OSError as e:
        raise KeyFileError(f"cannot write {what} {path}: {e.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)


def new_cluster_secret(path: Path) -> None:
    """A new cluster secret in `path`, hex-encoded."""
    write_private(path, secrets.token_bytes(SECRET_BYTES).hex() + "\n", "the cluster secret")


def new_api_key(path: Path) -> str:
    """A new HTTP API key in `path`; the key."""
    key = secrets.token_hex(API_KEY_BYTES)
    write_private(path, key + "\n", "the API key")
    return key


def read_private(path: Path, what: str, hint: str) -> bytes:
    """The first 4 KiB of `path`, a file only its owner may read. `what` names it in the
    errors ("the cluster secret"), `hint` says how to make one."""
    try:
        with path.open("rb") as f:
            mode = os.fstat(f.fileno()).st_mode & 0o777
            data = f.read(4096)
    except FileNotFoundError:
        raise KeyFileError(f"no {what.removeprefix('the ')} at {path}: {hint}") from None
    except OSError as e:
        raise KeyFileError(f"cannot read {what} {path}: {e.strerror}") from None
    if mode & 0o077:
        raise KeyFileError(
            f"{what} {path} is open to other users (mode {mode:o}): run `chmod 600 {path}`"
        )
    return data


@contextlib.contextmanager
def failing_as(error: type[Exception]) -> Iterator[None]:
    """Raise a KeyFileError from inside as `error`, with the same sentence."""
    try:
        yield
    except KeyFileError as e:
        raise error(str(e)) from None
