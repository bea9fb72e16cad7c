"""The FastAPI app factory: settings in, app out (no globals). OpenAPI at ``/docs``, one tag per resource.

Every error leaves as RFC 9457 problem JSON (:mod:`nvit.service.errors`). Request bodies are limited while
they stream: uploads by the limits of what they carry, everything else by ``max_json_bytes``; web pages
are kept out (:mod:`nvit.service.middleware`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nvit import __version__
from nvit.errors import NvitError
from nvit.service.config import ServiceContext, ServiceSettings
from nvit.service.errors import PROBLEM_MEDIA_TYPE, ApiError, problem
from nvit.service.middleware import BodyLimit, BrowserGuard

logger = logging.getLogger(__name__)

API_PREFIX = "/v1"
TAGS = [
    {"name": "devices", "description": "Agents and the devices they measure on."},
    {"name": "luts", "description": "Latency tables, content-addressed by sha256."},
    {"name": "models", "description": "ONNX models uploaded for measurement."},
    {"name": "jobs", "description": "Profile and measure jobs, and the agents' side of them."},
    {"name": "predict", "description": "Predicted latency from a stored table."},
]


def _problem_response(status: int, title: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(problem(status, title, detail), status_code=status, media_type=PROBLEM_MEDIA_TYPE,
                        headers=headers)


def create_app(settings: ServiceSettings, *, context: ServiceContext | None = None) -> FastAPI:
    """The service app. ``context`` (opened from ``settings`` when omitted) is closed with the app."""
    from nvit.service.routes import devices, jobs, luts, models, predict

    ctx = context or ServiceContext.open(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ctx.notifier.bind(asyncio.get_running_loop())
        expiry = asyncio.create_task(_expire_leases(ctx))
        try:
            yield
        finally:
            expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await expiry
            ctx.store.close()

    app = FastAPI(title="nvit latency service", version=__version__, openapi_tags=TAGS, lifespan=lifespan,
                  description="Latency tables, profile and measure jobs on target devices, predictions.")
    app.state.ctx = ctx
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    app.add_middleware(BodyLimit, settings=settings)
    app.add_middleware(BrowserGuard, settings=settings)  # outermost: a refused page never sends its body
    for module in (devices, luts, models, jobs, predict):
        app.include_router(module.router, prefix=API_PREFIX)

    @app.get("/healthz", tags=["devices"], summary="Liveness: the server answers and its database opens.")
    def healthz() -> dict[str, Any]:
        ctx.store.active_token_count()
        return {"status": "ok", "version": __version__}

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _problem_response(exc.status, exc.title, exc.detail, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        title = HTTPStatus(exc.status_code).phrase.lower()
        return _problem_response(exc.status_code, title, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors()[:3]:
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path"))
            parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
        return _problem_response(422, "invalid input", "; ".join(parts) or "invalid request")

    @app.exception_handler(NvitError)
    async def _nvit_error(_: Request, exc: NvitError) -> JSONResponse:
        return _problem_response(422, "invalid input", str(exc))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return _problem_response(500, "internal server error", f"{type(exc).__name__}; see the server log")

    return app


PROBLEM_SCHEMA = {
    "title": "Problem", "type": "object", "description": "An RFC 9457 problem document.",
    "required": ["type", "title", "status", "detail"],
    "properties": {"type": {"type": "string"}, "title": {"type": "string"},
                   "status": {"type": "integer", "minimum": 400, "maximum": 599}, "detail": {"type": "string"}},
}


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document, with every refusal declared as what it is: a problem document (FastAPI would
    declare its own validation-error shape, which this service never sends)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes,
                          tags=app.openapi_tags)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        schemas["Problem"] = PROBLEM_SCHEMA
        refusal = {"description": "Refused: why, as an RFC 9457 problem document.",
                   "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}}
        for operations in doc.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                responses["4XX"] = refusal
        app.openapi_schema = doc
    return app.openapi_schema


async def _expire_leases(ctx: ServiceContext) -> None:
    """Requeue expired leases even when no agent asks for work, and wake the agents waiting for it."""
    from starlette.concurrency import run_in_threadpool

    period_s = max(0.2, min(5.0, ctx.settings.lease_s / 4))
    while True:
        await asyncio.sleep(period_s)
        try:
            if await run_in_threadpool(ctx.queue.expire, now=ctx.now()):
                ctx.notifier.notify()
        except Exception:  # a database hiccup must not end the loop
            logger.exception("expiring leases failed")
