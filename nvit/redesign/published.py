"""NViT's published redistribution rule as a rule among others: read as width shares per relative block
position, so that it redistributes any base (:func:`nvit.redesign.learned.build_arch`) like a learned rule.

The rule's own widths (ReViT: per-block heads, QK, V and MLP for an embedding ``E``, stretched to any depth)
are an architecture family like DeiT's, so they live with the presets (:func:`nvit.presets.revit_widths`,
presets ``revit_tiny`` and ``revit_small``, ``nvit arch revit``); here they become shares against a DeiT of
ReViT-T's embedding (64-channel heads, MLP 4E).
"""

from __future__ import annotations

from nvit.presets import revit_widths
from nvit.redesign.learned import Reference, Shape, Shares, WidthKind, variant_shares

#: The published rule read as shares: ReViT-T's widths (E = 176) over a DeiT of that embedding (64-channel
#: heads, MLP 4E), so that it applies to any base through :func:`~nvit.redesign.learned.build_arch`.
PUBLISHED_EMBED = 176
DEIT_HEAD_DIM = 64
DEIT_MLP_RATIO = 4


def published_shares(depth: int = 12) -> Shares:
    """NViT's rule (:func:`nvit.presets.revit_widths`, stretched to ``depth``) as shares against a DeiT at
    ReViT-T's embedding."""
    e = PUBLISHED_EMBED
    deit = Reference(e, {WidthKind.HEADS: e / DEIT_HEAD_DIM, WidthKind.QK: float(DEIT_HEAD_DIM),
                         WidthKind.V: float(DEIT_HEAD_DIM), WidthKind.MLP: float(DEIT_MLP_RATIO * e)})
    shares = variant_shares(Shape(e, revit_widths(e, depth), "published rule"), deit)
    return Shares("published rule (NViT)", shares.positions, shares.values)
