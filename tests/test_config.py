"""Configuration loading: defaults, the shipped file, and errors that name key and file."""

from __future__ import annotations

from pathlib import Path

import pytest

from hsmdifd.daemon.config import Config, ConfigError, load_config, with_overrides

REPO = Path(__file__).parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hsmdifd.toml"
    path.write_text(text)
    return path


def test_shipped_file_holds_every_default() -> None:
    assert load_config(REPO / "etc" / "hsmdifd.toml") == Config()


def test_no_file_means_defaults() -> None:
    config = load_config(None)
    assert config.network.port == 9999
    assert config.model.context_length == 4096
    assert config.network.mdns is True


def test_values_are_read(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            '[network]\nport = 7000\npeers = ["10.0.0.2:9999"]\n[model]\nkeep_alive = 30\n',
        )
    )
    assert config.network.port == 7000
    assert config.network.peers == ("10.0.0.2:9999",)
    assert config.model.keep_alive == 30.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[network]\nprot = 1\n", "unknown key 'network.prot'"),
        ("[netwrk]\nport = 1\n", "unknown key 'netwrk'"),
        ("[network]\nport = '9999'\n", "'network.port' must be an integer, not a string"),
        ("[network]\nmdns = 1\n", "'network.mdns' must be true or false"),
        ("[network]\npeers = 'a:1'\n", "'network.peers' must be a list"),
        ("[network]\npeers = [1]\n", "'network.peers[0]' must be a string"),
        ("[resources]\nthreads = true\n", "'resources.threads' must be an integer"),
        ("network = 3\n", "'network' must be a table"),
        ("[network]\nport = 70000\n", "'network.port' must be between 1 and 65535"),
        ("[model]\ncontext_length = 2\n", "'model.context_length' must be at least 16"),
        ("[timing]\ndead_after = 0.1\n", "'timing.dead_after' must be longer"),
        (
            "[model]\nquantize = 'q4'\n",
            '\'model.quantize\' must be "4bit", "8bit" or "" (load files as they are), not \'q4\'',
        ),
        ("[network\n", "not valid TOML"),
    ],
)
def test_errors_name_the_key_and_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert message in str(caught.value)
    assert str(path) in str(caught.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config(tmp_path / "absent.toml")


def test_integers_are_accepted_for_numbers(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[resources]\nspeed_override = 3\n"))
    assert config.resources.speed_override == 3.0
    assert isinstance(config.resources.speed_override, float)


def test_command_line_overrides() -> None:
    config = with_overrides(
        Config(), network_port=1234, control_socket="/tmp/x.sock", node_name=None
    )
    assert config.network.port == 1234
    assert config.socket_path == Path("/tmp/x.sock")
    assert config.node.name == ""
