"""Predicted latency of an architecture from a stored table (no device needed)."""

from __future__ import annotations

import math
import threading
from typing import Any

from fastapi import APIRouter, Request
from pydantic import Field

from nvit.errors import NvitError
from nvit.service.config import ServiceContext
from nvit.service.errors import unprocessable
from nvit.service.jobspec import ArchValue, Sha256, arch_spec
from nvit.service.routes import Reader, context
from nvit.service.routes.luts import stored_lut
from nvit.service.schemas import Strict

router = APIRouter(tags=["predict"])
_CACHED_PREDICTORS = 8
_lock = threading.Lock()


class PredictRequest(Strict):
    lut: Sha256
    arch: ArchValue = Field(description="An architecture (arch.json object) or a preset name.")


def _predictor(ctx: ServiceContext, sha256: str) -> Any:
    from nvit.lut.predictor import LatencyPredictor
    from nvit.lut.table import LatencyTable

    cache = ctx.predictors
    with _lock:
        if sha256 in cache:
            cache.move_to_end(sha256)
            return cache[sha256]
    predictor = LatencyPredictor(LatencyTable.load(ctx.blobs.path(sha256)))
    with _lock:
        cache[sha256] = predictor
        while len(cache) > _CACHED_PREDICTORS:
            cache.popitem(last=False)
    return predictor


@router.post("/predict", summary="Per-block and total predicted latency of an architecture.")
def predict(body: PredictRequest, request: Request, _: Reader) -> dict[str, Any]:
    ctx = context(request)
    stored_lut(ctx, body.lut)
    spec = arch_spec(body.arch, "arch")
    try:
        predictor = _predictor(ctx, body.lut)
        predictor.check_spec(spec)
        blocks = predictor.block_latencies_ms(spec)
        answer = {"lut": body.lut, "arch": spec.name, "blocks_ms": blocks,
                  "fixed_ms": predictor.fixed_latency_ms(spec.embed_dim), "offset_ms": predictor.offset_ms(),
                  "total_ms": predictor.predict_ms(spec), "calibrated": predictor.calibrated}
    except NvitError as exc:
        raise unprocessable(str(exc)) from None
    except (KeyError, TypeError, ValueError, IndexError) as exc:  # a table stored before the strict schema
        raise unprocessable(f"the table {body.lut} cannot predict: {exc!r}") from None
    if not all(math.isfinite(x) for x in [*blocks, answer["fixed_ms"], answer["total_ms"]]):
        raise unprocessable(f"the table {body.lut} predicts a non-finite latency for this architecture")
    return answer
