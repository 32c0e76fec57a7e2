"""The pure parts of resuming an answer: the text a continuation sends, the seed it
samples with, and what the root passes on through the resumes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdifctl import render
from hsmdifd.daemon.timing import PREFILL_CHUNK
from hsmdifd.engine import resume
from hsmdifd.engine.prefill import MIN_CHUNK, next_chunk
from hsmdifd.engine.resume import Answer
from hsmdifd.engine.text import TextStream

# Token pieces as a tokenizer gives them: parts of UTF-8 characters included.
pieces = st.lists(
    st.one_of(
        st.text(alphabet="ab <>\n", max_size=3).map(str.encode),
        st.sampled_from(["é", "ü", "日本", "🙂"]).map(str.encode).map(lambda b: b[:1]),
        st.sampled_from(["é", "ü", "日本", "🙂"]).map(str.encode).map(lambda b: b[1:]),
        st.binary(max_size=2),
    ),
    max_size=30,
)
stops = st.lists(st.text(alphabet="ab<>", min_size=1, max_size=3), max_size=2).map(tuple)


def sent_and_final(
    tokens: list[bytes], stop: tuple[str, ...], strip: bool, cut: int
) -> tuple[str, str]:
    """The text sent after the first `cut` tokens, and the whole answer's text."""
    stream = TextStream(stop, strip)
    out: list[str] = []  # the text that goes out after each token
    for piece in tokens:
        if stream.stopped:
            break
        out.append(stream.feed(piece))
    return "".join(out[:cut]), "".join(out) + stream.end()


@given(pieces, stops, st.booleans(), st.integers(min_value=0, max_value=30))
def test_a_continuation_sends_the_rest_of_the_same_text(
    tokens: list[bytes], stop: tuple[str, ...], strip: bool, cut: int
) -> None:
    """Whatever was cut off mid-character or mid-stop-string: what was sent is a prefix
    of the answer, byte for byte, and the continuation sends exactly what follows."""
    cut = min(cut, len(tokens))
    sent, final = sent_and_final(tokens, stop, strip, cut)
    assert final.startswith(sent)
    again = TextStream(stop, strip)
    again.replay(tokens[:cut])
    rest = []
    for piece in tokens[cut:]:
        if again.stopped:
            break
        rest.append(again.feed(piece))
    assert sent + "".join(rest) + again.end() == final


@given(st.integers(min_value=0, max_value=2**32 - 1), st.integers(min_value=0, max_value=10**5))
def test_the_seed_of_a_continuation_is_a_function_of_seed_and_position(
    seed: int, position: int
) -> None:
    first = resume.resume_seed(seed, position)
    assert first == resume.resume_seed(seed, position)
    assert 0 <= first < 2**32


def test_the_seed_moves_with_the_position() -> None:
    seeds = {resume.resume_seed(7, p) for p in range(100)}
    assert len(seeds) == 100


def text(t: str, *tokens: int) -> pb.GenerateEvent:
    return pb.GenerateEvent(text=t, tokens=tokens)


@given(st.lists(st.lists(st.integers(min_value=0, max_value=1000), max_size=4), max_size=8))
def test_the_root_keeps_the_tokens_the_client_has(chunks: list[list[int]]) -> None:
    answer = Answer(pb.GenerateRequest(prompt="p", raw=True, max_tokens=9), started=0.0)
    for chunk in chunks:
        assert answer.see(text("x", *chunk), 1.0) == [text("x", *chunk)]
    assert answer.produced == [t for c in chunks for t in c]
    again = answer.next_request()
    assert list(again.produced_tokens) == answer.produced
    assert again.prompt == "p" and again.max_tokens == 9
    assert not answer.request.produced_tokens  # the request itself is left as it was


