"""A latency table's identity and provenance (:class:`LutMeta`) and the check that a table suits a command.

The metadata is stored as JSON under the Parquet schema metadata key ``nvit.lut``: backend, device,
precision, batch, tokens (the identity), then the device fingerprint, package versions, protocol, sentinel
drift and calibration. A table from other conditions than a command needs is an error
(:func:`check_compatible`), never a silent mismatch.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nvit import __version__
from nvit.errors import LutError
from nvit.lut.records import Calibration, SelfCheck
from nvit.vocab import DeviceKind, Precision, TimingMode

LUT_SCHEMA_VERSION = 3  # 2: self_check added; 3: conditions (the machine's state while profiling, judged)
READABLE_SCHEMA_VERSIONS = (1, 2, 3)
LUT_FILE_KIND = "nvit.lut"
META_KEY = b"nvit.lut"


@dataclass(frozen=True)
class LutMeta:
    """Everything that identifies a table and how it was made. ``device`` is a fingerprint dict
    (:class:`~nvit.profiler.device.DeviceFingerprint.to_dict`), ``device_identity`` the part of it that
    must match between tables."""

    backend: str
    device_kind: DeviceKind
    precision: Precision
    batch_size: int
    num_tokens: int
    base_arch: dict[str, Any]
    device_identity: dict[str, Any]
    device: dict[str, Any] = field(default_factory=dict)
    space: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    protocol: dict[str, Any] = field(default_factory=dict)
    sentinel: list[dict[str, Any]] = field(default_factory=list)
    calibration: Calibration | None = None  # from a sum of parts to whole models (nvit.lut.calibration)
    self_check: SelfCheck | None = None  # held-out whole models, predicted vs measured (nvit.profiler.selfcheck)
    conditions: dict[str, Any] | None = None  # verdict and figures (nvit.profiler.conditions.Conditions)
    profile_seconds_total: float = 0.0
    created_at: str = ""
    nvit_version: str = __version__
    schema_version: int = LUT_SCHEMA_VERSION
    kind: str = LUT_FILE_KIND

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "device_kind", DeviceKind(self.device_kind))
            object.__setattr__(self, "precision", Precision(self.precision))
        except ValueError as exc:
            raise LutError(f"LUT metadata: {exc}") from None
        for key in ("batch_size", "num_tokens"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LutError(f"LUT metadata: {key} must be a positive integer, got {value!r}")
        if not self.created_at:
            object.__setattr__(self, "created_at", utc_now())
        if self.calibration is not None and not isinstance(self.calibration, Calibration):
            object.__setattr__(self, "calibration", Calibration.from_dict(self.calibration))
        if self.self_check is not None and not isinstance(self.self_check, SelfCheck):
            object.__setattr__(self, "self_check", SelfCheck.from_dict(self.self_check))

    def identity(self) -> dict[str, Any]:
        """What two tables must share to be merged, or a table and a command to be used together."""
        return {"backend": self.backend, "device_kind": self.device_kind.value, "precision": self.precision.value,
                "batch_size": self.batch_size, "num_tokens": self.num_tokens, "device": self.device_identity,
                "timing_mode": self.timing_mode()}

    def timing_mode(self) -> str:
        """How each call was timed (host_clock, cuda_graph or launch; see :class:`~nvit.vocab.TimingMode`).
        Tables written before it was recorded: host_clock on a CPU, else the one mode their timers used."""
        mode = self.settings.get("timing_mode")
        if mode is None and self.device_kind is DeviceKind.CPU:
            mode = TimingMode.HOST_CLOCK.value
        if mode is None and len(self.settings.get("timer_modes") or ()) == 1:
            mode = self.settings["timer_modes"][0]
        return str(mode or "unknown")

    def device_name(self) -> str:
        ident = self.device_identity
        return str(ident.get("gpu") or ident.get("cpu") or self.device_kind.value)

    def replace(self, **changes: Any) -> LutMeta:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self.replace(calibration=None, self_check=None))
        out["device_kind"] = self.device_kind.value
        out["precision"] = self.precision.value
        out["calibration"] = None if self.calibration is None else self.calibration.to_dict()
        out["self_check"] = None if self.self_check is None else self.self_check.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LutMeta:
        if not isinstance(data, Mapping):
            raise LutError("LUT metadata must be a JSON object")
        if data.get("kind") != LUT_FILE_KIND:
            raise LutError(f"not an nvit latency table (kind {data.get('kind')!r})")
        version = data.get("schema_version")
        if version not in READABLE_SCHEMA_VERSIONS:
            readable = ", ".join(str(v) for v in READABLE_SCHEMA_VERSIONS)
            raise LutError(f"unsupported LUT schema_version {version!r} (this nvit reads {readable})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LutError(f"unknown LUT metadata key(s): {', '.join(unknown)}")
        try:  # an older version is a subset of this one: read as this one (saved again as this one)
            return cls(**{**data, "schema_version": LUT_SCHEMA_VERSION})
        except TypeError as exc:
            raise LutError(f"LUT metadata is incomplete: {exc}") from None


def differing_keys(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """The keys whose values differ between two identities (or settings), compared as JSON values (a tuple read
    back from a file is the list it was written as); sorted, empty when they agree."""
    ja, jb = json.loads(json.dumps(dict(a))), json.loads(json.dumps(dict(b)))
    return sorted(k for k in set(ja) | set(jb) if ja.get(k) != jb.get(k))


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")



def check_compatible(
    meta: LutMeta,
    *,
    device: str | DeviceKind | None = None,
    precision: Precision | str | None = None,
    batch_size: int | None = None,
    num_tokens: int | None = None,
    backend: str | None = None,
    source: str = "the latency table",
) -> None:
    """Raise :class:`LutError` when the table was measured under other conditions than asked for.

    ``device`` is a device kind (``cpu``/``cuda``) or a device name (matched case-insensitively against the
    fingerprint, e.g. ``"NVIDIA H100 80GB HBM3"``); ``None`` means "any".
    """
    checks: list[tuple[str, Any, Any]] = []
    if device is not None:
        wanted = device.value if isinstance(device, DeviceKind) else str(device)
        if wanted.lower() in {k.value for k in DeviceKind}:
            checks.append(("device", meta.device_kind.value, wanted.lower()))
        elif wanted.lower() != meta.device_name().lower():
            checks.append(("device", meta.device_name(), wanted))
    if precision is not None:
        try:
            checks.append(("precision", meta.precision.value, Precision(precision).value))
        except ValueError:
            raise LutError(f"unknown precision {precision!r}; known: {', '.join(p.value for p in Precision)}") from None
    if batch_size is not None:
        checks.append(("batch size", meta.batch_size, batch_size))
    if num_tokens is not None:
        checks.append(("token count", meta.num_tokens, num_tokens))
    if backend is not None:
        checks.append(("backend", meta.backend, backend))
    for what, have, want in checks:
        if have != want:
            raise LutError(f"{source} was measured with {what} {have}, but {want} is needed "
                           f"(profile a table for {want}, or override the check)")
