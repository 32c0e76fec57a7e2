"""One answer over HTTP: its text as it comes, and server-sent events in OpenAI's
chunk shapes when the client asked for a stream.

Stop strings are the engine's work: it ends the answer where one begins and sends
none of it, so the text here goes out as it arrives.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdifd.api import openai_shapes
from hsmdifd.api.http_errors import from_request_error
from hsmdifd.api.openai_shapes import Parsed
from hsmdifd.daemon.errors import RequestError

log = logging.getLogger(__name__)


@dataclass
class Answer:
    """What a generation produced, as it goes."""

    parsed: Parsed
    ident: str
    created: int
    on_notice: Callable[[str], None]
    text: list[str] = field(default_factory=list)
    stats: pb.GenerateStats | None = None
    pieces: int = 0
    first_at: float | None = None

    async def texts(self, events: AsyncIterator[pb.GenerateEvent]) -> AsyncIterator[str]:
        """The answer's text, piece by piece; the closing figures go to `stats`."""
        async for event in events:
            kind = event.WhichOneof("event")
            if kind == "text":
                if self.first_at is None:
                    self.first_at = time.monotonic()
                self.pieces += 1
                if event.text:
                    yield event.text
            elif kind == "done":
                self.stats = event.done
                return
            elif kind == "notice":
                self.on_notice(event.notice)

    def final_stats(self) -> pb.GenerateStats:
        if self.stats is not None:
            return self.stats
        # Ended before the engine's own count came: the pieces sent are a lower bound
        # of the tokens (each holds at least one).
        return pb.GenerateStats(completion_tokens=self.pieces, finish_reason="length")

    def chunk(self, **fields: Any) -> dict[str, Any]:
        return openai_shapes.chunk(self.parsed, ident=self.ident, created=self.created, **fields)


async def stream(
    request: web.Request,
    allow_origin: str | None,
    events: AsyncIterator[pb.GenerateEvent],
    answer: Answer,
) -> web.StreamResponse:
    """Server-sent events: the headers go with the first piece of text, so that an
    error before it (a full queue, no root) is still an HTTP error."""
    response: web.StreamResponse | None = None

    async def send(body: dict[str, Any] | str) -> None:
        nonlocal response
        if response is None:
            response = web.StreamResponse(
                headers={
                    "Content-Type": "text/event-stream",
                    "Cache-Control": "no-cache",
                    "X-Accel-Buffering": "no",
                }
            )
            if allow_origin is not None:
                response.headers["Access-Control-Allow-Origin"] = allow_origin
            await response.prepare(request)
        data = body if isinstance(body, str) else json.dumps(body, separators=(",", ":"))
        await response.write(f"data: {data}\n\n".encode())

    first = True
    try:
        async for piece in answer.texts(events):
            await send(answer.chunk(text=piece, first=first))
            first = False
    except ConnectionResetError:
        # The client went away: closing `events` (by the caller) ends the generation.
        log.info("an HTTP client went away mid-answer; its generation ends")
        return response or web.StreamResponse()
    except RequestError as e:
        if response is None:
            raise
        # Headers are gone: say it the way OpenAI's SDK reads a failed stream.
        error = from_request_error(e)
        await send(openai_shapes.error_body(str(e), error.kind, code=error.code))
        await send("[DONE]")
        return response
    stats = answer.final_stats()
    if first:
        await send(answer.chunk(text="", first=True))
    await send(answer.chunk(finish=openai_shapes.finish_reason(stats)))
    if answer.parsed.include_usage:
        await send(answer.chunk(with_usage=stats))
    await send("[DONE]")
    assert response is not None
    await response.write_eof()
    return response
