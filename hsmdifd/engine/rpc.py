"""ctypes bindings to llama.cpp's ggml RPC backend: register remote servers, or run one.

The ggml libraries are opened by the soname that `libllama.so` links
(`libggml.so.0`, `libggml-base.so.0`). pip installs `libggml.so` and `libggml.so.0`
as two separate files; opening the former maps a second copy with its own backend
registry, which llama.cpp never sees, and every layer silently stays local.
`_ggml()` therefore checks that each handle is the very object the dynamic linker
mapped for libllama. The two RPC entry points are looked up through the "RPC"
backend registration (`ggml_backend_reg_get_proc_address`), as ggml intends, so
nothing here depends on how libggml-rpc is linked.

Registration is process-global and cannot be undone: do it once, in the engine
child, before creating the `llama_cpp.Llama`.
"""

from __future__ import annotations

import ctypes
import functools
import ipaddress
import logging
import os
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from hsmdifd.daemon import timing

log = logging.getLogger(__name__)

REBUILD_HINT = (
    'rebuild it with RPC support: CMAKE_ARGS="-DGGML_RPC=ON" pip install --force-reinstall '
    "--no-cache-dir --no-binary llama-cpp-python llama-cpp-python==0.3.36 (or run `make venv`)"
)

"""Seconds `register_servers` waits for each endpoint to accept a TCP connection."""

# The sonames libllama.so links (`readelf -d libllama.so`: NEEDED); the registry
# lives in libggml, the device and registration accessors in libggml-base.
_SONAMES = ("libggml-base.so.0", "libggml.so.0")
_GGML_BACKEND_DEVICE_TYPE_CPU = 0  # enum ggml_backend_dev_type

_void_p = ctypes.c_void_p
# ggml_backend_reg_t ggml_backend_rpc_add_server(const char * endpoint);
_ADD_SERVER = ctypes.CFUNCTYPE(_void_p, ctypes.c_char_p)
# void ggml_backend_rpc_start_server(const char * endpoint, const char * cache_dir,
#                                    size_t n_threads, size_t n_devices,
#                                    ggml_backend_dev_t * devices);
_START_SERVER = ctypes.CFUNCTYPE(
    None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p
)


class RpcError(RuntimeError):
    """The RPC data plane cannot be used as asked; `str()` says why."""


class RpcUnavailable(RpcError):
    """This llama-cpp-python has no RPC backend (or is missing)."""


class RpcServerUnreachable(RpcError):
    """An RPC endpoint does not accept connections."""

    def __init__(self, endpoint: str, reason: str) -> None:
        super().__init__(f"the RPC server at {endpoint} cannot be reached: {reason}")
        self.endpoint = endpoint


def supports_rpc() -> bool:
    """Whether the installed llama-cpp-python was built with the RPC backend."""
    try:
        import llama_cpp
    except ImportError:
        return False
    return bool(llama_cpp.llama_supports_rpc())


def require_rpc() -> None:
    """Raise `RpcUnavailable`, with the rebuild command, unless RPC is supported."""
    try:
        import llama_cpp
    except ImportError as e:
        raise RpcUnavailable(f"llama-cpp-python cannot be imported ({e}); {REBUILD_HINT}") from e
    if not llama_cpp.llama_supports_rpc():
        raise RpcUnavailable(
            "llama-cpp-python was built without the RPC backend, so a model cannot be "
            f"split across devices; {REBUILD_HINT}"
        )


def parse_endpoint(endpoint: str, *, listen: bool = False) -> tuple[str, int]:
    """Split "HOST:PORT", refusing what ggml would abort the process on.

    ggml splits at the first colon (so no IPv6) and, to listen, needs an IPv4
    literal; port 0 (any free port) is accepted only for listening.
    """
    host, sep, port_text = endpoint.partition(":")
    if not sep or not host or ":" in port_text or not port_text.isdecimal():
        raise ValueError(f"RPC endpoint {endpoint!r} is not HOST:PORT (IPv4 or a host name)")
    port = int(port_text)
    if not (0 if listen else 1) <= port <= 65535:
        raise ValueError(f"RPC endpoint {endpoint!r} has no valid port")
    if listen:
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(
                f"RPC endpoint {endpoint!r}: an RPC server listens on an IPv4 address "
                "(such as 0.0.0.0 or 127.0.0.1), not a host name"
            ) from None
    return host, port


def free_port(host: str) -> int:
    """A TCP port on `host` that is free right now.

    The port is released before the caller's server binds it, so another process
    may take it in between; the rpc-worker then exits without printing `ready`
    and the caller picks another port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class _Ggml:
    """The ggml functions this module calls, bound to llama.cpp's own libraries."""

    lib: ctypes.CDLL  # libggml: the backend registry
    base: ctypes.CDLL  # libggml-base: devices and registrations
    add_server: Callable[[bytes], int | None]
    start_server: Callable[[bytes, bytes | None, int, int, ctypes.c_void_p], None]


def _bind(lib: ctypes.CDLL, name: str, restype: object, *argtypes: object) -> None:
    function = getattr(lib, name)
    function.restype = restype
    function.argtypes = argtypes


