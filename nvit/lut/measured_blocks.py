"""A block the table measured is priced by its own row.

The block model (``slope · (attn + mlp) + overhead(e)``, and its one-half forms) is fitted over blocks of
every size; it follows how a block differs from its halves on average. At the narrow end pruning reaches it
can be far off for one shape: on the demo's CPU the attention half with 4 heads × Q/K 8 / V 8 is faster
alone than with 3 heads, and inside a block that advantage is gone, so the block took 12% more than the
model said, and §2b's attention-only blocks of that shape 17–23% more (BENCHMARKS.md §1, §2b). Tables
whose space measures narrow blocks (:meth:`~nvit.profiler.space.SearchSpace.narrow_block_configs`) hold
those shapes as rows; where a queried block is one of them, its measured latency replaces the model's.
Everything else is the model's, as before.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from nvit.vocab import PartKind

#: Row kinds that are whole blocks, full or one-half.
BLOCK_KINDS = (PartKind.BLOCK, PartKind.ATTN_BLOCK, PartKind.MLP_BLOCK)
#: Bits per width in a block's code (e, heads, Q/K, V, MLP): 57 in all, one int64; a wider block is never looked up.
_BITS = (13, 9, 10, 10, 15)
_LIMITS = tuple(2 ** b for b in _BITS)


def _codes(e: np.ndarray, h: np.ndarray, q: np.ndarray, v: np.ndarray, m: np.ndarray) -> np.ndarray:
    """One integer per block; a block without attention has no Q/K or V widths, whatever the arrays say."""
    no_attn = h <= 0
    widths = [e, np.where(no_attn, 0, h), np.where(no_attn, 0, q), np.where(no_attn, 0, v), np.maximum(m, 0)]
    code = np.zeros(np.shape(e), dtype=np.int64)
    for w, bits in zip(widths, _BITS, strict=True):
        code = (code << bits) | np.asarray(w, dtype=np.int64)
    return code


class MeasuredBlocks:
    """Exact lookup of measured block rows (full, attention-only, MLP-only) by their widths."""

    def __init__(self, codes: np.ndarray, latency_ms: np.ndarray) -> None:
        order = np.argsort(codes, kind="stable")
        self._codes = codes[order]
        self._latency_ms = latency_ms[order]

    def widths(self) -> list[tuple[int, int, int, int, int]]:
        """(e, heads, Q/K, V, MLP) of every measured block, in code order (heads 0: MLP-only, MLP 0: attention-
        only)."""
        out = []
        for code in self._codes.tolist():
            parts = []
            for bits in reversed(_BITS):
                parts.append(code & ((1 << bits) - 1))
                code >>= bits
            out.append(tuple(reversed(parts)))
        return out

    def model_gaps_pct(self, predictor: Any) -> list[tuple[str, float]]:
        """(block, measured / block model − 1 in %) per measured block: how far the model alone would be."""
        widths = self.widths()
        if not widths:
            return []
        e, h, q, v, m = (np.array(c, dtype=np.float64) for c in zip(*widths, strict=True))
        model = predictor.modelled_blocks_ms(e, h, q, v, m)
        names = [f"e{w[0]}/" + ("" if not w[1] else f"h{w[1]}/q{w[2]}/v{w[3]}") + ("/" if w[1] and w[4] else "")
                 + (f"m{w[4]}" if w[4] else "") for w in widths]
        return [(n, float((ms / mod - 1) * 100)) for n, ms, mod in zip(names, self._latency_ms, model, strict=True)
                if mod > 0]

    @classmethod
    def from_rows(cls, rows: pd.DataFrame, latency_column: str) -> MeasuredBlocks:
        part = rows[rows["kind"].isin([k.value for k in BLOCK_KINDS])]
        part = part[part[latency_column] > 0]
        widths = [part[c].fillna(0).to_numpy(dtype=np.int64) for c in ("embed_dim", "heads", "qk_dim", "v_dim",
                                                                         "mlp_dim")]
        is_mlp_only = (part["kind"] == PartKind.MLP_BLOCK.value).to_numpy()
        is_attn_only = (part["kind"] == PartKind.ATTN_BLOCK.value).to_numpy()
        widths[1] = np.where(is_mlp_only, 0, widths[1])
        widths[4] = np.where(is_attn_only, 0, widths[4])
        fits = np.all([w < limit for w, limit in zip(widths, _LIMITS, strict=True)], axis=0)
        widths = [w[fits] for w in widths]
        codes = _codes(*widths) if len(widths[0]) else np.zeros(0, dtype=np.int64)
        latency = part[latency_column].to_numpy(dtype=np.float64)[fits]
        if len(codes) and len(np.unique(codes)) < len(codes):  # one configuration measured twice: its median
            frame = pd.DataFrame({"code": codes, "ms": latency}).groupby("code")["ms"].median()
            codes, latency = frame.index.to_numpy(dtype=np.int64), frame.to_numpy(dtype=np.float64)
        return cls(codes, latency)

    def __len__(self) -> int:
        return len(self._codes)

    @property
    def smallest_ms(self) -> float | None:
        return float(self._latency_ms.min()) if len(self._latency_ms) else None

    def lookup(self, e: Any, h: Any, q: Any, v: Any, m: Any) -> np.ndarray:
        """Measured latency of each queried block, NaN where the table did not measure that exact block (or a
        width is not a whole number). Arrays broadcast."""
        arrays = np.broadcast_arrays(*(np.asarray(x, dtype=np.float64) for x in (e, h, q, v, m)))
        out = np.full(arrays[0].shape, np.nan)
        if not len(self._codes):
            return out
        whole = np.all([np.isfinite(a) & (a == np.rint(a)) & (a >= 0) & (a < limit)
                        for a, limit in zip(arrays, _LIMITS, strict=True)], axis=0)
        if not whole.any():
            return out
        codes = _codes(*(np.where(whole, a, 0).astype(np.int64) for a in arrays))
        pos = np.clip(np.searchsorted(self._codes, codes), 0, len(self._codes) - 1)
        hit = whole & (self._codes[pos] == codes)
        out[hit] = self._latency_ms[pos[hit]]
        return out

    def override(self, e: Any, h: Any, q: Any, v: Any, m: Any, modelled_ms: np.ndarray) -> np.ndarray:
        """``modelled_ms`` with every block the table measured replaced by its measurement."""
        measured = self.lookup(e, h, q, v, m)
        return np.where(np.isfinite(measured), measured, modelled_ms)
