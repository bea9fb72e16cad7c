"""Whether what an agent reports for a job is what the job asked for, measured where it says.

A latency table is a trust artifact: pruning decisions are made from it. So the table an agent uploads for a
job must carry the device identity of the agent that leased the job (the fingerprint it registered with,
thread count aside) and the job's backend, precision, batch size, token count and space fingerprint; and the
job completes only with that table (:meth:`nvit.service.queue.JobQueue.complete`). A measure job's result
times each of the job's models once, on the leasing agent's device, and every figure it reports is typed,
finite, positive where a latency and within bounds (:func:`timing_problem`).
"""

from __future__ import annotations

import math
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
    for m in models:
        problem = timing_problem(m.get("stats"), m.get("predicted_ms"))
        if problem:
            raise unprocessable(f"a measure job's result for {m['name']}: {problem}")
    device = result.get("device")
    try:
        identity = DeviceFingerprint.from_dict(device).identity() if isinstance(device, dict) else None
    except NvitError:
        identity = None
    if identity is None or device_key(identity) != agent["device_key"]:
        found = _name(identity) if identity else "not given"
        raise unprocessable(f"the result's device is {found}, job {job['id']} was leased by agent {agent['id']} on "
                            f"{agent['device_name']}")


#: Largest latency a result may report: a thousand seconds per inference is no measurement of a ViT.
MAX_RESULT_MS = 1e6
_MS_FIELDS = ("latency_ms_median", "latency_ms_mean", "latency_ms_p10", "latency_ms_p90", "latency_ms_p99")
#: field -> (lowest, highest) for the other figures of a timing (latency fields: (0, MAX_RESULT_MS], exclusive 0)
_BOUNDED = {"latency_ms_std": (0.0, MAX_RESULT_MS), "cov": (0.0, 100.0), "ci95_halfwidth_ms": (0.0, MAX_RESULT_MS),
            "repeat_rel_spread": (0.0, 1e3), "repeat_settle_gap": (0.0, 1e3), "contention": (0.0, 1e3)}
_COUNTS = {"n_samples": (1, 10_000_000), "n_repeats": (1, 10_000), "runs_hit": (0, 10_000)}
_STOP_REASONS = ("", "converged", "time_cap", "max_samples")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def timing_problem(stats: Any, predicted_ms: Any = None) -> str | None:
    """What is wrong with one model's timing in an agent's result (``None``: nothing): every figure of a
    :class:`~nvit.profiler.harness.TimingStats` typed, finite, within its bounds and consistent (p10 ≤ median
    ≤ p90 ≤ p99), no unknown field; ``predicted_ms`` absent or a positive finite latency."""
    if not isinstance(stats, Mapping):
        return "its stats are not an object"
    from nvit.profiler.harness import TimingStats

    unknown = sorted(set(stats) - set(TimingStats.__dataclass_fields__))
    if unknown:
        return f"unknown timing field(s) {', '.join(map(str, unknown[:3]))}"
    for key in (*_MS_FIELDS, "latency_ms_std", "cov", "ci95_halfwidth_ms", "n_samples"):
        if key not in stats:
            return f"{key} is missing"
    for key in _MS_FIELDS:
        v = stats[key]
        if not _number(v) or not 0 < v <= MAX_RESULT_MS:
            return f"{key} must be a finite latency in (0, {MAX_RESULT_MS:g}] ms, got {v!r}"
    for key, (low, high) in _BOUNDED.items():
        if key in stats and (not _number(stats[key]) or not low <= stats[key] <= high):
            return f"{key} must be a finite number in [{low:g}, {high:g}], got {stats[key]!r}"
    for key, (low, high) in _COUNTS.items():
        v = stats.get(key, low)
        if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
            return f"{key} must be an integer in [{low}, {high}], got {v!r}"
    if stats.get("runs_hit", 0) > stats.get("n_repeats", 1):
        return "runs_hit exceeds n_repeats"
    if stats.get("stop_reason", "") not in _STOP_REASONS:
        return f"stop_reason must be one of {', '.join(repr(r) for r in _STOP_REASONS)}"
    if not isinstance(stats.get("settled", True), bool):
        return "settled must be true or false"
    p10, median, p90, p99 = (stats[k] for k in ("latency_ms_p10", "latency_ms_median", "latency_ms_p90",
                                                 "latency_ms_p99"))
    if not (p10 <= median * (1 + 1e-9) and median <= p90 * (1 + 1e-9) and p90 <= p99 * (1 + 1e-9)):
        return "its quantiles are out of order (p10 <= median <= p90 <= p99)"
    if predicted_ms is not None and (not _number(predicted_ms) or not 0 < predicted_ms <= MAX_RESULT_MS):
        return f"predicted_ms must be a finite latency in (0, {MAX_RESULT_MS:g}] ms, got {predicted_ms!r}"
    return None


def _name(identity: Mapping[str, Any]) -> str:
    return str(identity.get("gpu") or identity.get("cpu") or identity.get("kind"))
