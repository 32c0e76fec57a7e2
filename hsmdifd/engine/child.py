"""The engine child process: owns the `llama_cpp.Llama` and serves the Engine service.

Started by the daemon as `python -m hsmdifd.engine.child --socket PATH`; it
listens on a private Unix socket and exits when its parent closes its stdin
(so it never outlives a daemon that was killed). Nothing here runs on the
daemon's event loop: llama.cpp aborts the whole process on some faults, and
only this process goes down then.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Generator, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdif.proto import hsmdif_pb2_grpc as pb_grpc
from hsmdifd.daemon.children import exit_when_parent_goes, first_to_go_when_memory_runs_out
from hsmdifd.daemon.timing import STREAM_INTERVAL
from hsmdifd.engine.prefill import prefill
from hsmdifd.engine.prompts import PROMPT_BYTES_PER_TOKEN, prompt_bytes
from hsmdifd.engine.resume import resume_seed
from hsmdifd.engine.text import TextStream

log = logging.getLogger("hsmdifd.engine.supervisor")

# llama.cpp's defaults (common/common.h: penalty_repeat 1.10 over penalty_last_n 64):
# without a penalty, greedy decoding of a small model loops on a phrase.
REPEAT_PENALTY = 1.1
REPEAT_LAST_N = 64

# Chat templates for models whose GGUF carries none, by architecture prefix.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
    "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
BUILTIN_TEMPLATES = {"gemma": GEMMA_TEMPLATE}
# Plain turns, for anything else.
FALLBACK_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


class LlamaLog:
    """The last error lines llama.cpp logged: its reason for refusing a file, which
    llama-cpp-python's exception ("Failed to load model from file") leaves out."""

    ERROR = 4  # GGML_LOG_LEVEL_ERROR
    CONT = 5  # GGML_LOG_LEVEL_CONT: the line before goes on

    def __init__(self, keep: int = 8) -> None:
        self._keep = keep
        self._lines: list[str] = []
        self._level = 0
        self._guard = threading.Lock()
        self.callback: Any = None  # the C callback feeding it, kept alive here

    def take(self, level: int, text: str) -> None:
        if level == self.CONT:
            level = self._level
        self._level = level
        if level != self.ERROR:
            return
        with self._guard:
            if self._lines and not self._lines[-1].endswith("\n"):
                self._lines[-1] += text
            else:
                self._lines.append(text)
            del self._lines[: -self._keep]

    def clear(self) -> None:
        with self._guard:
            self._lines.clear()

    def reason(self) -> str:
        """llama.cpp's own words for the last failure, or ''."""
        with self._guard:
            lines = [line.strip() for line in self._lines if line.strip()]
        for line in lines:  # "llama_model_load: error loading model: <reason>"
            _, found, reason = line.partition("error loading model: ")
            if found:
                return reason.strip()
        return lines[0].partition(": ")[2] or lines[0] if lines else ""


_llama_log = LlamaLog()


def _listen_to_llama_cpp() -> None:
    """Route llama.cpp's log lines to `_llama_log` (kept referenced: C calls it)."""
    import llama_cpp

    @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
    def callback(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        _llama_log.take(level, text.decode("utf-8", errors="replace"))

    _llama_log.callback = callback
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


def extra_buffers_safe(system_info: str) -> bool:
    """Whether llama.cpp may repack weights into its extra buffer types, from its
    `llama_print_system_info()`: not in a build with AMX kernels, whose matrix multiply
    crashes the process (SIGSEGV at ldtilecfg, ggml-org/llama.cpp#20824)."""
    return "AMX_INT8 = 1" not in system_info


def chat_template(metadata: dict[str, str]) -> str:
    """The model's own template, else a built-in one for its architecture."""
    if template := metadata.get("tokenizer.chat_template"):
        return template
    architecture = metadata.get("general.architecture", "")
    for prefix, template in BUILTIN_TEMPLATES.items():
        if architecture.startswith(prefix):
            return template
    return FALLBACK_TEMPLATE


@dataclass
class _Loaded:
    llm: Any  # llama_cpp.Llama
    formatter: Any  # llama_cpp.llama_chat_format.Jinja2ChatFormatter
    n_ctx: int
    pieces: dict[int, bytes] = field(default_factory=dict)  # token -> its bytes, as met

    def piece(self, token: int) -> bytes:
        """A token's bytes: llama-cpp-python's detokenize takes 40 us, a lookup nothing."""
        piece = self.pieces.get(token)
        if piece is None:
            piece = self.pieces[token] = self.llm.detokenize([token])
        return piece


def _load(request: pb.EngineLoadRequest, progress: queue.Queue[float]) -> _Loaded:
    import llama_cpp
    from llama_cpp import llama_chat_format

    callback_type = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_float, ctypes.c_void_p)

    def report(fraction: float, _data: object) -> bool:
        progress.put(float(fraction))
        return True  # go on loading

    callback = callback_type(report)
    default_params = llama_cpp.llama_cpp.llama_model_default_params
    extra_buffers = extra_buffers_safe(llama_cpp.llama_print_system_info().decode())
    if not extra_buffers:
        log.warning(
            "this llama.cpp build has AMX kernels, which crash (llama.cpp issue 20824): "
            "weights stay in plain CPU buffers; `make venv` builds without AMX"
        )

    def params_with_progress() -> Any:
        params = default_params()
        params.progress_callback = callback
        params.use_extra_bufts = extra_buffers
        return params

    # Llama() builds its model parameters from this function and offers no other
    # way to pass a progress callback.
    split: dict[str, Any] = {}
    if request.rpc_endpoints:
        from hsmdifd.engine import rpc

        rpc.require_rpc()
        rpc.register_servers(request.rpc_endpoints)
        split = {"n_gpu_layers": request.n_gpu_layers, "tensor_split": list(request.tensor_split)}
    llama_cpp.llama_cpp.llama_model_default_params = params_with_progress
    try:
        llm = llama_cpp.Llama(
            model_path=request.model_path,
            n_ctx=request.context_length,
            n_threads=request.threads,
            n_threads_batch=request.threads,
            n_batch=request.batch_size or 512,
            last_n_tokens_size=REPEAT_LAST_N,  # the repeat penalty's window
            verbose=False,
            **split,
        )
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = default_params
    eos, bos = llm.token_eos(), llm.token_bos()
    formatter = llama_chat_format.Jinja2ChatFormatter(
        template=chat_template(llm.metadata),
        eos_token=llm._model.token_get_text(eos) if eos != -1 else "",
        bos_token=llm._model.token_get_text(bos) if bos != -1 else "",
        stop_token_ids=[eos],
    )
    n_ctx = llm.n_ctx()
    if len(llm.input_ids) < n_ctx:
        # llama.cpp pads the context up (to a multiple of 256), and llama-cpp-python
        # sizes its token buffer by the figure asked for: a prompt longer than that
        # failed to fit the buffer. Size it by the context there is: one figure.
        llm.input_ids = np.zeros(n_ctx, dtype=np.intc)
    return _Loaded(llm=llm, formatter=formatter, n_ctx=n_ctx)


