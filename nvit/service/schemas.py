"""What the service accepts, typed and bounded at the edge: free-form JSON, backend options of remote jobs,
ids, and the one strict schema of a latency table's metadata.

Every number is finite and every integer fits in signed 64 bits (a database column, a C ``int64``); free-form
JSON (an architecture, a job's progress or result) is bounded in depth, size and string length. A table's
metadata is checked by :class:`TableMetaSchema` before anything is stored, so a table whose backend is an
object or whose batch is 10**20 is a 422, never a row.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    model_validator,
)

from nvit.lut.meta import LUT_FILE_KIND, READABLE_SCHEMA_VERSIONS
from nvit.profiler.backends.cuda_timer import CUDA_APIS
from nvit.profiler.backends.onnxruntime_backend import OrtProvider
from nvit.profiler.backends.torch_backend import COMPILE_MODES
from nvit.profiler.harness import RobustStatistic
from nvit.service.errors import unprocessable
from nvit.vocab import DeviceKind, Precision

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
DB_INT_MAX = 2**31 - 1  # an Integer column on PostgreSQL (job ids, batch sizes) holds no more
JSON_MAX_DEPTH = 16
JSON_MAX_NODES = 100_000
JSON_MAX_STRING = 10_000
MAX_THREADS = 1024
MAX_BATCH = 4096
MAX_TOKENS = 1 << 16



def one_of(values: Any) -> Any:
    """``Literal[...]`` of the given values (an enum's values or a tuple): the schema names each word where
    it is declared, never a copy."""
    return Literal[tuple(v.value if isinstance(v, enum.Enum) else v for v in values)]  # type: ignore[valid-type]


PrecisionName = one_of(Precision)
DeviceKindName = one_of(DeviceKind)

JobId = Annotated[int, Field(ge=1, le=INT64_MAX, description="A job id (signed 64 bits).")]
AgentId = Annotated[str, Field(pattern=r"^[0-9a-f]{1,32}$", description="An agent id (hex).")]
Name = Annotated[str, Field(min_length=1, max_length=200)]


def json_problem(value: Any, where: str = "") -> str | None:
    """Why ``value`` is not bounded, finite JSON (None when it is)."""
    nodes = 0
    stack: list[tuple[Any, str, int]] = [(value, where or "the value", 0)]
    while stack:
        item, path, depth = stack.pop()
        nodes += 1
        if nodes > JSON_MAX_NODES:
            return f"{where or 'the value'} has more than {JSON_MAX_NODES} items"
        if depth > JSON_MAX_DEPTH:
            return f"{path} is nested deeper than {JSON_MAX_DEPTH} levels"
        if isinstance(item, bool) or item is None:
            continue
        if isinstance(item, int):
            if not INT64_MIN <= item <= INT64_MAX:
                return f"{path} is an integer beyond 64 bits"
        elif isinstance(item, float):
            if not math.isfinite(item):
                return f"{path} is not a finite number"
        elif isinstance(item, str):
            if len(item) > JSON_MAX_STRING:
                return f"{path} is a string over {JSON_MAX_STRING} characters"
            if "\x00" in item:
                return f"{path} holds a NUL character"
        elif isinstance(item, Mapping):
            for k, v in item.items():
                if not isinstance(k, str) or len(k) > 200 or "\x00" in k:
                    return f"{path} has a key that is not a short string"
                stack.append((v, f"{path}.{k}", depth + 1))
        elif isinstance(item, list | tuple):
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(item))
        else:
            return f"{path} is not JSON"
    return None


def _bounded(value: Any) -> Any:
    why = json_problem(value)
    if why is not None:
        raise ValueError(why)
    return value


JsonObject = Annotated[dict[str, Any], AfterValidator(_bounded)]
JsonList = Annotated[list[Any], AfterValidator(_bounded)]


class Strict(BaseModel):
    """Unknown keys refused, no NaN or infinity, no silent coercion of strings into numbers, no NUL
    characters in text (no database column holds one)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    @model_validator(mode="after")
    def _no_nul(self) -> Strict:
        for name, value in self:
            if isinstance(value, str) and "\x00" in value:
                raise ValueError(f"{name} holds a NUL character")
            if isinstance(value, list) and any(isinstance(v, str) and "\x00" in v for v in value):
                raise ValueError(f"{name} holds a NUL character")
        return self


# ---- backend options of remote jobs --------------------------------------------------------------------
class HarnessOptions(Strict):
    """The timing protocol (:class:`~nvit.profiler.harness.HarnessConfig`), bounded."""

    warmup_s: float | None = Field(None, ge=0, le=600)
    rewarm_s: float | None = Field(None, ge=0, le=600)
    min_samples: StrictInt | None = Field(None, ge=1, le=1_000_000)
    max_samples: StrictInt | None = Field(None, ge=1, le=1_000_000)
    time_cap_s: float | None = Field(None, gt=0, le=3600)
    target_rel_ci: float | None = Field(None, gt=0, lt=1)
    repeats: StrictInt | None = Field(None, ge=1, le=100)
    statistic: one_of(RobustStatistic) | None = None
    min_sample_ms: float | None = Field(None, ge=0, le=10_000)
    recover_rounds: StrictInt | None = Field(None, ge=0, le=100)
    hit_contention: float | None = Field(None, gt=0, lt=1)
    settle_rel: float | None = Field(None, gt=0, lt=1)


class BackendOptions(Strict):
    """The backend options a remote job may set: what is measured, never where the agent keeps its files or
    which of its GPUs it uses (``cache_dir``, ``cuda_index`` are the agent's business)."""

    harness: HarnessOptions | None = None
    intra_op_threads: StrictInt | None = Field(None, ge=1, le=MAX_THREADS)
    provider: one_of(OrtProvider) | None = None
    allow_spinning: StrictBool | None = None
    compile: StrictBool | None = None
    compile_mode: one_of(COMPILE_MODES) | None = None
    cuda_graphs: StrictBool | None = None
    tf32: StrictBool | None = None
    cudnn_benchmark: StrictBool | None = None
    builder_optimization_level: StrictInt | None = Field(None, ge=0, le=5)
    workspace_mib: StrictInt | None = Field(None, ge=1, le=1 << 20)
    avg_timing_iterations: StrictInt | None = Field(None, ge=1, le=1000)
    strongly_typed: StrictBool | None = None
    buffers: one_of(CUDA_APIS) | None = None

    def as_options(self) -> dict[str, Any]:
        """The options given (unset ones left to the backend's defaults)."""
        return self.model_dump(exclude_none=True)


LOCAL_OPTIONS = ("cache_dir", "cuda_index")


# ---- a table's metadata --------------------------------------------------------------------------------
Text = Annotated[str, Field(max_length=300)]
Backend = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")]


class DeviceIdentity(Strict):
    kind: DeviceKindName
    cpu: Text | None = None
    threads_used: StrictInt | None = Field(None, ge=1, le=MAX_THREADS)
    gpu: Text | None = None
    sm_count: StrictInt | None = Field(None, ge=1, le=1 << 20)
    compute_capability: Annotated[str, Field(max_length=16)] | None = None


class Calibration(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    scale: float = Field(gt=0, le=1e6)
    offset_ms: float = Field(ge=-1e9, le=1e9)


class SpaceInfo(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    name: Annotated[str, Field(max_length=200)] = ""


class ProtocolInfo(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    space_fingerprint: Annotated[str, Field(max_length=32)] = ""


class TableMetaSchema(Strict):
    """The metadata of a latency table the service stores (``nvit.lut`` in its Parquet footer)."""

    kind: one_of((LUT_FILE_KIND,))
    schema_version: one_of(READABLE_SCHEMA_VERSIONS)
    backend: Backend
    device_kind: DeviceKindName
    precision: PrecisionName
    batch_size: StrictInt = Field(ge=1, le=MAX_BATCH)
    num_tokens: StrictInt = Field(ge=1, le=MAX_TOKENS)
    base_arch: JsonObject
    device_identity: DeviceIdentity
    device: JsonObject = Field(default_factory=dict)
    space: SpaceInfo = Field(default_factory=SpaceInfo)
    versions: dict[Annotated[str, Field(max_length=100)], Text] = Field(default_factory=dict, max_length=64)
    settings: JsonObject = Field(default_factory=dict)
    protocol: ProtocolInfo = Field(default_factory=ProtocolInfo)
    sentinel: JsonList = Field(default_factory=list)
    calibration: Calibration | None = None
    self_check: JsonObject | None = None
    conditions: JsonObject | None = None
    profile_seconds_total: float = Field(0.0, ge=0, le=1e9)
    created_at: Annotated[str, Field(max_length=40)] = ""
    nvit_version: Annotated[str, Field(max_length=40)] = ""


def check_table_meta(meta: Any) -> TableMetaSchema:
    """The metadata, checked; a 422 naming the first problem otherwise."""
    if not isinstance(meta, Mapping):
        raise unprocessable("the table's metadata is not a JSON object")
    why = json_problem(meta, "meta")
    if why is not None:
        raise unprocessable(f"the table's metadata is refused: {why}")
    try:
        checked = TableMetaSchema.model_validate(dict(meta))
    except ValidationError as exc:
        raise unprocessable(f"the table's metadata is refused: {first_error(exc)}") from None
    if checked.device_identity.kind != checked.device_kind:
        raise unprocessable(f"the table's metadata is refused: device_kind {checked.device_kind} but the device "
                            f"identity is a {checked.device_identity.kind}")
    return checked


def first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ()))
    return f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid"))
