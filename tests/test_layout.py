"""The layout the architecture promises: the CLI stands on the shared package alone."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_hsmdifctl_does_not_import_the_daemon() -> None:
    code = (
        "import sys, hsmdifctl.cli, hsmdifctl.arguments, hsmdifctl.client, hsmdifctl.commands, "
        "hsmdifctl.generation, hsmdifctl.render, hsmdifctl.session; "
        "print(sorted(m for m in sys.modules if m == 'hsmdifd' or m.startswith('hsmdifd.')))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout
