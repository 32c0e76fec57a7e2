"""The committed generated code must match proto/hsmdif.proto."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parent.parent
GENERATED = ["hsmdif_pb2.py", "hsmdif_pb2.pyi", "hsmdif_pb2_grpc.py", "hsmdif_pb2_grpc.pyi"]


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent
    (tmp_path / "hsmdif" / "proto").mkdir(parents=True)
    shutil.copy(REPO / "proto" / "hsmdif.proto", tmp_path / "hsmdif.proto")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-Ihsmdif/proto={tmp_path}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--mypy_out={tmp_path}",
            f"--mypy_grpc_out={tmp_path}",
            "hsmdif/proto/hsmdif.proto",
        ],
        check=True,
        cwd=tmp_path,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
    )
    for name in GENERATED:
        fresh = (tmp_path / "hsmdif" / "proto" / name).read_text()
        committed = (REPO / "hsmdif" / "proto" / name).read_text()
        assert fresh == committed, f"hsmdif/proto/{name} is stale: run `make proto`"
