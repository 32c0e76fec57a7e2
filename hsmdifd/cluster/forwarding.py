"""Calls this device forwarded to the root, watched so that a root that stops being live
ends them (a frozen root keeps its connections open: a call would wait for ever)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

log = logging.getLogger(__name__)


@dataclass
class Forwarded:
    """A call this device made to the root, cancelled if the root stops being live
    (a frozen root keeps its connections open: the call would wait for ever)."""

    root_id: str
    root_name: str
    call: grpc.aio.Call
    orphaned: bool = False


class Forwards:
    """The forwarded calls in flight."""

    def __init__(self) -> None:
        self._forwarded: list[Forwarded] = []

    @contextlib.contextmanager
    def watching(self, root_id: str, root_name: str, call: grpc.aio.Call) -> Iterator[Forwarded]:
        """Watch `call`, just made to the root, until it ends."""
        forwarded = Forwarded(root_id, root_name, call)
        self._forwarded.append(forwarded)
        try:
            yield forwarded
        finally:
            self._forwarded.remove(forwarded)

    def roots(self) -> frozenset[str]:
        """The roots of the calls forwarded from here that are in flight."""
        return frozenset(f.root_id for f in self._forwarded if not f.orphaned)

    def cancel_orphaned(self, live: set[str]) -> None:
        """Cancel the calls to a root that is no longer live."""
        for forwarded in self._forwarded:
            if forwarded.root_id not in live and not forwarded.orphaned:
                log.warning(
                    "the root %s stopped answering: ending a call to it", forwarded.root_name
                )
                forwarded.orphaned = True
                forwarded.call.cancel()
