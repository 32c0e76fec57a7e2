"""An answer's text from its tokens' bytes: UTF-8 decoded across token boundaries, the
leading space of a chat answer dropped, cut at a stop string.

The text that goes out after a token is a fixed function of the tokens so far, so a
continuation that feeds the tokens already produced first (`replay`) is in the very
state the cut-off answer was in, and goes on with the same text.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable

from hsmdifd.engine.stops import StopFilter


class TextStream:
    def __init__(self, stops: tuple[str, ...], strip_leading: bool) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = StopFilter(stops)
        self._strip = strip_leading

    @property
    def stopped(self) -> bool:
        """A stop string came: the answer ends, none of it sent."""
        return self._stops.stopped

    def feed(self, piece: bytes) -> str:
        """The text that can go out after a token whose bytes are `piece`."""
        text = self._decoder.decode(piece)
        if self._strip and text:
            text = text.lstrip()
            self._strip = not text
        return self._stops.feed(text)

    def replay(self, pieces: Iterable[bytes]) -> None:
        """Feed the tokens the client has the text of already, sending nothing."""
        for piece in pieces:
            self.feed(piece)

    def end(self) -> str:
        """What was held back, at the end of the answer."""
        if self.stopped:
            return ""
        return self._stops.feed(self._decoder.decode(b"", final=True)) + self._stops.flush()
