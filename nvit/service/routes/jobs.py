"""Jobs: submit (idempotent), list, follow, cancel; and the agents' side: lease by long-poll, heartbeat,
journal upload, table upload, complete, fail, release."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Path, Query, Request, Response
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from nvit.service.agent_reports import check_job_table, check_measure_result
from nvit.service.errors import unprocessable
from nvit.service.jobspec import JobRequest, ProfileRequest, measure_job, profile_job
from nvit.service.queue import JobKind, JobState
from nvit.service.routes import (
    AgentCaller,
    AgentPath,
    Reader,
    Submitter,
    content_length,
    context,
    iso,
    job_view,
    owned_agent,
)
from nvit.service.routes.luts import register_table
from nvit.service.schemas import INT64_MAX, AgentId, JsonObject, Strict, json_problem

router = APIRouter(tags=["jobs"])
_MAX_JOURNAL_LINES = 10_000
_RECHECK_S = 1.0  # a waiting lease request looks at the queue at least this often (other servers, expiry)
_TOUCH_EVERY_S = 1.0  # an agent's "last seen" is written at most this often by its lease requests


_MAX_JOURNAL_LINE = 100_000
AgentQuery = Annotated[str, Query(pattern=r"^[0-9a-f]{1,32}$", description="The agent holding the lease.")]
JobIdPath = Annotated[int, Path(ge=1, le=INT64_MAX, description="A job id (signed 64 bits).")]


class _AgentCall(Strict):
    agent_id: AgentId


class Heartbeat(_AgentCall):
    progress: JsonObject | None = None
    running: bool = False


class JournalUpload(_AgentCall):
    start: int = Field(ge=0, le=INT64_MAX)
    lines: list[Annotated[str, Field(max_length=_MAX_JOURNAL_LINE)]] = Field(max_length=_MAX_JOURNAL_LINES)
    progress: JsonObject | None = None


class Completion(_AgentCall):
    result: JsonObject


class Failure(_AgentCall):
    error: str = Field(min_length=1, max_length=4000)


# ---- clients ---------------------------------------------------------------------------------------------
@router.post("/jobs", status_code=201, summary="Submit a profile or measure job (Idempotency-Key honoured).")
def submit_job(request: Request, principal: Submitter, response: Response, body: Annotated[JobRequest, Body()],
               idempotency_key: str | None = Header(None, alias="Idempotency-Key", max_length=200)) -> dict[str, Any]:
    ctx = context(request)
    attempts = ctx.settings.max_attempts
    new = (profile_job(body, max_attempts=attempts) if isinstance(body, ProfileRequest)
           else measure_job(body, ctx.store, max_attempts=attempts))
    row, created = ctx.queue.submit(new, now=ctx.now(), idempotency_key=idempotency_key,
                                    submitted_by=principal.token_id)
    if created:
        ctx.notifier.notify()
    response.status_code = 201 if created else 200
    response.headers["Location"] = f"/v1/jobs/{row['id']}"
    return job_view(row)


@router.get("/jobs", summary="Jobs, newest first.")
def list_jobs(request: Request, _: Reader, state: JobState | None = None, kind: JobKind | None = None,
              limit: int = Query(50, ge=1, le=500)) -> list[dict[str, Any]]:
    rows = context(request).queue.list(state=state.value if state else None, kind=kind.value if kind else None,
                                       limit=limit)
    return [job_view(r) for r in rows]


@router.get("/jobs/{job_id}", summary="A job: state, progress, result or error.")
def get_job(job_id: JobIdPath, request: Request, _: Reader) -> dict[str, Any]:
    return job_view(context(request).queue.get(job_id))


@router.delete("/jobs/{job_id}", summary="Cancel a job that has not finished (its submitter, or an admin).")
def cancel_job(job_id: JobIdPath, request: Request, principal: Submitter) -> dict[str, Any]:
    ctx = context(request)
    return job_view(ctx.queue.cancel(job_id, now=ctx.now(), by=principal.token_id, admin=principal.is_admin))


@router.get("/jobs/{job_id}/journal", summary="A profile job's journal: the configurations measured so far.")
def get_journal(job_id: JobIdPath, request: Request, _: Reader) -> dict[str, Any]:
    return {"lines": context(request).queue.journal(job_id)}


# ---- agents ----------------------------------------------------------------------------------------------
@router.post("/agents/{agent_id}/lease", summary="Long-poll for a job this agent can run (204: none came).",
             responses={204: {"description": "No job came while the request waited."}})
async def lease_job(agent_id: AgentPath, request: Request, principal: AgentCaller,
                    wait_s: float = Query(20.0, ge=0.0, le=120.0, allow_inf_nan=False)) -> Any:
    ctx = context(request)
    agent = await run_in_threadpool(owned_agent, ctx, agent_id, principal)
    if ctx.now() - agent["last_seen"] > _TOUCH_EVERY_S:
        await run_in_threadpool(ctx.store.touch_agent, agent_id, ctx.now())
    deadline = time.monotonic() + min(wait_s, ctx.settings.long_poll_s)
    while not await request.is_disconnected():
        row = await run_in_threadpool(ctx.queue.lease, agent, now=ctx.now())
        if row is not None:
            s = ctx.settings
            return {"job": job_view(row), "lease": {"expires_at": iso(row["lease_expires_at"]), "lease_s": s.lease_s,
                                                    "heartbeat_s": s.lease_s / 3}}
        remaining = deadline - time.monotonic()
        if remaining <= 0 or ctx.stopping():
            break
        await ctx.notifier.wait(min(remaining, _RECHECK_S))
    return Response(status_code=204)


@router.post("/jobs/{job_id}/heartbeat", summary="Extend the lease; report progress.")
def heartbeat(job_id: JobIdPath, body: Heartbeat, request: Request, principal: AgentCaller) -> dict[str, Any]:
    ctx = context(request)
    owned_agent(ctx, body.agent_id, principal)
    now = ctx.now()
    row = ctx.queue.heartbeat(job_id, body.agent_id, now=now, progress=body.progress, running=body.running)
    ctx.store.touch_agent(body.agent_id, now)
    return {"state": row["state"], "lease_expires_at": iso(row["lease_expires_at"])}


@router.post("/jobs/{job_id}/journal", summary="Append measured rows of a profile job (extends the lease).")
def append_journal(job_id: JobIdPath, body: JournalUpload, request: Request, principal: AgentCaller
                   ) -> dict[str, Any]:
    ctx = context(request)
    owned_agent(ctx, body.agent_id, principal)
    for i, line in enumerate(body.lines):
        try:
            doc = json.loads(line)
            if not isinstance(doc, dict) or json_problem(doc) is not None:
                raise ValueError
        except ValueError:
            raise unprocessable(f"journal line {body.start + i} is not a finite, bounded JSON object") from None
    count = ctx.queue.append_journal(job_id, body.agent_id, body.start, body.lines, now=ctx.now(),
                                     progress=body.progress)
    return {"lines": count}


@router.post("/jobs/{job_id}/table", status_code=201, summary="Upload the table a profile job produced.")
async def upload_job_table(job_id: JobIdPath, request: Request, principal: AgentCaller,
                           agent_id: AgentQuery) -> dict[str, Any]:
    """The table must be what the job asked for, measured on the leasing agent's device."""
    ctx = context(request)
    agent = await run_in_threadpool(owned_agent, ctx, agent_id, principal)
    row = await run_in_threadpool(lambda: ctx.queue.heartbeat(job_id, agent_id, now=ctx.now()))
    if row["kind"] != JobKind.PROFILE.value:
        raise unprocessable(f"job {job_id} is a {row['kind']} job; only profile jobs produce tables")
    received = await ctx.blobs.receive(request.stream(), limit_bytes=ctx.settings.max_table_bytes,
                                       declared_bytes=content_length(request), what="table upload",
                                       suffix=".parquet")
    view, _created = await run_in_threadpool(register_table, ctx, received, source=f"job {job_id}",
                                             expect=lambda meta: check_job_table(meta, row, agent))
    await run_in_threadpool(lambda: ctx.queue.attach_table(job_id, agent_id, view["sha256"], now=ctx.now()))
    return view


