"""HTTP routes, one module per resource. Routes are thin: check the caller, validate, call, shape the answer.

Shared here: reaching the service context, the scope dependency, device keys and the JSON views of rows.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import Depends, Path, Request

from nvit.service.auth import Principal, Scope
from nvit.service.config import ServiceContext
from nvit.service.errors import forbidden, not_found


def context(request: Request) -> ServiceContext:
    return request.app.state.ctx


def need(scope: Scope) -> Any:
    """A dependency that admits callers holding ``scope`` (every call, on a server without tokens)."""

    def check(request: Request) -> Principal:
        server = request.scope.get("server")
        return context(request).auth.check(request.headers.get("authorization"), scope,
                                           local_host=server[0] if server else None)

    return Depends(check)


Reader = Annotated[Principal, need(Scope.READ)]
Submitter = Annotated[Principal, need(Scope.SUBMIT)]
AgentCaller = Annotated[Principal, need(Scope.AGENT)]
AgentPath = Annotated[str, Path(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_-]+$", description="An agent id.")]


def owned_agent(ctx: ServiceContext, agent_id: str, principal: Principal) -> Mapping[str, Any]:
    """The agent, which the caller's token registered (or the caller is an admin); 404 or 403 otherwise."""
    agent = ctx.store.agent(agent_id)
    if agent is None:
        raise not_found(f"no agent {agent_id}; register again")
    if not principal.owns(agent["registered_by"]):
        raise forbidden(f"agent {agent_id} was registered with another token; an agent acts only with its own")
    return agent


def content_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    return int(value) if value and value.isdigit() else None


def iso(t: float | None) -> str | None:
    return None if t is None else dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="milliseconds")


def device_key(identity: Mapping[str, Any]) -> str:
    """One key per device model: the fingerprint identity without the thread count (a table measured with
    one thread and an agent that may use any number are on the same device)."""
    doc = {k: v for k, v in identity.items() if k != "threads_used"}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def device_name(identity: Mapping[str, Any]) -> str:
    return str(identity.get("gpu") or identity.get("cpu") or identity.get("kind") or "unknown")


def lut_view(row: Mapping[str, Any]) -> dict[str, Any]:
    sha = row["sha256"]
    return {
        "sha256": sha, "url": f"/v1/luts/{sha}",
        "device": {"key": row["device_key"], "kind": row["device_kind"], "name": row["device_name"]},
        "backend": row["backend"], "precision": row["precision"], "batch_size": row["batch_size"],
        "num_tokens": row["num_tokens"], "space": {"name": row["space_name"], "fingerprint": row["space_fingerprint"]},
        "rows": row["rows"], "calibrated": row["calibrated"], "created_at": row["created_at"],
        "uploaded_at": iso(row["uploaded_at"]), "source": row["source"],
    }


def job_view(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"], "url": f"/v1/jobs/{row['id']}", "kind": row["kind"], "state": row["state"],
        "spec": row["spec"], "device": {"kind": row["device_kind"], "name": row["device_name"]},
        "backend": row["backend"], "created_at": iso(row["created_at"]), "updated_at": iso(row["updated_at"]),
        "attempts": row["attempts"], "max_attempts": row["max_attempts"], "agent_id": row["agent_id"],
        "lease_expires_at": iso(row["lease_expires_at"]), "progress": row["progress"], "result": row["result"],
        "error": row["error"],
    }
