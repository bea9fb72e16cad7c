"""What a job request may say, and the normalised spec an agent runs.

Requests are strict pydantic models (unknown keys refused). Normalising resolves everything an agent must
not have to guess, so a job means the same thing on whichever agent leases it: a ``profile`` job carries its
whole search space (presets are expanded; the server never reads a path it is given), its backend, options
and sweep options; a ``measure`` job carries its models (an architecture, and/or an uploaded ONNX file by
sha256) and either a stored table (then the table's backend and settings are used, as ``nvit compare``
does) or a backend, precision and batch size (as ``nvit export --measure`` does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, StrictBool, StrictInt, model_validator

from nvit.errors import NvitError
from nvit.service.errors import unprocessable
from nvit.service.queue import JobKind, NewJob
from nvit.service.schemas import (
    LOCAL_OPTIONS,
    MAX_BATCH,
    MAX_TOKENS,
    BackendOptions,
    DeviceKindName,
    JsonObject,
    PrecisionName,
    Strict,
)
from nvit.service.store import Store

if TYPE_CHECKING:
    from nvit.arch import ArchSpec

MAX_MODELS = 32
MAX_SEED = 2**32 - 1
MAX_WIDTH = 1 << 16  # any width of a block or an embedding
MAX_DEPTH = 256
MAX_IMAGE = 4096
MAX_CLASSES = 1 << 20
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
BackendName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$",
                                   description="Default: tensorrt on cuda, onnxruntime on cpu.")]
ArchValue = JsonObject | Annotated[str, Field(min_length=1, max_length=100)]


class _JobRequest(Strict):
    backend_options: BackendOptions = Field(default_factory=BackendOptions, description=(
        "What is measured (timing protocol, threads, builder settings); never the agent's own folders or "
        "GPU index."))

    @model_validator(mode="before")
    @classmethod
    def _no_local_options(cls, data: Any) -> Any:
        options = data.get("backend_options") if isinstance(data, dict) else None
        if isinstance(options, dict):
            local = sorted(set(options) & set(LOCAL_OPTIONS))
            if local:
                raise ValueError(f"backend option(s) {', '.join(local)} belong to the agent's machine (its folders, "
                                 "its GPU index); a remote job cannot set them")
            unknown = sorted(set(options) - set(BackendOptions.model_fields))
            if unknown:
                raise ValueError(f"backend option(s) {', '.join(unknown)} are not among those a remote job may set: "
                                 f"{', '.join(sorted(BackendOptions.model_fields))}")
        return data


class ProfileRequest(_JobRequest):
    kind: Literal["profile"]
    space: JsonObject | Annotated[str, Field(min_length=1, max_length=100)] = Field(
        description="A space preset name, or a search space JSON object.")
    device: DeviceKindName = "cpu"
    device_name: str | None = Field(None, max_length=300, description="Only agents on this device (name).")
    backend: BackendName | None = None
    precision: PrecisionName | None = None
    batch_size: StrictInt | None = Field(None, ge=1, le=MAX_BATCH)
    seed: StrictInt = Field(0, ge=0, le=MAX_SEED)
    sentinel_every: StrictInt = Field(25, ge=1, le=100_000)
    calibrate: StrictInt = Field(8, ge=0, le=64, description="Whole models measured to fit the calibration.")
    check: StrictInt = Field(6, ge=0, le=64, description="Held-out whole models measured after the fit (self-check).")
    passes: StrictInt = Field(1, ge=1, le=8)
    max_attempts: StrictInt | None = Field(None, ge=1, le=20)


class ModelRef(Strict):
    name: str = Field(min_length=1, max_length=100)
    arch: ArchValue | None = Field(None, description="An architecture (arch.json object) or preset.")
    onnx: Sha256 | None = Field(None, description="An ONNX file uploaded with POST /v1/models.")


class MeasureRequest(_JobRequest):
    kind: Literal["measure"]
    models: list[ModelRef] = Field(min_length=1, max_length=MAX_MODELS)
    lut: Sha256 | None = Field(None, description="Time like this stored table, and predict with it.")
    same_device: StrictBool = True
    device: DeviceKindName = "cpu"
    device_name: str | None = Field(None, max_length=300)
    backend: BackendName | None = None
    precision: PrecisionName = "fp32"
    batch_size: StrictInt = Field(1, ge=1, le=MAX_BATCH)
    passes: StrictInt = Field(2, ge=1, le=8)
    max_attempts: StrictInt | None = Field(None, ge=1, le=20)


JobRequest = Annotated[ProfileRequest | MeasureRequest, Field(discriminator="kind")]


def check_arch_size(spec: ArchSpec, what: str) -> ArchSpec:
    """Refuse an architecture too large for any device (it would be accepted, then kill the agent's worker)."""
    widths = [spec.embed_dim] + [getattr(b, f) for b in spec.blocks for f in ("heads", "qk_dim", "v_dim", "mlp_dim")]
    problems = []
    if max(widths) > MAX_WIDTH:
        problems.append(f"a width of {max(widths)} (at most {MAX_WIDTH})")
    if spec.depth > MAX_DEPTH:
        problems.append(f"{spec.depth} blocks (at most {MAX_DEPTH})")
    if spec.img_size > MAX_IMAGE or spec.in_chans > 64 or spec.num_classes > MAX_CLASSES:
        problems.append("an image, channel or class count beyond the service's bounds")
    if spec.num_tokens > MAX_TOKENS:
        problems.append(f"{spec.num_tokens} tokens (at most {MAX_TOKENS})")
    if problems:
        raise unprocessable(f"{what} has {'; '.join(problems)}")
    return spec


def _checked_backend(name: str, device: str, precision: str, batch_size: int, options: Mapping[str, Any]) -> None:
    """Construct (without entering) the backend: unknown backends and options fail here, not on an agent."""
    from nvit.profiler.base import get_backend

    get_backend(name)(device=device, precision=precision, batch_size=batch_size, **dict(options))


def profile_job(req: ProfileRequest, *, max_attempts: int) -> NewJob:
    from nvit.profiler.backends import default_backend
    from nvit.profiler.space import SearchSpace, preset_space, space_preset_names, with_overrides
    from nvit.profiler.sweep import SweepOptions

    try:
        if isinstance(req.space, str):
            if req.space not in space_preset_names():
                raise unprocessable(f"unknown space preset {req.space!r}; send a space JSON object or one of "
                                    f"{', '.join(space_preset_names())}")
            space = preset_space(req.space)
        else:
            space = SearchSpace.from_dict(req.space)
        space = with_overrides(space, batch_size=req.batch_size, precision=req.precision)
        check_arch_size(space.base, "the space's base architecture")
        widest = max(max(getattr(space, axis)) for axis in ("embed_dims", "heads", "qk_dims", "v_dims", "mlp_dims"))
        if widest > MAX_WIDTH or space.batch_size > MAX_BATCH:
            raise unprocessable(f"the space has a width or batch beyond the service's bounds ({MAX_WIDTH}, "
                                f"{MAX_BATCH})")
        backend = req.backend or default_backend(req.device)
        options = req.backend_options.as_options()
        _checked_backend(backend, req.device, space.precision.value, space.batch_size, options)
        sweep = SweepOptions(seed=req.seed, sentinel_every=req.sentinel_every, calibration_models=req.calibrate,
                             check_models=req.check, passes=req.passes)
    except (NvitError, TypeError, ValueError, KeyError, AttributeError) as exc:  # a space of the wrong shape
        raise unprocessable(str(exc) if isinstance(exc, NvitError) else f"invalid space: {exc}") from None
    spec = {"space": space.to_dict(), "space_fingerprint": space.fingerprint(), "backend": backend,
            "device": req.device, "backend_options": options, "options": dataclasses.asdict(sweep)}
    return NewJob(JobKind.PROFILE, spec, device_kind=req.device, backend=backend, device_name=req.device_name,
                  max_attempts=req.max_attempts or max_attempts)


def arch_spec(value: dict[str, Any] | str, name: str) -> ArchSpec:
    from nvit.arch import ArchSpec
    from nvit.presets import preset, preset_names

    if isinstance(value, str):
        if value not in preset_names():
            raise unprocessable(f"model {name!r}: unknown preset {value!r}; send an arch.json object instead")
        return preset(value)
    try:
        spec = ArchSpec.from_dict(value)
    except (NvitError, TypeError) as exc:
        raise unprocessable(f"model {name!r}: {exc}") from None
    return check_arch_size(spec, f"model {name!r}")


def measure_job(req: MeasureRequest, store: Store, *, max_attempts: int) -> NewJob:
    from nvit.profiler.backends import default_backend

    names = [m.name for m in req.models]
    if len(set(names)) != len(names):
        raise unprocessable("model names must be unique within a job")
    if req.lut is not None:
        row = store.lut(req.lut)
        if row is None:
            raise unprocessable(f"no stored table {req.lut}")
        backend, device, precision, batch_size = row["backend"], row["device_kind"], row["precision"], row["batch_size"]
        device_name = row["device_name"] if req.same_device else None
        num_tokens = row["num_tokens"]
        if req.backend_options.as_options() or req.backend or req.device_name:
            raise unprocessable("a job with a table is timed with the table's backend and settings; "
                                "leave backend, backend_options and device_name out")
    else:
        backend = req.backend or default_backend(req.device)
        device, precision, batch_size, device_name = req.device, req.precision, req.batch_size, req.device_name
        num_tokens = None
        try:
            _checked_backend(backend, device, precision, batch_size, req.backend_options.as_options())
        except NvitError as exc:
            raise unprocessable(str(exc)) from None
    models: list[dict[str, Any]] = []
    for m in req.models:
        if m.arch is None and m.onnx is None:
            raise unprocessable(f"model {m.name!r} needs an arch, an onnx sha256, or both")
        item: dict[str, Any] = {"name": m.name}
        if m.arch is not None:
            arch = arch_spec(m.arch, m.name)
            item["arch"] = arch.to_dict()
            tokens = arch.num_tokens
            if num_tokens is not None and tokens != num_tokens:
                raise unprocessable(f"model {m.name!r} has {tokens} tokens, the table was measured at {num_tokens}")
        if m.onnx is not None:
            blob = store.blob(m.onnx)
            if blob is None or blob["kind"] != "onnx":
                raise unprocessable(f"model {m.name!r}: no uploaded ONNX model {m.onnx}")
            if backend == "torch":
                raise unprocessable(f"model {m.name!r}: the torch backend times torch modules, not ONNX files; "
                                    "send its arch instead")
            shape = blob["info"]["input_shape"]
            if isinstance(shape[0], int) and shape[0] != batch_size:
                raise unprocessable(f"model {m.name!r} has a fixed batch of {shape[0]}, the job times batch "
                                    f"{batch_size}")
            item["onnx"] = m.onnx
            item["input_shape"] = [batch_size, *shape[1:]]
        models.append(item)
    spec = {"models": models, "lut": req.lut, "same_device": req.same_device, "backend": backend, "device": device,
            "precision": precision, "batch_size": batch_size, "backend_options": req.backend_options.as_options(),
            "passes": req.passes}
    return NewJob(JobKind.MEASURE, spec, device_kind=device, backend=backend, device_name=device_name,
                  max_attempts=req.max_attempts or max_attempts)
