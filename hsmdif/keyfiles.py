"""Private files of random bytes: the cluster secret and the HTTP API key. Made by
`hsmdifctl` (cluster init, api-key) and read by hsmdifd."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

SECRET_BYTES = 32
API_KEY_BYTES = 32


class KeyFileError(Exception):
    """A key file that cannot be written; the message says why."""


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
