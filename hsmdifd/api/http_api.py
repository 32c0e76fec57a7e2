"""The OpenAI-compatible HTTP API, served with aiohttp on the daemon's own loop.

Every model request goes through the Router, so a request to any device is answered by
the root. Shapes and checks live in `openai_shapes`; this module is the wiring: routes,
the key, CORS, errors as OpenAI's error objects, streaming as server-sent events, and a
client that goes away ending its generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from hsmdif.proto import hsmdif_pb2 as pb
from hsmdifd.api import api_key, metrics, openai_shapes, sse
from hsmdifd.api.control_service import check_generate
from hsmdifd.api.http_errors import RETRY_AFTER, ApiError, from_request_error
from hsmdifd.api.openai_shapes import BadRequest, Parsed
from hsmdifd.api.routing import Router
from hsmdifd.daemon.errors import RequestError

log = logging.getLogger(__name__)

OWNER = "hsmdif"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def model_id(path: str) -> str:
    """A model's stable id: its file's stem."""
    return Path(path).stem if path else ""


class HttpApi:
    def __init__(
        self,
        router: Router,
        metrics_: metrics.Metrics,
        default_model: Callable[[], str],
        key: bytes | None,
        cors_origins: tuple[str, ...] = (),
    ) -> None:
        self._router = router
        self._metrics = metrics_
        self._default_model = default_model
        self._key = key
        self._cors = cors_origins
        self._runner: web.AppRunner | None = None
        self._told: set[str] = set()  # models already said to be base models
        self.app = web.Application(middlewares=[self._cors_mw, self._errors_mw, self._auth_mw])
        self.app.add_routes(
            [
                web.get("/v1/models", self.models),
                web.get("/v1/models/{id}", self.model),
                web.post("/v1/chat/completions", self.chat),
                web.post("/v1/completions", self.completions),
                web.get("/health", self.health),
                web.get("/metrics", self.metrics),
            ]
        )

    async def start(self, host: str, port: int) -> None:
        # handler_cancellation: a client that goes away cancels its handler, and with it
        # the generation (the default since aiohttp 3.9 lets the handler run on).
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port, reuse_address=True).start()

    async def stop(self, grace: float) -> None:
        """Stop accepting; answers in flight get `grace` seconds, then are cancelled."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        runner._shutdown_timeout = grace  # aiohttp takes it only at construction
        await runner.cleanup()

    # ---- middlewares ----------------------------------------------------------------

    @web.middleware
    async def _cors_mw(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        allowed = origin is not None and ("*" in self._cors or origin in self._cors)
        if request.method == "OPTIONS" and allowed:
            response: web.StreamResponse = web.Response(status=204)
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = request.headers.get(
                "Access-Control-Request-Headers", "Authorization, Content-Type"
            )
            response.headers["Access-Control-Max-Age"] = "600"
        else:
            response = await handler(request)
        if allowed and origin is not None and not response.prepared:
            response.headers["Access-Control-Allow-Origin"] = "*" if "*" in self._cors else origin
            response.headers["Vary"] = "Origin"
        return response

    @web.middleware
    async def _errors_mw(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        endpoint = request.match_info.route.resource
        name = endpoint.canonical if endpoint is not None else "unknown"
        try:
            response = await handler(request)
        except ApiError as e:
            response = e.response()
        except web.HTTPException as e:
            if e.status < 400:
                raise
            kind = "invalid_request_error" if e.status < 500 else "server_error"
            message = f"{request.method} {request.path}: {e.reason}"
            if e.status == 404:
                message = f"no such route: {request.method} {request.path} (see /v1/models)"
                name = "unknown"
            response = ApiError(
                e.status, message, kind, code=e.reason.lower().replace(" ", "_")
            ).response()
        self._metrics.requests.labels(name, str(response.status)).inc()
        return response

    @web.middleware
    async def _auth_mw(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if (
            self._key is not None
            and request.path != "/health"
            and not api_key.matches(self._key, request.headers.get("Authorization"))
        ):
            raise ApiError(
                401,
                "a wrong or missing API key: send the key from [api] api_key_file as "
                "'Authorization: Bearer KEY'",
                code="invalid_api_key",
            )
        return await handler(request)

    # ---- models ---------------------------------------------------------------------

    def _known(self) -> list[str]:
        """Ids of the loaded model and the default model, loaded first."""
        ids = []
        info = self._router.model_info()
        if info.state in (pb.READY, pb.LOADING) and info.path:
            ids.append(model_id(info.path))
        default = self._default_model()
        if default and default not in ids:
            ids.append(default)
        return ids

    def _check_model(self, name: str) -> None:
        known = self._known()
        if name not in known:
            raise ApiError(
                404,
                f"the model {name!r} does not exist here: known models are "
                f"{', '.join(known) or 'none'}; HTTP requests never load another file",
                param="model",
                code="model_not_found",
            )

    async def _default_if_named(self, name: str) -> None:
        """Load the default model when it is the one named and another is loaded (the
        only load HTTP makes: never a path of the client's choosing)."""
        info = self._router.model_info()
        if info.state != pb.READY or name == model_id(info.path):
            return  # what is loaded, or nothing, which loads the default anyway
        log.info("an HTTP request names the default model %s: loading it", name)
        try:
            async for _ in self._router.load(pb.LoadRequest()):
                pass
        except RequestError as e:
            raise from_request_error(e, "model") from None

    async def models(self, request: web.Request) -> web.Response:
        now = int(time.time())
        return web.json_response(
            openai_shapes.models_list([(i, now) for i in self._known()], OWNER)
        )

    async def model(self, request: web.Request) -> web.Response:
        self._check_model(request.match_info["id"])
        return web.json_response(
            {
                "id": request.match_info["id"],
                "object": "model",
                "created": int(time.time()),
                "owned_by": OWNER,
            }
        )

    # ---- health and metrics ---------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        if not self._router.root_known():
            return web.json_response(
                {"status": "unavailable", "reason": "the root is not known or does not answer"},
                status=503,
                headers={"Retry-After": RETRY_AFTER},
            )
        info = self._router.model_info()
        state = pb.ModelState.Name(info.state).lower()
        body = {"status": "ok", "model": model_id(info.path) or None, "state": state}
        if info.state == pb.LOADING:
            body["status"] = "loading"
            return web.json_response(body, status=503, headers={"Retry-After": RETRY_AFTER})
        if info.state == pb.FAILED:
            body["error"] = info.error
        return web.json_response(body)

    async def metrics(self, request: web.Request) -> web.Response:
        body = await asyncio.to_thread(self._metrics.render)
        return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})

    # ---- generation -----------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, openai_shapes.parse_chat)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, openai_shapes.parse_completion)

    async def _generate(
        self, request: web.Request, parse: Callable[[object], Parsed]
    ) -> web.StreamResponse:
        started = time.monotonic()
        try:
            body = await request.json(loads=json.loads)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        try:
            parsed = parse(body)
        except BadRequest as e:
            raise ApiError(400, str(e), param=e.param) from None
        self._check_model(parsed.model)
        await self._default_if_named(parsed.model)
        generate = openai_shapes.generate_request(parsed)
        try:
            check_generate(generate)
        except RequestError as e:
            raise from_request_error(e, "messages" if parsed.chat else "prompt") from None
        answer = sse.Answer(
            parsed,
            ident=f"{'chatcmpl' if parsed.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            created=int(time.time()),
            on_notice=self._tell_once,
        )
        events = self._router.generate(generate)
        async with contextlib.aclosing(events):  # type: ignore[type-var]
            try:
                if parsed.stream:
                    return await sse.stream(request, self._allow_origin(request), events, answer)
                async for piece in answer.texts(events):
                    answer.text.append(piece)
            except RequestError as e:
                raise from_request_error(e, "messages" if parsed.chat else "prompt") from None
            finally:
                self._record(answer, started)
        return web.json_response(
            openai_shapes.answer(
                parsed,
                ident=answer.ident,
                created=answer.created,
                text="".join(answer.text),
                stats=answer.final_stats(),
            )
        )

    def _allow_origin(self, request: web.Request) -> str | None:
        """The Access-Control-Allow-Origin a streamed answer carries, if any."""
        origin = request.headers.get("Origin")
        if origin and ("*" in self._cors or origin in self._cors):
            return "*" if "*" in self._cors else origin
        return None

    def _tell_once(self, notice: str) -> None:
        if notice not in self._told:
            self._told.add(notice)
            log.warning("%s", notice)

    def _record(self, answer: sse.Answer, started: float) -> None:
        if answer.stats is None and not answer.pieces:
            return
        ttft = answer.first_at - started if answer.first_at is not None else None
        self._metrics.answered(answer.final_stats(), ttft)
