"""Damaged model files offered to a real daemon: each `load` and `plan` is refused
quickly with the reader's sentence, the daemon's memory stays put, and the model that
was loaded keeps answering."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import psutil

from tests.conftest import Daemon
from tests.gguf_layout import put, read_layout

MIB = 1 << 20


def damaged_files(tiny: bytes, directory: Path) -> dict[Path, str]:
    """Files the issue reproduced on a real daemon, and what the refusal says."""
    layout = read_layout(tiny)
    files: dict[Path, str] = {}

    def patched(name: str, field: str, value: int, says: str) -> None:
        data = bytearray(tiny)
        put(data, layout.int_named(field), value)
        path = directory / name
        path.write_bytes(bytes(data))
        files[path] = says

    patched("layers-2-31.gguf", "value of llama.block_count", 2**31, "llama.block_count is 2,1")
    patched("heads-7.gguf", "value of llama.attention.head_count", 7, "head_count (7)")
    patched("kv-heads-0.gguf", "value of llama.attention.head_count_kv", 0, "head_count_kv is 0")
    data = bytearray(tiny)
    token = next(s for s in layout.strings if s.name == "tokenizer.ggml.tokens[3]")
    data[token.offset] = 0xFF
    (directory / "vocab.gguf").write_bytes(bytes(data))
    files[directory / "vocab.gguf"] = "is not valid UTF-8"
    sparse = directory / "sparse.gguf"
    with sparse.open("wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, 2**40, 0))
        f.truncate(256 * MIB)
    files[sparse] = "holds 1,099,511,627,776 tensors"
    return files


def test_damaged_files_are_refused_and_the_model_kept(
    daemon: Daemon, tiny_model: Path, tmp_path: Path
) -> None:
    assert daemon.ctl("load", str(tiny_model)).returncode == 0
    assert daemon.proc is not None
    process = psutil.Process(daemon.proc.pid)
    rss = process.memory_info().rss
    for path, says in damaged_files(tiny_model.read_bytes(), tmp_path).items():
        for command in ("load", "plan"):
            started = time.monotonic()
            r = daemon.ctl(command, str(path))
            elapsed = time.monotonic() - started
            assert r.returncode == 1, (command, path.name, r.stderr)
            assert says in r.stderr and str(path) in r.stderr, r.stderr
            assert "Traceback" not in r.stderr
            assert elapsed < 10, (command, path.name, elapsed)  # mostly Python's start-up
        answer = daemon.ctl("prompt", "Say something", "--max-tokens", "4", "--json")
        assert answer.returncode == 0, answer.stderr
        assert json.loads(answer.stdout)["completion_tokens"] >= 1
    assert process.memory_info().rss < rss + 64 * MIB
    assert "Traceback" not in daemon.log()
