"""The Control service hsmdifctl talks to over the Unix socket."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.message import DecodeError

from hsmdif import limits
from hsmdif.limits import quoted, shorten
from hsmdif.proto import hsmdif_pb2 as pb
from hsmdif.proto import hsmdif_pb2_grpc as pb_grpc
from hsmdifd import __version__
from hsmdifd.api.metrics import Metrics
from hsmdifd.api.routing import Router
from hsmdifd.cluster.view import Cluster
from hsmdifd.daemon.errors import RequestError
from hsmdifd.daemon.logs import LogLimiter

log = logging.getLogger(__name__)

_ROLES = {"user", "assistant", "system"}
_STRATEGIES = {"", "capacity", "latency"}
_QUANTIZE = {"4bit", "8bit"}
Context = grpc.aio.ServicerContext[Any, Any]
T = TypeVar("T")
# Seconds between two log lines about the same kind of refused request.


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _visible(text: str) -> str:
    """`text` quoted and shortened for a message, its NUL bytes shown as \\0."""
    return quoted(text.replace("\0", "\\0"))


def check_path(path: str, what: str = "the model path") -> None:
    """A path a request may name: no NUL byte, at most MAX_PATH_BYTES."""
    if "\0" in path:
        raise _invalid(
            f"{what} {_visible(path)} holds a NUL byte, which no file name can; give the "
            "path to a .gguf file"
        )
    size = limits.utf8_size(path)
    if size > limits.MAX_PATH_BYTES:
        raise _invalid(
            f"{what} {quoted(path)} is {size:,} bytes long, more than a path can be "
            f"({limits.MAX_PATH_BYTES:,} bytes)"
        )


def check_name(name: str, what: str) -> None:
    if "\0" in name or limits.utf8_size(name) > limits.MAX_NAME_BYTES:
        raise _invalid(
            f"{what} {_visible(name)} is not a name a device can have "
            f"(at most {limits.MAX_NAME_BYTES:,} bytes, no NUL byte)"
        )


def check_context(max_seq_len: int) -> None:
    if max_seq_len and not limits.MIN_CONTEXT <= max_seq_len <= limits.MAX_CONTEXT:
        raise _invalid(
            f"--max-seq-len must be between {limits.MIN_CONTEXT:,} and "
            f"{limits.MAX_CONTEXT:,} tokens (got {max_seq_len:,})"
        )


def check_strategy(strategy: str) -> None:
    if strategy not in _STRATEGIES:
        raise _invalid(f"unknown strategy {quoted(strategy)}: use capacity or latency")


def check_load(request: pb.LoadRequest) -> None:
    """Refuse a malformed load request. Threads beyond what the root's CPUs allow are
    refused by the root itself (placer.py), wherever the request came from."""
    check_path(request.model_path)
    check_context(request.max_seq_len)
    check_strategy(request.strategy)
    check_quantize(request.quantize)
    if request.threads > limits.MAX_THREADS:
        raise _invalid(
            f"--threads {request.threads:,} is more than the engine can use (at most "
            f"{limits.MAX_THREADS:,}); leave it out for the configured count"
        )


def check_plan(request: pb.PlanRequest) -> None:
    check_path(request.model_path)
    check_context(request.max_seq_len)
    check_strategy(request.strategy)
    check_quantize(request.quantize, required=bool(request.num_parameters))
    n = request.num_parameters
    if n and not limits.MIN_PARAMETERS <= n <= limits.MAX_PARAMETERS:  # NaN fails too
        raise _invalid(
            f"--num-parameters must be a number between {limits.MIN_PARAMETERS:g} and "
            f"{limits.MAX_PARAMETERS:g} (got {n:g})"
        )
    if n and request.model_path:
        raise _invalid("give a model file or --num-parameters, not both")


def check_quantize(quantize: str, required: bool = False) -> None:
    if (quantize or required) and quantize not in _QUANTIZE:
        raise _invalid(f"--quantize must be 4bit or 8bit (got {quoted(quantize)})")


def check_priority(request: pb.SetPriorityRequest) -> None:
    if len(request.devices) > limits.MAX_DEVICES:
        raise _invalid(
            f"the priority order names {len(request.devices):,} devices "
            f"(at most {limits.MAX_DEVICES:,})"
        )
    for name in request.devices:
        check_name(name, "the device")


def check_generate(
    request: pb.GenerateRequest, max_prompt_bytes: int = limits.MAX_PROMPT_BYTES
) -> None:
    """Refuse a malformed generation request before it reaches the engine."""
    if not 0 <= request.max_tokens <= limits.MAX_TOKENS:
        raise _invalid(
            f"--max-tokens must be between 1 and {limits.MAX_TOKENS:,} (got {request.max_tokens:,})"
        )
    if request.HasField("temperature") and not (
        limits.MIN_TEMPERATURE <= request.temperature <= limits.MAX_TEMPERATURE
    ):
        raise _invalid(
            f"--temperature must be a number between {limits.MIN_TEMPERATURE:g} and "
            f"{limits.MAX_TEMPERATURE:g} (got {request.temperature:g})"
        )
    if len(request.messages) > limits.MAX_MESSAGES:
        raise _invalid(
            f"the conversation has {len(request.messages):,} messages "
            f"(at most {limits.MAX_MESSAGES:,}); start a new one"
        )
    size = limits.utf8_size(request.prompt) + sum(
        limits.utf8_size(m.content) for m in request.messages
    )
    if size > max_prompt_bytes:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the prompt is {size:,} bytes, more than hsmdifd takes ({max_prompt_bytes:,} "
            "bytes); shorten it, or start a new conversation",
        )
    if request.raw:
        if not request.prompt:
            raise _invalid("the prompt is empty")
        return
    if not request.messages or not any(m.content.strip() for m in request.messages):
        raise _invalid("the prompt is empty")
    for m in request.messages:
        if m.role not in _ROLES:
            raise _invalid(f"unknown message role {quoted(m.role)}: use user, assistant or system")


class ControlService(pb_grpc.ControlServicer):
    """Answers hsmdifctl; model requests go to the root, wherever it is."""

    def __init__(
        self,
        cluster: Cluster,
        router: Router,
        device_profile: Callable[[bool], pb.DeviceProfile],
        max_prompt_bytes: int = limits.MAX_PROMPT_BYTES,
        metrics: Metrics | None = None,
    ) -> None:
        self._cluster = cluster
        self._router = router
        self._device_profile = device_profile
        self._max_prompt_bytes = max_prompt_bytes
        self._metrics = metrics
        self._started = time.monotonic()
        self._log = LogLimiter(log)

    def _refused(self, kind: str, error: RequestError) -> None:
        if error.code == grpc.StatusCode.INVALID_ARGUMENT:
            self._log.warning(f"bad {kind}", "bad %s request: %s", kind, error)

    async def Status(self, request: pb.StatusRequest, context: Context) -> pb.StatusReply:
        cluster = self._cluster
        model = self._router.model_info()
        warning = ""
        if cluster.refused:
            warning = (
                f"this device's node id is also used by {cluster.refused}, which started "
                "first: it does not join; delete node_id in the state directory and restart"
            )
        elif not cluster.enabled:
            warning = "no cluster secret: this device runs alone (see hsmdifctl cluster init)"
        queued, in_flight, max_queue = self._router.load_counts()
        return pb.StatusReply(
            node_id=cluster.identity.node_id,
            name=cluster.identity.name,
            role="root" if cluster.is_root else "worker",
            root_name=cluster.root_name(),
            model=model,
            version=__version__,
            address=cluster.identity.address,
            uptime_seconds=time.monotonic() - self._started,
            epoch=cluster.epoch_pb(),
            policy=cluster.policy_for_people(),
            warning=warning,
            generating=self._router.generating(),
            queued=queued,
            in_flight=in_flight,
            max_queue=max_queue,
        )

    async def Devices(self, request: pb.DevicesRequest, context: Context) -> pb.DevicesReply:
        device = await asyncio.to_thread(self._device_profile, request.refresh_speed)
        self._cluster.set_device(device)
        devices = self._cluster.devices()
        shares = {p.node_id: p for p in self._router.model_info().plan.devices}
        for d in devices:
            if d.id in shares:
                d.layers = shares[d.id].layers + shares[d.id].holds_output
                d.share_bytes = shares[d.id].bytes
        return pb.DevicesReply(devices=devices)

    async def SetPriority(self, request: pb.SetPriorityRequest, context: Context) -> pb.Policy:
        if not request.by_memory and not request.devices:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "name the devices in priority order, or give --prioritize-by-memory",
            )
        try:
            check_priority(request)
            await self._cluster.set_priority(list(request.devices), request.by_memory)
        except RequestError as e:
            self._refused("priority", e)
            await context.abort(e.code, str(e))
        return self._cluster.policy_for_people()

    async def Plan(self, request: pb.PlanRequest, context: Context) -> pb.PlanReply:
        try:
            check_plan(request)
            return await self._router.plan(request)
        except RequestError as e:
            self._refused("plan", e)
            await context.abort(e.code, str(e))
            raise  # unreachable: abort raises

    async def Load(self, request: pb.LoadRequest, context: Context) -> AsyncIterator[pb.LoadEvent]:
        try:
            check_load(request)
            async for event in self._router.load(request):
                yield event
        except RequestError as e:
            self._log.warning(f"load {e.code.name}", "load refused: %s", e)
            await context.abort(e.code, str(e))

    async def Unload(self, request: pb.UnloadRequest, context: Context) -> pb.UnloadReply:
        try:
            return await self._router.unload(request)
        except RequestError as e:
            await context.abort(e.code, str(e))
            raise  # unreachable: abort raises

    async def Generate(
        self, request: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.GenerateEvent]:
        started = time.monotonic()
        first: float | None = None
        try:
            check_generate(request, self._max_prompt_bytes)
            async for event in self._router.generate(request):
                kind = event.WhichOneof("event")
                if kind == "text" and first is None:
                    first = time.monotonic()
                elif kind == "done" and self._metrics is not None:
                    ttft = None if first is None else first - started
                    self._metrics.answered(event.done, ttft)
                yield event
        except RequestError as e:
            self._log.warning(f"generate {e.code.name}", "generation failed: %s", e)
            await context.abort(e.code, str(e))


class _Undecodable(bytes):
    """What a request that is not a valid protobuf message is deserialized into, so that
    its handler refuses it with a sentence instead of gRPC logging a traceback. It keeps
    the bytes as they came, which is what a peer's proof covers."""

    sentence: str

    def __new__(cls, data: bytes, error: Exception) -> _Undecodable:
        self = super().__new__(cls, data)
        self.sentence = (
            f"the request could not be decoded ({shorten(str(error))}); use an hsmdifctl of "
            f"the same version as hsmdifd ({__version__})"
        )
        return self


