"""Latency tables: list and filter, download (immutable, ETag = sha256), upload, merge."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from nvit.errors import NvitError
from nvit.fileio import file_sha256
from nvit.service.blobs import ReceivedBlob, check_sha256
from nvit.service.config import ServiceContext
from nvit.service.errors import not_found, unprocessable
from nvit.service.model_inspection import inspect_upload
from nvit.service.routes import Reader, Submitter, content_length, context, device_key, device_name, lut_view
from nvit.service.schemas import DB_INT_MAX, Strict, TableMetaSchema, check_table_meta

router = APIRouter(tags=["luts"])
PARQUET_MEDIA_TYPE = "application/vnd.apache.parquet"
IMMUTABLE = "public, max-age=31536000, immutable"


Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Filter = Annotated[str | None, Query(max_length=300, pattern=r"^[^\x00]*$")]


class MergeRequest(Strict):
    luts: list[Sha256] = Field(min_length=2, max_length=64)


def lut_row(sha256: str, meta: dict[str, Any], checked: TableMetaSchema, rows: int, *, source: str,
            now: float) -> dict[str, Any]:
    identity = meta["device_identity"]
    return {
        "sha256": sha256, "device_key": device_key(identity), "device_kind": checked.device_kind,
        "device_name": device_name(identity)[:300], "backend": checked.backend, "precision": checked.precision,
        "batch_size": checked.batch_size, "num_tokens": checked.num_tokens, "space_name": checked.space.name,
        "space_fingerprint": checked.protocol.space_fingerprint, "rows": rows,
        "calibrated": checked.calibration is not None, "created_at": checked.created_at, "uploaded_at": now,
        "source": source, "meta": meta,
    }


def register_table(ctx: ServiceContext, received: ReceivedBlob, *, source: str,
                   expect: Callable[[TableMetaSchema], None] | None = None) -> tuple[dict[str, Any], bool]:
    """Inspect an uploaded table in a child process, check its metadata (and ``expect`` of it), store and
    register it; ``(view, created)``. A refusal stores nothing."""
    try:
        info = inspect_upload("lut", received.path, what="table upload")
        checked = check_table_meta(info.get("meta"))
        if expect is not None:
            expect(checked)
        return _record(ctx, received, info, checked, source=source)
    finally:
        ctx.blobs.discard(received)  # accepted: already moved into place; refused: removed


def _record(ctx: ServiceContext, received: ReceivedBlob, info: dict[str, Any], checked: TableMetaSchema, *,
            source: str) -> tuple[dict[str, Any], bool]:
    """Move a checked table into place and register it (blob and table rows in one transaction; a file
    placed for a transaction that failed is removed again); ``(view, created)``."""
    rows = int(info["rows"])
    if not 0 < rows <= DB_INT_MAX:
        raise unprocessable(f"the table has {rows} rows")
    placed = not ctx.blobs.path(received.sha256).exists()
    ctx.blobs.accept(received)
    now = ctx.now()
    try:
        created = ctx.store.add_lut(lut_row(received.sha256, info["meta"], checked, rows, source=source, now=now),
                                    size_bytes=received.size_bytes, info={"rows": rows}, now=now)
    except BaseException:
        if placed and ctx.store.blob(received.sha256) is None:
            ctx.blobs.path(received.sha256).unlink(missing_ok=True)
        raise
    return lut_view(ctx.store.lut(received.sha256)), created


def stored_lut(ctx: ServiceContext, sha256: str) -> Any:
    row = ctx.store.lut(check_sha256(sha256))
    if row is None:
        raise not_found(f"no table {sha256}")
    return row


@router.get("/luts", summary="Tables, newest first, filtered by device, backend, precision, batch, space.")
def list_luts(request: Request, _: Reader, device: Filter = None, backend: Filter = None, precision: Filter = None,
              batch: int | None = Query(None, ge=1, le=DB_INT_MAX), space: Filter = None,
              limit: int = Query(50, ge=1, le=500)) -> list[dict[str, Any]]:
    rows = context(request).store.list_luts(device=device, backend=backend, precision=precision, batch_size=batch,
                                            space=space, limit=limit)
    return [lut_view(r) for r in rows]


@router.get("/luts/{sha256}", summary="Download a table (Parquet; immutable, ETag is its sha256).",
            response_class=FileResponse)
def get_lut(sha256: str, request: Request, _: Reader) -> Response:
    ctx = context(request)
    stored_lut(ctx, sha256)
    etag = f'"{sha256}"'
    headers = {"ETag": etag, "Cache-Control": IMMUTABLE}
    if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers=headers)
    return FileResponse(ctx.blobs.path(sha256), media_type=PARQUET_MEDIA_TYPE, headers=headers,
                        filename=f"lut-{sha256[:12]}.parquet")


@router.get("/luts/{sha256}/meta", summary="A table's summary and full metadata.")
def get_lut_meta(sha256: str, request: Request, _: Reader) -> dict[str, Any]:
    row = stored_lut(context(request), sha256)
    return {**lut_view(row), "meta": row["meta"]}


@router.post("/luts", status_code=201, summary="Upload a table made elsewhere (Parquet body).")
async def upload_lut(request: Request, _: Submitter, response: Response) -> dict[str, Any]:
    ctx = context(request)
    received = await ctx.blobs.receive(request.stream(), limit_bytes=ctx.settings.max_table_bytes,
                                       declared_bytes=content_length(request), what="table upload",
                                       suffix=".parquet")
    view, created = await run_in_threadpool(register_table, ctx, received, source="upload")
    response.status_code = 201 if created else 200
    response.headers["Location"] = view["url"]
    return view


@router.post("/luts/merge", status_code=201, summary="Merge stored shards of one space measured on one device.")
def merge_luts(body: MergeRequest, request: Request, _: Submitter, response: Response) -> dict[str, Any]:
    from nvit.lut.table import LatencyTable, merge_tables

    ctx = context(request)
    for sha in body.luts:
        stored_lut(ctx, sha)
    path = ctx.blobs.temp_path(".parquet")
    try:
        try:
            merged = merge_tables([LatencyTable.load(ctx.blobs.path(sha)) for sha in body.luts])
            problems = merged.problems(coverage=False)
            if problems:
                raise unprocessable(f"the merged table would be invalid: {problems[0]}")
            merged.save(path)
        except (NvitError, KeyError, TypeError, ValueError) as exc:  # tables stored before the strict schema
            raise unprocessable(str(exc) if isinstance(exc, NvitError) else f"cannot merge: {exc!r}") from None
        received = ReceivedBlob(path, file_sha256(path), path.stat().st_size)
        info = {"meta": merged.meta.to_dict(), "rows": len(merged)}
        checked = check_table_meta(info["meta"])
        view, created = _record(ctx, received, info, checked, source="merge")
    finally:
        path.unlink(missing_ok=True)
    response.status_code = 201 if created else 200
    response.headers["Location"] = view["url"]
    return view
