"""The FastAPI application: HTTP and WebSocket endpoints over the batching workers."""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import orjson
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, TypeAdapter
from starlette.concurrency import run_in_threadpool

from mlip import __version__, wire

from .auth import ApiKeys, AuthMiddleware
from .errors import ApiError
from .inputs import ON_LOOP_MAX_ATOMS, ON_LOOP_MAX_BODY_BYTES, build_graphs, decode_body, evaluate, off_loop, parse, read_body
from .metrics import Metrics, MetricsMiddleware
from .models import ModelRegistry
from .schemas import CalculateRequest, CalculateResponse, ErrorResponse, ModelsResponse, StreamStart, StreamStep
from .settings import Settings
from .stream import StreamSession

log = logging.getLogger("mlip.server")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
CALCULATE_REQUEST: TypeAdapter[CalculateRequest] = TypeAdapter(CalculateRequest)
BODY_SCHEMAS = (CalculateRequest, StreamStart, StreamStep)
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 415, 422, 500, 503, 504)}
DESCRIPTION = (
    "Energies (eV), forces (eV/Å), stress (eV/Å³) and per-atom energies from an E(3)-equivariant potential. "
    "Bodies may be JSON or msgpack (arrays as raw little-endian bytes, see docs/server.md); "
    "WebSocket sessions at /v1/stream take StreamStart then StreamStep messages."
)


def encode(payload: Any, accept: str | None, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """msgpack (raw arrays) if the client accepts it, else JSON via orjson."""
    if accept and wire.MSGPACK in accept:
        return Response(wire.packb(payload), status, headers, media_type=wire.MSGPACK)
    return Response(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY), status, headers, media_type=wire.JSON)


def _body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI request body: the same schema in JSON and msgpack."""
    ref = {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
    return {"requestBody": {"required": True, "content": {wire.JSON: ref, wire.MSGPACK: ref}}}


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; models load in a background thread when it starts (see /health/ready)."""
    settings = settings or Settings()
    metrics = Metrics()
    registry = ModelRegistry(settings, metrics)
    keys = ApiKeys(settings.api_keys())
    if not keys.enabled and settings.host not in LOOPBACK_HOSTS:
        log.warning("authentication is OFF while binding %s: anyone who reaches this port can use it", settings.host)
    loader = threading.Thread(target=registry.load, name="mlip-model-loader", daemon=True)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loader.start()
        yield
        await run_in_threadpool(loader.join, settings.request_timeout_s)
        await run_in_threadpool(registry.close)

    app = FastAPI(title="mlip", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.settings, app.state.metrics, app.state.registry = settings, metrics, registry
    app.add_middleware(AuthMiddleware, keys=keys)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> Response:
        return encode(err.body(), request.headers.get("accept"), err.status, err.headers)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, err: Exception) -> Response:
        log.exception("unexpected error on %s", request.url.path)
        return encode(ApiError(500, None, f"internal error: {type(err).__name__}").body(), request.headers.get("accept"), 500)

    @app.post(
        "/v1/calculate",
        response_model=CalculateResponse,
        responses={200: {"content": {wire.MSGPACK: {}}}, **ERRORS},
        openapi_extra=_body_schema(CalculateRequest),
        summary="Energy, forces, stress and per-atom energies of one or many structures",
    )
    async def calculate(request: Request) -> Response:
        body = await read_body(request, settings.max_body_bytes)
        content_type = request.headers.get("content-type")
        data = await off_loop(
            lambda: parse(CALCULATE_REQUEST, decode_body(body, content_type)), small=len(body) <= ON_LOOP_MAX_BODY_BYTES
        )
        served = registry.get(data.model)
        atoms = sum(len(s.numbers) for s in data.structures)
        graphs = await off_loop(build_graphs, served, settings, data.structures, small=atoms <= ON_LOOP_MAX_ATOMS)
        results = await evaluate(served, settings, graphs, data.properties, "structures")
        return encode({"model": served.ref, "results": results}, request.headers.get("accept"))

    @app.websocket("/v1/stream")
    async def stream(websocket: WebSocket) -> None:
        await websocket.accept()
        session = StreamSession(registry, settings, metrics)
        try:
            while (message := await websocket.receive())["type"] != "websocket.disconnect":
                reply = await session.handle(message.get("bytes"))
                await websocket.send_bytes(wire.packb(reply))
        except WebSocketDisconnect:
            return
        finally:
            session.close()

    @app.get("/v1/models", response_model=ModelsResponse, responses=ERRORS, summary="Served models")
    async def models() -> ModelsResponse:
        default = registry.get(None).potential.name
        return ModelsResponse(default=default, models=[m.info(n == default) for n, m in registry.models.items()])

    @app.get("/health/live", responses={503: {"model": ErrorResponse}}, summary="The process and its workers answer")
    async def live() -> Response:
        stalled = registry.stalled_workers()
        if stalled:
            message = f"worker(s) {stalled} stuck in one batch for more than {settings.worker_stall_s} s"
            return encode(ApiError(503, None, message).body(), None, 503)
        return encode({"status": "live"}, None)

    @app.get("/health/ready", responses={503: {"model": ErrorResponse}}, summary="Models loaded, warmed up and healthy")
    async def ready() -> Response:
        failing = registry.failing_workers()
        if registry.ready and not failing:
            return encode({"status": "ready", "models": sorted(registry.models)}, None)
        message = registry.error or (f"model(s) {failing} failing on the device" if failing else "models are loading")
        return encode(ApiError(503, None, message).body(), None, 503, {"Retry-After": str(settings.retry_after_s)})

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}, "description": "Prometheus text format"}},
    )
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in BODY_SCHEMAS:
                model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(model_schema.pop("$defs", {}))
                components[model.__name__] = model_schema
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