def _lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as e:
            return _Undecodable(data, e)

    return deserialize


def add_control_service(service: ControlService, server: grpc.aio.Server) -> None:
    """Serve `service` on `server`, as add_ControlServicer_to_server does, except that an
    undecodable request gets INVALID_ARGUMENT and one rate-limited log line, and an error
    no handler expected gets INTERNAL with a sentence and one rate-limited traceback."""
    add_guarded(pb_grpc.add_ControlServicer_to_server, service, server, service._log)


def add_guarded(
    add: Callable[[Any, Any], None], service: Any, server: grpc.aio.Server, limiter: LogLimiter
) -> None:
    """Serve `service` with the generated `add` function, guarded as the control service."""
    capture = _Capture()
    add(service, capture)
    handlers = {
        name: _guarded(name, handler, limiter) for name, handler in capture.handlers.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(capture.name, handlers),))
    server.add_registered_method_handlers(capture.name, handlers)  # type: ignore[attr-defined]


class _Capture:
    """Stands in for a server to take the method handlers the generated code makes."""

    name = ""
    handlers: dict[str, Any]

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, name: str, handlers: dict[str, Any]) -> None:
        self.name, self.handlers = name, handlers


def _guarded(name: str, handler: Any, limiter: LogLimiter) -> Any:
    async def refuse(request: Any, context: Context) -> None:
        if isinstance(request, _Undecodable):
            limiter.warning(f"undecodable {name}", "undecodable %s request refused", name)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.sentence)

    async def failed(error: Exception, context: Context) -> NoReturn:
        """An abort goes on as it is; any other error becomes INTERNAL with a sentence."""
        if isinstance(error, grpc.aio.AbortError):
            raise error
        if limiter.allows(f"internal {name}"):
            log.exception("%s failed unexpectedly", name, exc_info=error)
        await context.abort(
            grpc.StatusCode.INTERNAL,
            f"hsmdifd failed on this request ({type(error).__name__}: "
            f"{shorten(str(error))}); its log has the details",
        )

    wrapped: Callable[[Any, Context], Any]
    if handler.unary_unary is not None:
        answer = handler.unary_unary

        async def unary(request: Any, context: Context) -> Any:
            await refuse(request, context)
            try:
                return await answer(request, context)
            except Exception as e:
                await failed(e, context)

        kind, wrapped = "unary_unary", unary
    else:
        events = handler.unary_stream

        async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
            await refuse(request, context)
            try:
                async for event in events(request, context):
                    yield event
            except Exception as e:
                await failed(e, context)

        kind, wrapped = "unary_stream", stream
    deserializer = _lenient(handler.request_deserializer)
    return handler._replace(**{kind: wrapped}, request_deserializer=deserializer)