@router.post("/jobs/{job_id}/complete", summary="Finish a job with its result.")
def complete_job(job_id: JobIdPath, body: Completion, request: Request, principal: AgentCaller) -> dict[str, Any]:
    ctx = context(request)
    agent = owned_agent(ctx, body.agent_id, principal)
    row = ctx.queue.get(job_id)
    sha = None
    if row["kind"] == JobKind.PROFILE.value:
        sha = body.result.get("lut")
        if not isinstance(sha, str):
            raise unprocessable(f"a profile job's result names its uploaded table (lut), got {sha!r}")
    else:
        check_measure_result(body.result, row, agent)
    return job_view(ctx.queue.complete(job_id, body.agent_id, body.result, now=ctx.now(), table_sha256=sha))


@router.post("/jobs/{job_id}/fail", summary="Finish a job with an error.")
def fail_job(job_id: JobIdPath, body: Failure, request: Request, principal: AgentCaller) -> dict[str, Any]:
    ctx = context(request)
    owned_agent(ctx, body.agent_id, principal)
    return job_view(ctx.queue.fail(job_id, body.agent_id, body.error, now=ctx.now()))


@router.post("/jobs/{job_id}/release", summary="Hand a job back to the queue (the agent is stopping).")
def release_job(job_id: JobIdPath, body: _AgentCall, request: Request, principal: AgentCaller) -> dict[str, Any]:
    ctx = context(request)
    owned_agent(ctx, body.agent_id, principal)
    row = ctx.queue.release(job_id, body.agent_id, now=ctx.now())
    ctx.notifier.notify()
    return job_view(row)
