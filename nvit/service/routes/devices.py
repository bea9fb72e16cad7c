"""Agents register with their device fingerprint; devices are listed with their agents and state."""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import Field

from nvit.errors import NvitError
from nvit.service.errors import unprocessable
from nvit.service.routes import AgentCaller, Reader, context, device_key, device_name, iso
from nvit.service.schemas import JsonObject, Strict

router = APIRouter(tags=["devices"])


def check_identity(identity: dict[str, Any]) -> None:
    """A fingerprint's identity must be what a table's metadata may hold (the same strict schema)."""
    from pydantic import ValidationError

    from nvit.service.schemas import DeviceIdentity, first_error

    try:
        DeviceIdentity.model_validate(identity)
    except ValidationError as exc:
        raise NvitError(f"malformed device fingerprint: {first_error(exc)}") from None


class AgentRegistration(Strict):
    name: str = Field(min_length=1, max_length=200)
    hostname: str = Field(min_length=1, max_length=200)
    fingerprint: JsonObject
    backends: list[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")]] = Field(min_length=1, max_length=16)


@router.post("/agents", status_code=201, summary="Register an agent on a device (agent scope); the agent is "
             "bound to the token that registers it.")
def register_agent(body: AgentRegistration, request: Request, principal: AgentCaller) -> dict[str, Any]:
    from nvit.profiler.device import DeviceFingerprint

    ctx = context(request)
    try:
        fp = DeviceFingerprint.from_dict(body.fingerprint)
        check_identity(fp.identity())
    except NvitError as exc:
        raise unprocessable(str(exc)) from None
    identity = fp.identity()
    agent_id = secrets.token_hex(8)
    now = ctx.now()
    ctx.store.add_agent({
        "id": agent_id, "name": body.name, "hostname": body.hostname, "device_key": device_key(identity),
        "device_kind": fp.kind.value, "device_name": device_name(identity), "fingerprint": fp.to_dict(),
        "backends": sorted(set(body.backends)), "registered_by": principal.token_id, "registered_at": now,
        "last_seen": now,
    })
    s = ctx.settings
    return {"id": agent_id, "device_key": device_key(identity), "lease_s": s.lease_s,
            "heartbeat_s": s.lease_s / 3, "long_poll_s": s.long_poll_s}


@router.get("/devices", summary="Devices with their agents: idle, busy or offline, and when last seen.")
def list_devices(request: Request, _: Reader) -> list[dict[str, Any]]:
    ctx = context(request)
    now = ctx.now()
    offline_after = ctx.settings.agent_offline_s + ctx.settings.long_poll_s
    busy = ctx.queue.active_by_agent()
    devices: dict[str, dict[str, Any]] = {}
    for a in ctx.store.list_agents(seen_after=now - 24 * 3600):
        status = ("busy" if a["id"] in busy else "idle") if now - a["last_seen"] <= offline_after else "offline"
        dev = devices.setdefault(a["device_key"], {"key": a["device_key"], "kind": a["device_kind"],
                                                  "name": a["device_name"], "agents": [], "last_seen_unix_s": 0.0})
        dev["agents"].append({"id": a["id"], "name": a["name"], "hostname": a["hostname"], "status": status,
                              "job": busy.get(a["id"]), "backends": a["backends"], "last_seen": iso(a["last_seen"])})
        dev["last_seen_unix_s"] = max(dev["last_seen_unix_s"], a["last_seen"])
    out = []
    for dev in devices.values():
        states = {a["status"] for a in dev["agents"]}
        dev["status"] = "busy" if "busy" in states else "idle" if "idle" in states else "offline"
        dev["last_seen"] = iso(dev.pop("last_seen_unix_s"))
        out.append(dev)
    return out
