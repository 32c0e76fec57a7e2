"""Resuming an answer cut off by a lost device, as values and pure decisions.

An answer is the prompt and the tokens produced so far. The engine's stream says
which token ids each piece of text is made of, so the root knows exactly which tokens
the client has the text of; when a device holding layers is lost mid-answer, the root
places the model again over the devices left and asks for a continuation: the same
request with those token ids (`produced_tokens`), which the engine evaluates after the
prompt in one prefill and goes on from. `Answer` follows one answer through its
resumes; `Models` (models.py) does what it decides.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from hsmdif.proto import hsmdif_pb2 as pb

MAX_RESUMES = 3
"""Resumes one answer may take; a fourth loss ends it with a sentence."""


def resume_seed(seed: int, position: int) -> int:
    """The sampler's seed for a continuation from `position` tokens produced: a fixed
    function of the request's seed and the position, so a repeated run that loses a
    device at the same token samples the same continuation."""
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def continuation(request: pb.GenerateRequest, produced: Sequence[int]) -> pb.GenerateRequest:
    """`request`, asking to go on after the tokens `produced` (none: from the start)."""
    again = pb.GenerateRequest()
    again.CopyFrom(request)
    del again.produced_tokens[:]
    again.produced_tokens.extend(produced)
    return again


def lost_sentence(lost: Sequence[str]) -> str:
    return f"{', '.join(lost)} {'was' if len(lost) == 1 else 'were'} lost"


def resumed_notice(lost: Sequence[str], on: Sequence[str], gap: float) -> str:
    """What the person reads when the answer goes on: 'h2 was lost; resumed on h1, h3
    after 2.1 s'."""
    return f"{lost_sentence(lost)}; resumed on {', '.join(on)} after {gap:.1f} s"


def gave_up(lost: Sequence[str], resumes: int) -> str:
    """The sentence ending an answer that lost a device once too often."""
    return (
        f"{lost_sentence(lost)} mid-answer after {resumes} resumes already: the answer is cut "
        f"off (at most {MAX_RESUMES} resumes an answer); the next prompt plans without it"
    )


def cannot_hold(lost: Sequence[str], why: str) -> str:
    """The sentence ending an answer whose devices left cannot hold the model."""
    return f"{lost_sentence(lost)} mid-answer and the devices left cannot hold the model: {why}"


def no_file_here(device: str, path: str, why: object) -> str:
    """The sentence ending an answer a new root cannot go on with."""
    return (
        f"the root was lost mid-answer and the answer cannot go on on {device}, the new "
        f"root: it has no model file {path} ({why})"
    )


@dataclass
class Answer:
    """One answer through its resumes: the request, the token ids the client has the
    text of, and when the answer stopped to resume."""

    request: pb.GenerateRequest
    started: float  # when the request came (time.monotonic)
    produced: list[int] = field(default_factory=list)
    model_path: str = ""  # the file the answer is made with, for a continuation elsewhere
    context_length: int = 0  # the context it is loaded with
    resumed_at: list[int] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    first_at: float | None = None  # the first text, to the root
    lost_at: float | None = None  # the loss being resumed from, until the next token
    names: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())  # lost, resumed on
    told: set[str] = field(default_factory=set)  # notices passed on already

    @property
    def resumes(self) -> int:
        return len(self.resumed_at)

    def next_request(self) -> pb.GenerateRequest:
        again = continuation(self.request, self.produced)
        if self.produced and self.model_path:
            again.model_path = self.model_path
            again.context_length = self.context_length
        return again

    def may_resume(self) -> bool:
        return self.resumes < MAX_RESUMES

    def lost(self, now: float) -> None:
        """A device was lost at `now`: the next request continues from here."""
        if self.lost_at is None:
            self.lost_at = now
        self.resumed_at.append(len(self.produced))

    def resuming(self, lost: Sequence[str], on: Sequence[str]) -> None:
        """Placed again on `on`, `lost` left out: said with the next token."""
        self.names = (tuple(lost), tuple(on))

    def see(self, event: pb.GenerateEvent, now: float) -> list[pb.GenerateEvent]:
        """What to pass on for `event` from the engine: a notice once per answer (a
        continuation repeats its notices), the resumed line before the first event after
        a loss, and the figures of the whole answer at the end."""
        kind = event.WhichOneof("event")
        if kind == "notice":
            if event.notice in self.told:
                return []
            self.told.add(event.notice)
            return [event]
        out = []
        if self.lost_at is not None and kind in ("text", "done"):
            gap = now - self.lost_at
            self.gaps.append(gap)
            self.lost_at = None
            out.append(pb.GenerateEvent(notice=resumed_notice(*self.names, gap)))
        if kind == "text":
            if self.first_at is None:
                self.first_at = now
            self.produced.extend(event.tokens)
        elif kind == "done" and self.resumes:
            self.finish(event.done, now)
        out.append(event)
        return out

    def finish(self, stats: pb.GenerateStats, now: float) -> None:
        """The figures of the last part (the engine's, or a root's that resumed too), made
        the whole answer's: the engine counts every token produced; the times are ours."""
        stats.resumes += self.resumes
        stats.resume_gap_seconds += sum(self.gaps)
        resumed_at = sorted([*stats.resumed_at, *self.resumed_at])
        del stats.resumed_at[:]
        stats.resumed_at.extend(resumed_at)
        first = self.first_at if self.first_at is not None else now
        stats.time_to_first_token_ms = (first - self.started) * 1000
        decoding = now - first - stats.resume_gap_seconds
        produced = stats.completion_tokens
        stats.decode_tokens_per_second = (
            (produced - 1) / decoding if produced > 1 and decoding > 0 else 0.0
        )
        stats.total_seconds = now - self.started
