"""OpenAI's request and response shapes, as pure functions: a JSON body in, a checked
request or a `BadRequest` naming the field out; answers and stream chunks built as the
`openai` SDK and the tools built on it expect them. No I/O here.

Fields OpenAI defines that the cluster does not use (frequency_penalty, user, tools,
logit_bias, ...) are ignored, as llama-server and Ollama ignore them: clients send them
by default.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hsmdif.proto import hsmdif_pb2 as pb

ROLES = {"system", "user", "assistant", "developer"}  # developer: OpenAI's newer "system"
MAX_STOP = 4
MAX_TEMPERATURE = 2.0


class BadRequest(Exception):
    """A request OpenAI would refuse with 400; `param` names the field."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Sampling:
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Parsed:
    """A checked /v1/chat/completions or /v1/completions request."""

    model: str
    stream: bool = False
    include_usage: bool = False
    sampling: Sampling = field(default_factory=Sampling)
    messages: tuple[tuple[str, str], ...] = ()  # (role, content); empty for a completion
    prompt: str | None = None  # set for a completion

    @property
    def chat(self) -> bool:
        return self.prompt is None


def _object(body: object) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object", None)
    return body


def _present(body: Mapping[str, Any], key: str) -> bool:
    return body.get(key) is not None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)  # type: ignore[arg-type]


def _bool(body: Mapping[str, Any], key: str, param: str | None = None) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"'{param or key}' must be true or false", param or key)
    return value