def test_a_resume_says_one_line_with_the_gap_and_the_whole_answers_figures() -> None:
    answer = Answer(pb.GenerateRequest(prompt="p", raw=True), started=10.0)
    notice = pb.GenerateEvent(notice="a base model")
    assert answer.see(notice, 10.0) == [notice]
    answer.see(text("a", 1, 2), 11.0)
    answer.lost(12.0)
    answer.resuming(["h2"], ["h1", "h3"])
    assert answer.see(notice, 13.0) == []  # the continuation repeats it
    out = answer.see(text("b", 3), 14.1)
    assert out == [pb.GenerateEvent(notice="h2 was lost; resumed on h1, h3 after 2.1 s"), out[1]]
    assert answer.see(text("c", 4), 14.5) == [text("c", 4)]
    done = pb.GenerateEvent(done=pb.GenerateStats(completion_tokens=4, prompt_tokens=3))
    (last,) = answer.see(done, 15.0)
    stats = last.done
    assert stats.resumes == 1 and list(stats.resumed_at) == [2]
    assert abs(stats.resume_gap_seconds - 2.1) < 1e-9
    assert abs(stats.time_to_first_token_ms - 1000) < 1e-6
    assert abs(stats.total_seconds - 5.0) < 1e-9
    assert "Resumed once after losing a device (2.1 s without tokens)" in render.stats_text(stats)
    assert render.stats_dict(stats)["resumes"] == 1


def test_at_most_three_resumes() -> None:
    answer = Answer(pb.GenerateRequest(), started=0.0)
    for i in range(resume.MAX_RESUMES):
        assert answer.may_resume()
        answer.lost(float(i))
    assert not answer.may_resume()
    assert "after 3 resumes already" in resume.gave_up(["h1"], answer.resumes)


def test_two_lost_at_once_are_named_together() -> None:
    assert resume.resumed_notice(["h2", "h3"], ["h1"], 1.04) == (
        "h2, h3 were lost; resumed on h1 after 1.0 s"
    )


@given(
    st.floats(min_value=0.0005, max_value=0.2),
    st.floats(min_value=0.0, max_value=0.001),
    st.floats(min_value=0.0, max_value=1.0),
)
def test_a_prefill_grows_its_chunks_to_what_an_evaluation_costs(
    fixed: float, per_token: float, noise: float
) -> None:
    """Evaluations costing `fixed` + `per_token` a token (the first one faster by
    `noise`, as a warm cache may make it): the chunks settle where one takes about
    PREFILL_CHUNK, or about twice the fixed cost when that is longer, and never fall
    below MIN_CHUNK tokens."""
    chunk, fastest = MIN_CHUNK, float("inf")
    for i in range(40):
        elapsed = (fixed + per_token * chunk) * (1 - noise if i == 0 else 1)
        fastest = min(fastest, elapsed)
        chunk = next_chunk(chunk, elapsed, fastest, 512)
        assert MIN_CHUNK <= chunk <= 512
    took = fixed + per_token * chunk
    assert took <= max(PREFILL_CHUNK, 2 * (fixed + per_token * MIN_CHUNK)) * 1.1 or (
        chunk == MIN_CHUNK
    )
    if noise == 0 and per_token * MIN_CHUNK < fixed / 4:  # the fixed cost dominates
        assert chunk >= 4 * MIN_CHUNK or chunk == 512


def test_a_continuation_elsewhere_names_the_model_and_adds_up_the_resumes() -> None:
    """A device relaying an answer whose root was lost asks the next root for the same
    file and context; the figures add its resume to those of the root that went on."""
    answer = Answer(pb.GenerateRequest(prompt="p", raw=True), 0.0, model_path="/m.gguf")
    answer.context_length = 512
    assert not answer.next_request().model_path  # nothing produced: a plain request
    answer.see(text("a", 5, 6), 1.0)
    answer.lost(2.0)
    answer.resuming(["h0"], ["h1"])
    again = answer.next_request()
    assert list(again.produced_tokens) == [5, 6]
    assert (again.model_path, again.context_length) == ("/m.gguf", 512)
    answer.see(text("b", 7), 5.0)
    theirs = pb.GenerateStats(completion_tokens=3, resumes=1, resume_gap_seconds=1.0)
    theirs.resumed_at.append(3)
    (done,) = answer.see(pb.GenerateEvent(done=theirs), 6.0)
    assert done.done.resumes == 2 and list(done.done.resumed_at) == [2, 3]
    assert abs(done.done.resume_gap_seconds - 4.0) < 1e-9
