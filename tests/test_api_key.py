"""The HTTP API's key and [api] settings: who needs a key, how it is read and compared."""

from __future__ import annotations

from pathlib import Path

import pytest

from hsmdifd.api.api_key import (
    ApiKeyError,
    api_key_for,
    is_loopback,
    load_key,
    matches,
    write_key_file,
)
from hsmdifd.daemon.cli import build_parser, resolve_config
from hsmdifd.daemon.config import ConfigError, load_config


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("192.168.1.20", False)],
)  # fmt: skip
def test_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_a_key_is_needed_off_loopback(tmp_path: Path) -> None:
    assert api_key_for("127.0.0.1:9998", "") is None
    assert api_key_for("", "") is None
    with pytest.raises(ApiKeyError, match="hsmdifctl api-key --out"):
        api_key_for("0.0.0.0:9998", "")
    key_file = tmp_path / "api.key"
    key = write_key_file(key_file)
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert api_key_for("0.0.0.0:9998", str(key_file)) == key.encode()
    with pytest.raises(ApiKeyError, match="already exists"):
        write_key_file(key_file)


def test_key_file_problems_are_sentences(tmp_path: Path) -> None:
    with pytest.raises(ApiKeyError, match="no API key at"):
        load_key(tmp_path / "missing")
    open_file = tmp_path / "open.key"
    open_file.write_text("x" * 64)
    open_file.chmod(0o644)
    with pytest.raises(ApiKeyError, match="chmod 600"):
        load_key(open_file)


def test_bearer_matching() -> None:
    key = b"s3cret-s3cret-s3cret"
    assert matches(key, "Bearer s3cret-s3cret-s3cret")
    assert matches(key, "bearer s3cret-s3cret-s3cret")
    assert not matches(key, "Bearer s3cret")
    assert not matches(key, "Basic s3cret-s3cret-s3cret")
    assert not matches(key, None)
    assert not matches(key, "Bearer \u00e9\u00e9")


def test_http_flag_and_api_table(tmp_path: Path) -> None:
    off, _ = resolve_config(build_parser().parse_args(["--http", "off"]))
    assert off.api.listen == ""
    on, _ = resolve_config(build_parser().parse_args(["--http", "0.0.0.0:8080"]))
    assert on.api.listen == "0.0.0.0:8080"
    with pytest.raises(ConfigError, match="--http nowhere"):
        resolve_config(build_parser().parse_args(["--http", "nowhere"]))
    path = tmp_path / "hsmdifd.toml"
    path.write_text('[api]\nlisten = "127.0.0.1:1"\nmax_queue = 3\ncors_origins = ["*"]\n')
    config = load_config(path)
    assert (config.api.max_queue, config.api.cors_origins) == (3, ("*",))
    path.write_text('[api]\nlisten = "9998"\n')
    with pytest.raises(ConfigError, match=r"api\.listen"):
        load_config(path)
