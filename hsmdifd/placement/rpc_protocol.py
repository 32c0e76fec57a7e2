"""Which llama.cpp RPC protocol this device speaks.

The root and its rpc-workers must speak the same one: another llama-cpp-python build
may change the messages (ggml-rpc.h bumps RPC_PROTO_*_VERSION when it does, and its
patch level follows the list of ggml operations). The figure comes from the header
the build installs; where that is missing, from llama-cpp-python's own version, which
pins the llama.cpp it vendors.
"""

from __future__ import annotations

import functools
import re
from importlib import metadata
from pathlib import Path

_VERSION = re.compile(r"#define\s+RPC_PROTO_(MAJOR|MINOR|PATCH)_VERSION\s+(\d+)")


def parse_header(text: str) -> str | None:
    """'MAJOR.MINOR.PATCH' from the text of ggml-rpc.h; None when it says none."""
    found = dict(_VERSION.findall(text))
    if not {"MAJOR", "MINOR", "PATCH"} <= found.keys():
        return None
    return f"{found['MAJOR']}.{found['MINOR']}.{found['PATCH']}"


@functools.cache
def protocol() -> str:
    """This device's llama.cpp RPC protocol, e.g. 'rpc 7.0.0'."""
    try:
        files = metadata.files("llama_cpp_python") or []
    except metadata.PackageNotFoundError:
        return "none (llama-cpp-python is not installed)"
    for file in files:
        if file.name == "ggml-rpc.h":
            try:
                version = parse_header(Path(str(file.locate())).read_text(errors="replace"))
            except OSError:
                version = None
            if version:
                return f"rpc {version}"
    return f"llama-cpp-python {metadata.version('llama_cpp_python')}"


def refusal(root: str, worker: str) -> str | None:
    """Why a worker speaking `worker` cannot hold layers for a root speaking `root`."""
    if not worker:
        return "it did not say which llama.cpp RPC protocol it speaks"
    if worker != root:
        return (
            f"it speaks llama.cpp {worker}, the root {root}: install the same "
            "llama-cpp-python build on both (make venv)"
        )
    return None
