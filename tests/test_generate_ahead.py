"""The engine's answer is made on a thread of its own while gRPC sends what is made
(`hsmdifd.engine.child.ahead`): nothing lost or reordered, errors passed on, and a
caller that stops leaves the model free."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdifd.engine.child import ahead


def events(texts: list[str], fail_at: int | None = None) -> Iterator[pb.GenerateEvent]:
    for i, text in enumerate(texts):
        if i == fail_at:
            raise RuntimeError(f"llama.cpp failed at event {i}")
        yield pb.GenerateEvent(text=text)


@given(st.lists(st.text(max_size=5), max_size=30))
def test_every_event_arrives_once_in_order(texts: list[str]) -> None:
    ended = threading.Event()
    assert [e.text for e in ahead(events(texts), ended)] == texts
    assert ended.is_set()


@given(st.lists(st.text(max_size=5), min_size=1, max_size=30), st.data())
def test_what_the_maker_raises_reaches_the_caller_after_what_it_made(
    texts: list[str], data: st.DataObject
) -> None:
    fail_at = data.draw(st.integers(0, len(texts) - 1))
    got: list[str] = []
    with pytest.raises(RuntimeError, match=f"failed at event {fail_at}"):
        for event in ahead(events(texts, fail_at), threading.Event()):
            got.append(event.text)
    assert got == texts[:fail_at]


def test_the_decode_goes_on_while_an_event_is_being_sent() -> None:
    """The caller holds the first event (gRPC sending it); the rest are made meanwhile."""
    made_all = threading.Event()

    def answer() -> Iterator[pb.GenerateEvent]:
        yield from events(["a", "b", "c"])
        made_all.set()

    stream = ahead(answer(), threading.Event())
    assert next(stream).text == "a"
    assert made_all.wait(10), "the maker waited for the caller"
    assert [e.text for e in stream] == ["b", "c"]


def test_a_caller_that_stops_ends_the_maker_before_the_model_is_free() -> None:
    """Closing the stream (the call cancelled) sets `ended`; the maker, which looks at
    it after each token, has finished when close() returns."""
    ended = threading.Event()
    finished = threading.Event()

    def answer() -> Iterator[pb.GenerateEvent]:
        try:
            yield pb.GenerateEvent(text="first")
            while not ended.wait(0.01):  # a token at a time, until told to stop
                pass
        finally:
            finished.set()

    stream = ahead(answer(), ended)
    assert next(stream).text == "first"
    assert not finished.is_set()
    closing = threading.Thread(target=stream.close)
    closing.start()
    closing.join(10)
    assert not closing.is_alive(), "close() waits for a maker that was never told to stop"
    assert ended.is_set() and finished.is_set()
