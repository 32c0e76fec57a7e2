"""One command's connection to the daemon, and how a command says it failed."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from hsmdif.proto import hsmdif_pb2_grpc as pb_grpc
from hsmdifctl.client import unary, watched


class CommandFailed(Exception):
    """The daemon refused or failed the request; the message is for the user."""


@dataclass
class Session:
    """One command's connection to the daemon."""

    stub: pb_grpc.ControlStub
    json: bool
    path: Path = field(default_factory=Path)
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    told: set[str] = field(default_factory=set)  # notices already shown

    def call(self, method: Callable[..., Any], request: Any) -> Any:
        """A unary call that gives up, with Unreachable, on a daemon that stops answering."""
        return unary(method, request, self.stub, self.path)

    def events(self, call: Any) -> Iterator[Any]:
        """The events of a streaming call, watched in the same way."""
        return watched(call, self.stub, self.path)