@functools.cache
def _ggml() -> _Ggml:
    require_rpc()
    import llama_cpp  # maps libllama.so and, through it, the ggml libraries it links

    if not sys.platform.startswith("linux"):
        raise RpcUnavailable(
            f"the RPC bindings know the ggml library names on Linux only, not on {sys.platform}"
        )
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    libs = []
    for soname in _SONAMES:
        lib = ctypes.CDLL(str(lib_dir / soname))
        try:
            mapped = ctypes.CDLL(soname, mode=os.RTLD_NOLOAD)
        except OSError:
            mapped = None
        if mapped is None or mapped._handle != lib._handle:
            raise RpcUnavailable(
                f"{lib_dir / soname} is not the {soname} libllama uses, so servers "
                f"registered through it would stay invisible to llama.cpp; {REBUILD_HINT}"
            )
        libs.append(lib)
    base, lib = libs
    # libggml
    _bind(lib, "ggml_backend_reg_by_name", _void_p, ctypes.c_char_p)
    _bind(lib, "ggml_backend_register", None, _void_p)
    _bind(lib, "ggml_backend_dev_count", ctypes.c_size_t)
    _bind(lib, "ggml_backend_dev_get", _void_p, ctypes.c_size_t)
    _bind(lib, "ggml_backend_dev_by_type", _void_p, ctypes.c_int)
    # libggml-base
    _bind(base, "ggml_backend_reg_get_proc_address", _void_p, _void_p, ctypes.c_char_p)
    _bind(base, "ggml_backend_dev_name", ctypes.c_char_p, _void_p)
    _bind(base, "ggml_backend_dev_description", ctypes.c_char_p, _void_p)

    reg = lib.ggml_backend_reg_by_name(b"RPC")
    if not reg:
        raise RpcUnavailable(f"llama.cpp has no RPC backend registered; {REBUILD_HINT}")

    def proc(name: str) -> int:
        address = base.ggml_backend_reg_get_proc_address(reg, name.encode())
        if not address:
            raise RpcUnavailable(f"the RPC backend does not export {name}; {REBUILD_HINT}")
        return int(address)

    return _Ggml(
        lib=lib,
        base=base,
        add_server=_ADD_SERVER(proc("ggml_backend_rpc_add_server")),
        start_server=_START_SERVER(proc("ggml_backend_rpc_start_server")),
    )


def devices() -> list[tuple[str, str]]:
    """(name, description) of every device llama.cpp can use, e.g. ("RPC0", "10.0.0.2:50052")."""
    ggml = _ggml()
    found = []
    for index in range(ggml.lib.ggml_backend_dev_count()):
        device = ggml.lib.ggml_backend_dev_get(index)
        name = ggml.base.ggml_backend_dev_name(device) or b""
        description = ggml.base.ggml_backend_dev_description(device) or b""
        found.append((name.decode(errors="replace"), description.decode(errors="replace")))
    return found


def _rpc_devices_of(endpoint: str) -> list[str]:
    return [name for name, desc in devices() if name.startswith("RPC") and desc == endpoint]


def register_servers(endpoints: Sequence[str]) -> None:
    """Make each endpoint's devices available to llama.cpp, in order (they take RPC0, RPC1, ...).

    Call once per process, before creating the `Llama`. Every endpoint is checked
    first: ggml aborts the whole process (SIGABRT) when it cannot parse or connect
    to an endpoint. A server that dies between that check and the registration
    still aborts the process, which is why this runs in a disposable child.
    """
    endpoints = list(endpoints)
    if len(set(endpoints)) != len(endpoints):
        raise ValueError(f"RPC endpoints are listed twice: {endpoints}")
    for endpoint in endpoints:
        host, port = parse_endpoint(endpoint)
        try:
            with socket.create_connection((host, port), timeout=timing.RPC_CONNECT_TIMEOUT):
                pass
        except OSError as e:
            raise RpcServerUnreachable(endpoint, e.strerror or str(e)) from e
    ggml = _ggml()
    for endpoint in endpoints:
        if _rpc_devices_of(endpoint):
            raise RpcError(f"the RPC server at {endpoint} is already registered in this process")
        server = ggml.add_server(endpoint.encode())
        if not server:
            raise RpcServerUnreachable(endpoint, "it reports no devices")
        ggml.lib.ggml_backend_register(server)
        names = _rpc_devices_of(endpoint)
        if not names:
            raise RpcError(
                f"the RPC server at {endpoint} was registered but llama.cpp does not list "
                "its devices; its layers would stay on this device"
            )
        log.info("RPC server %s registered as %s", endpoint, ", ".join(names))


def serve(endpoint: str, cache_dir: Path | None, threads: int) -> NoReturn:
    """Serve this device's CPU on `endpoint` ("IPv4:PORT"); blocks for good.

    One client is served at a time. Weight tensors over 10 MiB are cached in
    `cache_dir` (created here: ggml silently ignores a missing one). Raises
    `RpcError` if the server cannot listen (ggml then returns instead of serving).
    """
    parse_endpoint(endpoint, listen=True)
    if threads < 1:
        raise ValueError(f"threads must be at least 1, not {threads}")
    if cache_dir is not None:
        cache_dir = cache_dir.resolve()
        cache_dir.mkdir(parents=True, exist_ok=True)
    ggml = _ggml()
    cpu = ggml.lib.ggml_backend_dev_by_type(_GGML_BACKEND_DEVICE_TYPE_CPU)
    if not cpu:
        raise RpcError("llama.cpp has no CPU device to serve")
    device_list = (_void_p * 1)(cpu)
    log.info("serving RPC on %s with %d threads, cache %s", endpoint, threads, cache_dir)
    ggml.start_server(
        endpoint.encode(),
        None if cache_dir is None else os.fsencode(cache_dir),
        threads,
        len(device_list),
        ctypes.cast(device_list, _void_p),
    )
    raise RpcError(f"the RPC server could not listen on {endpoint} (is the port in use?)")
