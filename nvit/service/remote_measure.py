"""Measuring on the service's device from another machine: the client side of ``measure`` jobs.

``nvit compare --remote`` sends each model's architecture (weights do not change the latency of these
backends, and the table itself was measured on randomly initialised blocks), the agent times them with the
table's backend and settings exactly as a local ``nvit compare`` would, and the report is built here with
the same :func:`~nvit.validation.compare.compare_variants` from the same table. ``nvit export --measure --remote``
uploads the exported ONNX file itself and has it timed with the backend asked for.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from nvit.service.client import ServiceClient, file_sha256, upload_lut

JobCallback = Callable[[dict[str, Any]], None]


def run_job(client: ServiceClient, body: dict[str, Any], *, on_update: JobCallback | None = None,
            cancel_on_interrupt: bool = True) -> dict[str, Any]:
    """Submit a job and wait for it; Ctrl-C cancels it (unless ``cancel_on_interrupt`` is False)."""
    job = client.submit_job(body)
    if on_update is not None:
        on_update(job)
    try:
        return client.wait_job(job["id"], on_update=on_update)
    except KeyboardInterrupt:
        if cancel_on_interrupt:
            client.cancel_job(job["id"])
        raise


def table_measure_job(sha256: str, archs: dict[str, Any], *, passes: int, same_device: bool = True
                      ) -> dict[str, Any]:
    """A ``measure`` job timing architectures (name → :class:`~nvit.arch.ArchSpec`) the way a stored table was
    profiled, with predictions from it."""
    return {"kind": "measure", "lut": sha256, "same_device": same_device, "passes": passes,
            "models": [{"name": name, "arch": spec.to_dict()} for name, spec in archs.items()]}


def stats_of(result: dict[str, Any]) -> dict[str, Any]:
    """Model name → :class:`~nvit.profiler.harness.TimingStats` from a measure job's result."""
    from nvit.profiler.harness import TimingStats

    return {m["name"]: TimingStats(**m["stats"]) for m in result["models"]}


def compare_remote(client: ServiceClient, table: Any, table_path: str | os.PathLike[str], base: Any,
                   variants: Sequence[Any], *, passes: int = 2, same_device: bool = True,
                   on_update: JobCallback | None = None) -> Any:
    """A :class:`~nvit.validation.compare.CompareReport` with every model measured by a service agent on the
    table's device, with the table's backend and settings, and predicted with ``table`` here."""
    from nvit.lut.predictor import LatencyPredictor
    from nvit.validation.compare import check_distinct_names, compare_variants, raise_tokens

    models = (base, *variants)
    check_distinct_names([v.name for v in models])
    for v in models:
        if v.spec.num_tokens != table.meta.num_tokens:
            raise_tokens(v, table.meta.num_tokens)
    sha = file_sha256(table_path)
    if client.request("GET", f"/v1/luts/{sha}/meta", ok=(404,)).status_code == 404:
        upload_lut(client, table_path)
    body = table_measure_job(sha, {v.name: v.spec for v in models}, passes=passes, same_device=same_device)
    job = run_job(client, body, on_update=on_update)
    result = job["result"]
    stats = stats_of(result)
    context = {**result["context"], "remote": {"service": client.base_url, "job": job["id"],
                                               "agent": result.get("agent"), "device": result.get("device")}}
    return compare_variants(base, variants, LatencyPredictor(table), lambda v: stats[v.name], context=context)


def measure_onnx_remote(client: ServiceClient, onnx_path: str | os.PathLike[str], *, name: str,
                        arch: dict[str, Any] | None, backend: str, device: str, precision: str, batch_size: int,
                        backend_options: dict[str, Any] | None = None, passes: int = 1,
                        on_update: JobCallback | None = None) -> tuple[Any, dict[str, Any]]:
    """Upload an ONNX file and time it on the service's device; ``(TimingStats, the job)``."""
    uploaded = client.upload("/v1/models", onnx_path)
    model: dict[str, Any] = {"name": name, "onnx": uploaded["sha256"]}
    if arch is not None:
        model["arch"] = arch
    body = {"kind": "measure", "models": [model], "backend": backend, "device": device, "precision": precision,
            "batch_size": batch_size, "backend_options": backend_options or {}, "passes": passes}
    job = run_job(client, body, on_update=on_update)
    return stats_of(job["result"])[name], job


def agent_for_table(client: ServiceClient, sha256: str) -> dict[str, Any] | None:
    """An agent registered on the stored table's device, not offline, that runs its backend (``None``: none)."""
    view = client.expect(client.get_json(f"/v1/luts/{sha256}/meta"), {"device": dict, "backend": str}, "a table")
    key = view["device"].get("key")
    devices = client.get_json("/v1/devices")
    if not isinstance(devices, list):
        return None
    for device in devices:
        if not isinstance(device, dict) or device.get("key") != key:
            continue
        for agent in device.get("agents") or []:
            if agent.get("status") != "offline" and view["backend"] in (agent.get("backends") or []):
                return {**agent, "device": device.get("name")}
    return None


class RemoteMeasurer:
    """Times pruned models on the table's device through a service agent (a ``measure`` job per variant, the
    table's backend and settings, two passes): what ``--measure-targets`` uses when the table came from a
    service and its device is elsewhere. The agent's measurement is not drift-corrected (its jobs time models,
    not the table's rows): the drift ratio recorded is 1."""

    def __init__(self, base_url: str, sha256: str, agent: dict[str, Any], *, passes: int = 2,
                 token: str | None = None) -> None:
        self.base_url, self.sha256, self.agent, self.passes, self.token = base_url, sha256, agent, passes, token

    def __call__(self, spec: Any, model: Any) -> Any:
        import time

        from nvit.pruning.measured import TargetMeasurement
        from nvit.validation.compare import row_uncertainty

        started = time.perf_counter()
        body = table_measure_job(self.sha256, {"pruned": spec}, passes=self.passes)
        with ServiceClient(self.base_url, token=self.token) as client:
            job = run_job(client, body)
        stats = stats_of(client.expect(job.get("result"), {"models": list}, "a measure job's result"))["pruned"]
        measured = stats.latency_ms_median
        return TargetMeasurement(measured, measured, row_uncertainty(stats), 1.0, time.perf_counter() - started)


def remote_measurer(base_url: str, sha256: str) -> tuple[RemoteMeasurer | None, str]:
    """A measurer on the service's agent of the stored table's device and the line that says so, or ``None``
    and why there is none (for :func:`nvit.validation.targets.choose_measurer`)."""
    from nvit.service.errors import ServiceError

    try:
        with ServiceClient(base_url) as client:
            agent = agent_for_table(client, sha256)
    except ServiceError as exc:
        return None, f"the service cannot say which agents it has ({exc})"
    if agent is None:
        return None, f"no agent of the table's device that runs its backend is registered on {base_url}"
    return RemoteMeasurer(base_url, sha256, agent), (
        f"targets are met at measured latency on {agent.get('device')} through agent {agent.get('name')} of "
        f"{base_url} (a measure job per variant, not drift-corrected)")
