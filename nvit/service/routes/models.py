"""ONNX models uploaded for measurement: checked in a child process, stored by sha256."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from nvit.service.blobs import check_sha256
from nvit.service.config import ServiceContext
from nvit.service.errors import not_found
from nvit.service.model_inspection import inspect_upload
from nvit.service.routes import Reader, Submitter, content_length, context
from nvit.service.routes.luts import IMMUTABLE

router = APIRouter(tags=["models"])
ONNX_MEDIA_TYPE = "application/onnx"


def _model_view(sha256: str, size_bytes: int, info: dict[str, Any]) -> dict[str, Any]:
    return {"sha256": sha256, "url": f"/v1/models/{sha256}", "size_bytes": size_bytes, **info}


@router.post("/models", status_code=201, summary="Upload an ONNX model (self-contained, standard operators).")
async def upload_model(request: Request, _: Submitter, response: Response) -> dict[str, Any]:
    ctx = context(request)
    received = await ctx.blobs.receive(request.stream(), limit_bytes=ctx.settings.max_model_bytes,
                                       declared_bytes=content_length(request), what="model upload", suffix=".onnx")

    def register() -> tuple[dict[str, Any], bool]:
        try:
            info = inspect_upload("onnx", received.path, what="model upload")
        except BaseException:
            ctx.blobs.discard(received)
            raise
        ctx.blobs.accept(received)
        created = ctx.store.add_blob(received.sha256, "onnx", received.size_bytes, info, ctx.now())
        return _model_view(received.sha256, received.size_bytes, info), created

    view, created = await run_in_threadpool(register)
    response.status_code = 201 if created else 200
    response.headers["Location"] = view["url"]
    return view


def stored_model(ctx: ServiceContext, sha256: str) -> Any:
    row = ctx.store.blob(check_sha256(sha256))
    if row is None or row["kind"] != "onnx":
        raise not_found(f"no model {sha256}")
    return row


@router.get("/models/{sha256}", summary="Download an uploaded model.", response_class=FileResponse)
def get_model(sha256: str, request: Request, _: Reader) -> Response:
    ctx = context(request)
    stored_model(ctx, sha256)
    return FileResponse(ctx.blobs.path(sha256), media_type=ONNX_MEDIA_TYPE,
                        headers={"ETag": f'"{sha256}"', "Cache-Control": IMMUTABLE})


@router.get("/models/{sha256}/meta", summary="What inspecting an uploaded model found.")
def get_model_meta(sha256: str, request: Request, _: Reader) -> dict[str, Any]:
    row = stored_model(context(request), sha256)
    return _model_view(row["sha256"], row["size_bytes"], row["info"])
