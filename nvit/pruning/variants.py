"""Saving the variants a run reaches: where the predicted latency crosses a target, the model is sliced and,
when the run measures its targets, saved only once it measures within the target
(:mod:`nvit.pruning.measured`). Each variant's ``arch.json`` carries its provenance: the target, both
predictions, the step, what was removed and, when measured, the drift-corrected measurement."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nvit import __version__
from nvit.models import save_variant
from nvit.models.checkpoint import slice_any
from nvit.models.vit import VisionTransformer
from nvit.pruning.config import PruneConfig
from nvit.pruning.groups import GroupLayout, PruneError
from nvit.pruning.measured import MeasuredTargets
from nvit.pruning.remover import GroupRemover
from nvit.pruning.results import SavedVariant
from nvit.pruning.targets import ResolvedTarget

log = logging.getLogger(__name__)


class VariantWriter:
    """Writes the variants of one run into ``out``/<target label> (files on the main rank only)."""

    def __init__(self, out: Path, provenance: Mapping[str, Any], config: PruneConfig, layout: GroupLayout,
                 dense_ms: float, min_ms: float, measured: MeasuredTargets, is_main: bool) -> None:
        self.out, self.provenance, self.config, self.layout = out, dict(provenance), config, layout
        self.dense_ms, self.min_ms, self.measured, self.is_main = dense_ms, min_ms, measured, is_main

    def save_crossed(self, pending: Sequence[ResolvedTarget], remover: GroupRemover, model: VisionTransformer,
                     step: int) -> list[SavedVariant]:
        """The variants of the pending targets (highest first) the predicted latency has crossed, saved; stops
        at the first target not crossed, or whose measurement misses it."""
        saved: list[SavedVariant] = []
        for t in pending:
            if remover.latency_ms > self.measured.goal_ms(t.latency_ms, self.min_ms):
                break
            sliced = slice_any(model).eval()
            measurement = None
            if self.measured.active:
                decision = self.measured.measure(t.label, t.latency_ms, remover.latency_ms, self.min_ms, step,
                                                 remover.state.spec(), sliced)
                if not decision.save:
                    break
                measurement = decision.record
            saved.append(self.save(t, sliced, remover, step, measurement))
        return saved

    def save(self, target: ResolvedTarget, sliced: VisionTransformer, remover: GroupRemover, step: int,
             measurement: dict[str, Any] | None = None) -> SavedVariant:
        state = remover.state
        spec = state.spec()
        if sliced.spec.to_dict() != spec.to_dict():
            raise PruneError("the sliced model's widths differ from the pruning mask (internal error)")
        folder = self.out / target.label
        prov = {
            **self.provenance,
            "target": {**target.target.to_dict(), "latency_ms": target.latency_ms},
            "predicted_latency_ms": remover.latency_ms,
            "dense_predicted_latency_ms": self.dense_ms,
            "step": step,
            "pruned_groups": remover.groups_removed,
            "pruned_units": state.num_pruned,
            "prune_config": self.config.to_dict(),
            "removable_sublayers": sorted(k.value for k in self.layout.removable),
            "removed_sublayers": spec.removed_sublayers,
            "dropped_blocks": [i for i, b in enumerate(state.block_specs()) if b is None],
            "nvit_version": __version__,
        }
        if measurement is not None:
            prov["measured_latency"] = {**measurement, "correction": self.measured.correction}
        if self.is_main:
            save_variant(sliced, folder, prov)
        log.info("saved %s: predicted %.4g ms <= target %.4g ms", folder, remover.latency_ms, target.latency_ms)
        return SavedVariant(target.label, str(folder), target.latency_ms, remover.latency_ms, step, spec,
                            None if measurement is None else measurement["corrected_ms"],
                            None if measurement is None else measurement["met"])