class EngineServicer(pb_grpc.EngineServicer):
    def __init__(self) -> None:
        self._loaded: _Loaded | None = None
        self._lock = threading.Lock()

    def Load(
        self, request: pb.EngineLoadRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.LoadEvent]:
        if self._loaded is not None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "a model is already loaded")
        progress: queue.Queue[float] = queue.Queue()
        result: list[_Loaded | BaseException] = []

        def run() -> None:
            _llama_log.clear()
            try:
                result.append(_load(request, progress))
            except BaseException as e:
                result.append(e)
            progress.put(-1.0)

        started = time.monotonic()
        threading.Thread(target=run, name="load", daemon=True).start()
        while (fraction := progress.get()) >= 0:
            yield pb.LoadEvent(progress=pb.LoadProgress(fraction=fraction, stage="weights"))
        outcome = result[0]
        if isinstance(outcome, BaseException):
            reason = _llama_log.reason() or str(outcome)
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"llama.cpp could not load {request.model_path}: {reason}",
            )
        self._loaded = outcome
        yield pb.LoadEvent(
            loaded=pb.ModelInfo(
                state=pb.READY,
                path=request.model_path,
                context_length=outcome.n_ctx,
                threads=request.threads,
                load_seconds=time.monotonic() - started,
            )
        )

    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateEvent]:
        received = time.monotonic()
        loaded = self._loaded
        if loaded is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no model is loaded")
        size = prompt_bytes(request)
        limit = loaded.n_ctx * PROMPT_BYTES_PER_TOKEN
        if size > limit:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the prompt is {size} bytes but the model is loaded with a context of "
                f"{loaded.n_ctx} tokens, which takes at most {limit} bytes",
            )
        ended = threading.Event()
        context.add_callback(ended.set)  # the call ended: done, or cancelled by the daemon
        # Tokenizing needs no lock: a long prompt does not hold up the answer in flight.
        tokens = _prompt_tokens(loaded, request)
        _check_room(loaded, tokens, request, context)
        with self._lock:
            if not ended.is_set():
                yield from ahead(
                    _generate(
                        loaded,
                        tokens,
                        request=request,
                        context=context,
                        received=received,
                        ended=ended,
                    ),
                    ended,
                )


@dataclass
class _Raised:
    error: BaseException


def ahead(
    events: Iterator[pb.GenerateEvent], ended: threading.Event
) -> Generator[pb.GenerateEvent, None, None]:
    """`events`, made on a thread of their own while this one hands them to gRPC.

    Sending a message waits for gRPC's own threads (half a millisecond on a 2-core
    machine): the decode goes on meanwhile instead of waiting once per message. When
    the caller stops (the call ended, a send failed), `ended` is set and the maker,
    which looks at it after every token, is waited for: the model is free once this
    returns. What the maker raises is raised here.
    """
    made: queue.SimpleQueue[pb.GenerateEvent | _Raised | None] = queue.SimpleQueue()

    def make() -> None:
        try:
            for event in events:
                made.put(event)
        except BaseException as e:
            made.put(_Raised(e))
        finally:
            made.put(None)

    maker = threading.Thread(target=make, name="generate", daemon=True)
    maker.start()
    try:
        while (item := made.get()) is not None:
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        ended.set()
        maker.join()


