"""The OpenAI request parser and stop filter: pure functions, tested over any input."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hsmdifd.api.openai_shapes import (
    BadRequest,
    chunk,
    generate_request,
    parse_chat,
    parse_completion,
)
from hsmdifd.engine.stops import StopFilter

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
FIELDS = [
    "model",
    "messages",
    "prompt",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "n",
]
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", 3]), "content": json_values}
)
bodies = st.dictionaries(
    st.sampled_from(FIELDS),
    json_values | st.lists(message, max_size=3) | st.sampled_from(["tiny", "hi"]),
    max_size=len(FIELDS),
)


@settings(max_examples=400, deadline=None)
@given(body=bodies | json_values)
def test_any_body_is_a_request_or_a_400_naming_the_field(body: Any) -> None:
    for parse in (parse_chat, parse_completion):
        try:
            parsed = parse(body)
        except BadRequest as e:
            assert str(e)
            if e.param is not None:
                assert e.param.split(".")[0].split("[")[0] in FIELDS
                assert e.param.split("[")[0].split(".")[0] in str(e)
            continue
        request = generate_request(parsed)  # never raises on a parsed request
        assert parsed.model
        assert request.raw != parsed.chat
        if parsed.sampling.max_tokens is not None:
            assert parsed.sampling.max_tokens >= 1
        if parsed.sampling.temperature is not None:
            assert 0 <= parsed.sampling.temperature <= 2
        assert len(parsed.sampling.stop) <= 4


def test_a_full_chat_request() -> None:
    parsed = parse_chat(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
                {"role": "assistant", "content": None},
            ],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_completion_tokens": 7,
            "temperature": 0,
            "top_p": 0.5,
            "seed": -1,
            "stop": "\n",
            "n": 1,
            "frequency_penalty": 0.3,  # ignored, as llama-server does
        }
    )
    assert parsed.messages == (("system", "be brief"), ("user", "ab"), ("assistant", ""))
    assert parsed.stream and parsed.include_usage
    request = generate_request(parsed)
    assert request.max_tokens == 7 and request.temperature == 0 and request.seed == 0xFFFFFFFF
    assert abs(request.top_p - 0.5) < 1e-6 and list(request.stop) == ["\n"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
            "max_tokens",
        ),
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3},
            "temperature",
        ),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": [1]}, "stop"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ],
)
def test_bad_fields_are_named(body: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as e:
        parse_chat(body)
    assert e.value.param == param


def test_a_completion_takes_a_string_prompt() -> None:
    assert parse_completion({"model": "m", "prompt": ["once"]}).prompt == "once"
    with pytest.raises(BadRequest) as e:
        parse_completion({"model": "m", "prompt": 3})
    assert e.value.param == "prompt"


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(alphabet="abcXY\n", max_size=40),
    stops=st.lists(st.text(alphabet="abcXY\n", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=8),
)
def test_stop_filter_matches_cutting_the_whole_text(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    """However the text arrives in pieces, what goes out is the text up to the first
    stop string, and none of it."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    expected = text[: min(found)] if found else text
    f = StopFilter(tuple(stops))
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    out = "".join(f.feed(text[a:b]) for a, b in itertools.pairwise(bounds))
    out += f.flush()
    assert out == expected
    assert f.stopped == bool(found)


def test_usage_chunk_has_no_choices() -> None:
    from hsmdif.proto import hsmdif_pb2 as pb

    parsed = parse_chat({"model": "m", "messages": [{"role": "user", "content": "x"}]})
    stats = pb.GenerateStats(prompt_tokens=3, completion_tokens=4)
    body = chunk(parsed, ident="i", created=1, with_usage=stats)
    assert body["choices"] == [] and body["usage"]["total_tokens"] == 7
