"""The cluster secret: 32 random bytes every device holds, hex-encoded in a mode-0600 file."""

from __future__ import annotations

import secrets
from pathlib import Path

from hsmdif import keyfiles

SECRET_BYTES = keyfiles.SECRET_BYTES
MIN_SECRET_BYTES = 16
CREATE_HINT = (
    "make one with `hsmdifctl cluster init --out FILE` and copy the same file to every device"
)


class SecretError(Exception):
    """A cluster secret file that cannot be used; the message says what to do."""


def generate_secret() -> bytes:
    """A new cluster secret."""
    return secrets.token_bytes(SECRET_BYTES)


def write_secret_file(path: Path) -> None:
    """Write a new secret to `path`: mode 0600 from the start, whole or not at all, no overwrite."""
    with keyfiles.failing_as(SecretError):
        keyfiles.new_cluster_secret(path)


def load_secret(path: Path) -> bytes:
    """The secret in `path`, or a `SecretError` that says what is wrong and what to do."""
    with keyfiles.failing_as(SecretError):
        raw = keyfiles.read_private(path, "the cluster secret", CREATE_HINT)
    text = raw.decode("ascii", errors="replace").strip()
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        raise SecretError(f"{path} does not hold a hex-encoded secret: {CREATE_HINT}") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise SecretError(
            f"the cluster secret in {path} has {len(secret)} bytes, fewer than "
            f"{MIN_SECRET_BYTES}: {CREATE_HINT}"
        )
    return secret
