"""Whether a table an agent uploads for a profile job is what the job asked for, measured where it says.

A latency table is a trust artifact: pruning decisions are made from it. So the table an agent uploads for a
job must carry the device identity of the agent that leased the job (the fingerprint it registered with,
thread count aside) and the job's backend, precision, batch size, token count and space fingerprint; and the
job completes only with that table (:meth:`nvit.service.queue.JobQueue.complete`).
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


def _name(identity: Mapping[str, Any]) -> str:
    return str(identity.get("gpu") or identity.get("cpu") or identity.get("kind"))
