"""Whether what an agent reports for a job is what the job asked for, measured where it says.

A latency table is a trust artifact: pruning decisions are made from it. So the table an agent uploads for a
job must carry the device identity of the agent that leased the job (the fingerprint it registered with,
thread count aside) and the job's backend, precision, batch size, token count and space fingerprint; and the
job completes only with that table (:meth:`nvit.service.queue.JobQueue.complete`). A measure job's result
times each of the job's models once, on the leasing agent's device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nvit.service.errors import unprocessable
from nvit.service.routes import device_key
from nvit.service.schemas import TableMetaSchema


def check_job_table(meta: TableMetaSchema, job: Mapping[str, Any], agent: Mapping[str, Any]) -> None:
    """Refuse (422) a table that is not what profile ``job`` asked for, measured on ``agent``'s device."""
    from nvit.profiler.space import SearchSpace

    spec = job["spec"]
    space = SearchSpace.from_dict(spec["space"])
    identity = meta.device_identity.model_dump(exclude_unset=True)  # the keys the table holds
    expected = [
        ("device", device_key(identity), agent["device_key"]),
        ("device kind", meta.device_kind, agent["device_kind"]),
        ("backend", meta.backend, spec["backend"]),
        ("precision", meta.precision, space.precision.value),
        ("batch size", meta.batch_size, space.batch_size),
        ("token count", meta.num_tokens, space.num_tokens),
        ("space", meta.protocol.space_fingerprint, spec["space_fingerprint"]),
    ]
    for what, found, wanted in expected:
        if found != wanted:
            if what == "device":
                found, wanted = _name(identity), agent["device_name"]
            raise unprocessable(f"the table's {what} is {found}, job {job['id']} needs {wanted} (the device of "
                                f"agent {agent['id']} that leased it, and the job's settings)")


def check_measure_result(result: Mapping[str, Any], job: Mapping[str, Any], agent: Mapping[str, Any]) -> None:
    """Refuse (422) a measure job's result that does not time each of the job's models once, or that was
    measured on another device than the leasing agent's."""
    from nvit.errors import NvitError
    from nvit.profiler.device import DeviceFingerprint

    models = result.get("models") if isinstance(result.get("models"), list) else []
    wanted = sorted(m["name"] for m in job["spec"]["models"])
    names = sorted(str(m.get("name")) if isinstance(m, dict) else "" for m in models)
    if names != wanted:
        raise unprocessable(f"a measure job's result lists its models, one each: {', '.join(wanted)}")
    device = result.get("device")
    try:
        identity = DeviceFingerprint.from_dict(device).identity() if isinstance(device, dict) else None
    except NvitError:
        identity = None
    if identity is None or device_key(identity) != agent["device_key"]:
        found = _name(identity) if identity else "not given"
        raise unprocessable(f"the result's device is {found}, job {job['id']} was leased by agent {agent['id']} on "
                            f"{agent['device_name']}")


def _name(identity: Mapping[str, Any]) -> str:
    return str(identity.get("gpu") or identity.get("cpu") or identity.get("kind"))
