"""What a prompt is checked against before the engine sees it, and how a model without
a chat template of its own takes one."""

from __future__ import annotations

import grpc

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdifd.daemon.errors import RequestError

PROMPT_BYTES_PER_TOKEN = 16
"""Prompt bytes allowed per token of context, checked before tokenizing. English text
averages about 4 bytes a token and code about 3; 16 leaves room for long tokens (runs
of spaces, long words) so that no prompt that could fit is refused, while the
tokenizer, which is quadratic on a long run without spaces, never sees more than a
full context's worth of text."""


def prompt_bytes(request: pb.GenerateRequest) -> int:
    """The size of a prompt's text, before the chat template adds its few bytes."""
    if request.raw:
        return len(request.prompt.encode())
    return sum(len(m.content.encode()) for m in request.messages)


def check_prompt_size(size: int, n_ctx: int) -> None:
    """Refuse a prompt of `size` bytes that cannot fit a context of `n_ctx` tokens."""
    limit = n_ctx * PROMPT_BYTES_PER_TOKEN
    if size > limit:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the prompt is {size} bytes but the model is loaded with a context of {n_ctx} "
            f"tokens, which takes at most {limit} bytes ({PROMPT_BYTES_PER_TOKEN} a token); "
            "shorten the prompt or load the model with a larger --max-seq-len",
        )


def base_model_request(request: pb.GenerateRequest, name: str) -> tuple[pb.GenerateRequest, str]:
    """How a model without a chat template of its own (a base model) takes `request`,
    and the sentence that says so: a prompt is completed as written; a conversation
    still goes through chat turns, which such a model follows poorly."""
    prompt = request.raw or (
        request.complete_if_base
        and len(request.messages) == 1
        and request.messages[0].role == "user"
    )
    if not prompt:
        return request, (
            f"{name} is not instruction-tuned (its file has no chat template): the "
            "conversation is put in chat turns it was not trained on, so answers may read "
            "poorly; for such a model, a prompt to complete works better"
        )
    if not request.raw:
        as_written = pb.GenerateRequest()
        as_written.CopyFrom(request)
        as_written.ClearField("messages")
        as_written.prompt = request.messages[0].content
        as_written.raw = True
        request = as_written
    return request, (
        f"{name} is not instruction-tuned (its file has no chat template): it continues "
        "the prompt as written rather than answering it"
    )
