"""How well a table predicts whole models: the figures a table's self-check stores and ``nvit lut show``
prints (MAPE, worst error, share within ±5% / ±10%, Kendall τ, bias)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from nvit.errors import LutError
from nvit.lut.records import SelfCheck


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Kendall's τ-b of two paired samples (``None`` for fewer than two pairs or a constant sample)."""
    if len(x) < 2:
        return None
    from scipy.stats import kendalltau

    tau = float(kendalltau(np.asarray(x, dtype=float), np.asarray(y, dtype=float)).statistic)
    return tau if np.isfinite(tau) else None


def error_figures(measured_ms: Sequence[float], predicted_ms: Sequence[float]) -> dict[str, Any]:
    """Signed relative errors ``(predicted - measured) / measured`` summarised, in percent and shares."""
    m = np.asarray(measured_ms, dtype=np.float64)
    p = np.asarray(predicted_ms, dtype=np.float64)
    if m.size == 0 or m.shape != p.shape:
        raise LutError("accuracy needs as many predictions as measurements, at least one")
    if not (np.all(np.isfinite(m)) and np.all(m > 0) and np.all(np.isfinite(p))):
        raise LutError("accuracy needs finite positive measurements and finite predictions")
    err = (p - m) / m * 100.0
    a = np.abs(err)
    return {"n": int(m.size), "mape_pct": float(a.mean()), "median_abs_pct": float(np.median(a)),
            "max_abs_pct": float(a.max()), "bias_pct": float(err.mean()),
            "within_5pct": float(np.mean(a <= 5.0)), "within_10pct": float(np.mean(a <= 10.0)),
            "kendall_tau": kendall_tau(m, p)}


def summary_line(figures: dict[str, Any]) -> str:
    """``MAPE 1.9%, max 4.2%, 95% within ±5%, 100% within ±10%, τ 0.97, bias -0.4%`` (n models)."""
    tau = figures.get("kendall_tau")
    return (f"{figures['n']} models: MAPE {figures['mape_pct']:.2f}%, max {figures['max_abs_pct']:.1f}%, "
            f"{figures['within_5pct'] * 100:.0f}% within ±5%, {figures['within_10pct'] * 100:.0f}% within ±10%, "
            f"Kendall τ {'-' if tau is None else f'{tau:.2f}'}, bias {figures['bias_pct']:+.2f}%")


#: A self-check *misses* when its MAPE is above this or fewer than ``SELF_CHECK_WITHIN_10`` are within ±10%.
SELF_CHECK_MAPE_PCT = 5.0
SELF_CHECK_WITHIN_10 = 0.9


def self_check_missed(check: SelfCheck | None) -> bool:
    return check is not None and (check.mape_pct > SELF_CHECK_MAPE_PCT or check.within_10pct < SELF_CHECK_WITHIN_10)


def calibration_status(meta: Any, predictor: Any = None) -> tuple[str, str]:
    """The table's calibration verdict (``plausible`` / ``implausible`` / ``refused`` / ``none``) and one line
    (:func:`nvit.lut.calibration.status_line`); ``predictor`` (a loaded
    :class:`~nvit.lut.predictor.LatencyPredictor` of the table) tells whether it refused the calibration."""
    from nvit.lut.calibration import status_line

    return status_line(meta.calibration, getattr(predictor, "calibration_refused", None))


def trust_warnings(meta: Any, predictor: Any = None) -> list[str]:
    """What a user of the table ``meta`` describes should know before relying on it: it was profiled on a
    noisy machine, its calibration is implausible or refused (with ``predictor``, the table's loaded
    predictor, a refusal is known), or its self-check missed (empty when none)."""
    out = []
    verdict, line = calibration_status(meta, predictor)
    if verdict in ("implausible", "refused"):
        out.append(line)
    cond = meta.conditions or {}
    if cond.get("verdict") not in (None, "quiet"):
        out.append(f"the table was profiled on a {cond['verdict']} machine ({'; '.join(cond.get('reasons') or [])}); "
                   "re-profile it on a quiet one, or run 'nvit lut check' to see how far it predicts now")
    if self_check_missed(meta.self_check):
        c = meta.self_check
        out.append(f"the table's self-check missed: MAPE {c.mape_pct:.1f}% on {c.n} held-out models, "
                   f"{c.within_10pct * 100:.0f}% within ±10%")
    return out