def _model(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' must name a model: see GET /v1/models", "model")
    return model


def _max_tokens(body: Mapping[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        if not _present(body, key):
            continue
        value = body[key]
        if not _is_int(value) or value < 1:
            raise BadRequest(f"'{key}' must be a whole number of at least 1", key)
        return int(min(value, 2**31 - 1))
    return None


def _number(body: Mapping[str, Any], key: str, low: float, high: float) -> float | None:
    if not _present(body, key):
        return None
    value = body[key]
    if not _is_number(value) or not low <= value <= high:
        raise BadRequest(f"'{key}' must be a number from {low:g} to {high:g}", key)
    return float(value)


def _seed(body: Mapping[str, Any]) -> int | None:
    if not _present(body, "seed"):
        return None
    value = body["seed"]
    if not _is_int(value):
        raise BadRequest("'seed' must be a whole number", "seed")
    return int(value) & 0xFFFFFFFF


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    if not _present(body, "stop"):
        return ()
    value = body["stop"]
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise BadRequest("'stop' must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP:
        raise BadRequest(f"'stop' takes at most {MAX_STOP} strings (got {len(stops)})", "stop")
    return tuple(s for s in stops if s)


def _n(body: Mapping[str, Any]) -> None:
    if _present(body, "n") and (not _is_int(body["n"]) or body["n"] != 1):
        raise BadRequest("'n' must be 1: the cluster gives one answer per request", "n")


def _sampling(body: Mapping[str, Any]) -> Sampling:
    _n(body)
    return Sampling(
        max_tokens=_max_tokens(body),
        temperature=_number(body, "temperature", 0.0, MAX_TEMPERATURE),
        top_p=_number(body, "top_p", 0.0, 1.0),
        seed=_seed(body),
        stop=_stop(body),
    )


def _stream(body: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object", "stream_options")
    return stream, _bool(options, "include_usage", "stream_options.include_usage")


def _content(message: Mapping[str, Any], where: str) -> str:
    content = message.get("content")
    if content is None and message.get("role") == "assistant":
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise BadRequest(
                    f"'{where}.content[{i}]' must be a text part "
                    '({"type": "text", "text": ...}): the model reads text only',
                    f"{where}.content",
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise BadRequest(
                    f"'{where}.content[{i}].text' must be a string", f"{where}.content"
                )
            texts.append(text)
        return "".join(texts)
    raise BadRequest(
        f"'{where}.content' must be a string or a list of text parts", f"{where}.content"
    )


def _messages(body: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of messages", "messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise BadRequest(f"'{where}' must be an object with role and content", where)
        role = message.get("role")
        if role not in ROLES:
            raise BadRequest(
                f"'{where}.role' must be system, user or assistant (got {role!r})",
                f"{where}.role",
            )
        out.append(("system" if role == "developer" else str(role), _content(message, where)))
    if not any(content.strip() for _, content in out):
        raise BadRequest("'messages' hold no text", "messages")
    return tuple(out)


def parse_chat(body: object) -> Parsed:
    """A /v1/chat/completions body, checked; BadRequest naming the first bad field."""
    body = _object(body)
    model = _model(body)
    messages = _messages(body)
    stream, include_usage = _stream(body)
    return Parsed(model, stream, include_usage, _sampling(body), messages=messages)


def parse_completion(body: object) -> Parsed:
    """A /v1/completions body, checked; BadRequest naming the first bad field."""
    body = _object(body)
    model = _model(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("'prompt' must be a string", "prompt")
    if not prompt.strip():
        raise BadRequest("'prompt' is empty", "prompt")
    stream, include_usage = _stream(body)
    return Parsed(model, stream, include_usage, _sampling(body), prompt=prompt)


def generate_request(parsed: Parsed) -> pb.GenerateRequest:
    """The cluster's request for a parsed one (max_tokens 0: the configured default)."""
    s = parsed.sampling
    if parsed.chat:
        request = pb.GenerateRequest(
            messages=[pb.ChatMessage(role=r, content=c) for r, c in parsed.messages]
        )
    else:
        request = pb.GenerateRequest(prompt=parsed.prompt or "", raw=True)
    request.max_tokens = s.max_tokens or 0
    if s.temperature is not None:
        request.temperature = s.temperature
    if s.top_p is not None:
        request.top_p = s.top_p
    if s.seed is not None:
        request.seed = s.seed
    request.stop.extend(s.stop)
    return request


# ---------------------------------------------------------------- stop sequences


def error_body(
    message: str, kind: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(stats: pb.GenerateStats) -> dict[str, int]:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "total_tokens": stats.prompt_tokens + stats.completion_tokens,
    }


def finish_reason(stats: pb.GenerateStats) -> str:
    return "length" if stats.finish_reason == "length" else "stop"


def answer(
    parsed: Parsed, *, ident: str, created: int, text: str, stats: pb.GenerateStats
) -> dict[str, Any]:
    """The whole answer, not streamed."""
    finish = finish_reason(stats)
    if parsed.chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish,
        }
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        kind = "text_completion"
    return {
        "id": ident,
        "object": kind,
        "created": created,
        "model": parsed.model,
        "choices": [choice],
        "usage": usage(stats),
    }


def chunk(
    parsed: Parsed,
    *,
    ident: str,
    created: int,
    text: str | None = None,
    finish: str | None = None,
    first: bool = False,
    with_usage: pb.GenerateStats | None = None,
) -> dict[str, Any]:
    """One streamed chunk: a piece of text, the finish reason, or (with_usage) the
    usage chunk that stream_options.include_usage asks for, which has no choices."""
    body: dict[str, Any] = {
        "id": ident,
        "object": "chat.completion.chunk" if parsed.chat else "text_completion",
        "created": created,
        "model": parsed.model,
    }
    if with_usage is not None:
        body["choices"] = []
        body["usage"] = usage(with_usage)
        return body
    if parsed.chat:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta}
    else:
        choice = {"index": 0, "text": text or ""}
    choice["logprobs"] = None
    choice["finish_reason"] = finish
    body["choices"] = [choice]
    if parsed.include_usage:
        body["usage"] = None
    return body


def models_list(ids: list[tuple[str, int]], owner: str) -> dict[str, Any]:
    """GET /v1/models: (id, created) pairs."""
    return {
        "object": "list",
        "data": [
            {"id": ident, "object": "model", "created": created, "owned_by": owner}
            for ident, created in ids
        ],
    }