def _prompt_tokens(loaded: _Loaded, request: pb.GenerateRequest) -> list[int]:
    llm = loaded.llm
    if request.raw:
        return list(llm.tokenize(request.prompt.encode(), add_bos=True, special=False))
    messages = [{"role": m.role, "content": m.content} for m in request.messages]
    formatted = loaded.formatter(messages=messages)
    return list(llm.tokenize(formatted.prompt.encode(), add_bos=False, special=True))


def _check_room(
    loaded: _Loaded, tokens: list[int], request: pb.GenerateRequest, context: grpc.ServicerContext
) -> None:
    """Refuse a prompt (`tokens`), or a continuation, that leaves no room to generate."""
    if loaded.n_ctx - len(tokens) < 1:
        context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the prompt is {len(tokens)} tokens but the model is loaded with a context of "
            f"{loaded.n_ctx}; shorten the prompt or load the model with a larger --max-seq-len",
        )
    before = len(request.produced_tokens)
    if len(tokens) + before >= loaded.n_ctx:
        context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the answer cannot go on: its prompt ({len(tokens)} tokens) and the "
            f"{before} tokens produced fill the context of {loaded.n_ctx} tokens "
            "the model is loaded with here",
        )


def _generate(
    loaded: _Loaded,
    tokens: list[int],
    *,
    request: pb.GenerateRequest,
    context: grpc.ServicerContext,
    received: float,
    ended: threading.Event,
) -> Iterator[pb.GenerateEvent]:
    """Answer `request`, whose prompt is `tokens`; a continuation (`produced_tokens`)
    evaluates the tokens produced before after it, in the same prefill, and goes on."""
    import llama_cpp

    llm = loaded.llm
    room = loaded.n_ctx - len(tokens)
    before = list(request.produced_tokens)
    max_tokens = min(request.max_tokens, room)
    temperature = request.temperature if request.HasField("temperature") else 0.8
    top_p = request.top_p if request.HasField("top_p") else 0.95
    seed = request.seed if request.HasField("seed") else random.getrandbits(32)
    llm.set_seed(resume_seed(seed, len(before)) if before else seed)
    stream = TextStream(tuple(request.stop), strip_leading=not request.raw)
    stream.replay(loaded.piece(t) for t in before)
    evaluated = tokens + before
    if not prefill(llm, evaluated, ended):
        return
    vocab = llm._model.vocab
    produced = len(before)
    first_at = sent_at = 0.0
    pending: list[str] = []
    pending_tokens: list[int] = []  # the tokens of `pending`, and of text held back
    finish = "length"
    # The prompt is all in the KV cache: generate() finds it there and samples at once.
    sampling = {"top_k": 40, "top_p": top_p, "min_p": 0.05, "repeat_penalty": REPEAT_PENALTY}
    answer = llm.generate(evaluated, temp=temperature, **sampling) if produced < max_tokens else ()
    for token in answer:
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            finish = "stop"
            break
        produced += 1
        pending_tokens.append(token)
        text = stream.feed(loaded.piece(token))
        if not first_at:
            first_at = time.monotonic()
        if stream.stopped:
            pending.append(text)
            finish = "stop"
            break
        if text:
            pending.append(text)
            now = time.monotonic()
            if now - sent_at >= STREAM_INTERVAL:  # the first piece goes at once
                yield pb.GenerateEvent(text="".join(pending), tokens=pending_tokens)
                pending.clear()
                pending_tokens.clear()
                sent_at = now
        if produced >= max_tokens:
            break
        if ended.is_set() or not context.is_active():
            return
    pending.append(stream.end())
    if pending_tokens or any(pending):
        yield pb.GenerateEvent(text="".join(pending), tokens=pending_tokens)
    done = time.monotonic()
    new = produced - len(before)
    decode_seconds = done - first_at if new > 1 else 0.0
    yield pb.GenerateEvent(
        done=pb.GenerateStats(
            prompt_tokens=len(tokens),
            completion_tokens=produced,
            time_to_first_token_ms=(first_at - received) * 1000 if new else 0.0,
            decode_tokens_per_second=(new - 1) / decode_seconds if decode_seconds else 0.0,
            finish_reason=finish,
            total_seconds=done - received,
        )
    )


def main() -> None:
    # ggml attaches gdb for a backtrace before aborting (a dead RPC worker aborts
    # this process): slow and noisy, and the daemon reports the death itself.
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")
    parser = argparse.ArgumentParser(prog="hsmdifd.engine.child")
    parser.add_argument("--socket", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="engine %(levelname)s %(message)s")
    first_to_go_when_memory_runs_out()
    _listen_to_llama_cpp()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_EngineServicer_to_server(EngineServicer(), server)
    server.add_insecure_port(f"unix:{args.socket}")
    server.start()
    print("ready", flush=True)
    exit_when_parent_goes()


if __name__ == "__main__":
    main()
