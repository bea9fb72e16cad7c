"""NViT's published redistribution rule (ReViT): per-block widths for a given embedding width.

NViT's pruned models moved parameters from QK to the MLP and from the first and last blocks to the middle
ones; its official code turns that into a rule for embedding ``E``, with ``r = round(0.005·E)`` and
``s = round(0.05·E/8)`` (Python's rounding), for blocks 1..12:

==========  ==========================================
heads       10, 2r, 2r, 4r ×6, 2r, 2r, 10
qk per head 16s, 8s, 8s, 16s ×6, 8s, 8s, 16s
v per head  64 everywhere
MLP         3E ×3, 6E ×6, 3E ×3
==========  ==========================================

**Other depths.** Block ``j`` of ``D`` (0-based) takes the widths of the 12-block pattern at
:func:`pattern_index`: its relative position ``j/(D−1)`` mapped onto 0..11 (endpoints onto endpoints, halves
rounded up in the first half of the model and mirrored into the second, so the stretched rule stays
symmetric like the pattern); one block takes the middle pattern. ``D = 12`` is the pattern itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nvit.errors import SpecError

PATTERN_DEPTH = 12
V_DIM = 64
#: Multipliers of the 12-block pattern: heads ×r (0 means the constant EDGE_HEADS), QK ×s, MLP ×E.
_HEADS_R = (0, 2, 2, 4, 4, 4, 4, 4, 4, 2, 2, 0)
EDGE_HEADS = 10
_QK_S = (16, 8, 8, 16, 16, 16, 16, 16, 16, 8, 8, 16)
_MLP_E = (3, 3, 3, 6, 6, 6, 6, 6, 6, 3, 3, 3)
MIDDLE_INDEX = 5

#: Presets: ReViT-T and ReViT-S of the paper (224 px, 16 px patches, 1000 classes).
REVIT_PRESETS = {"revit_tiny": 176, "revit_small": 384}


@dataclass(frozen=True)
class RevitFactors:
    """The rule's two integers for one embedding width."""

    embed_dim: int
    r: int
    s: int

    @classmethod
    def of(cls, embed_dim: int) -> RevitFactors:
        return cls(embed_dim, round(0.005 * embed_dim), round(0.05 * embed_dim / 8))


def pattern_index(block: int, depth: int) -> int:
    """Which of the 12 pattern blocks block ``block`` (0-based) of a ``depth``-block model takes."""
    if depth < 1 or not 0 <= block < depth:
        raise SpecError(f"block {block} of a {depth}-block model does not exist")
    if depth == 1:
        return MIDDLE_INDEX
    last = PATTERN_DEPTH - 1
    mirrored = block > (depth - 1) / 2
    j = depth - 1 - block if mirrored else block
    index = math.floor(j * last / (depth - 1) + 0.5)
    return last - index if mirrored else index


def revit_widths(embed_dim: int, depth: int = PATTERN_DEPTH) -> tuple[tuple[int, int, int, int], ...]:
    """The rule's (heads, qk_dim, v_dim, mlp_dim) per block for embedding ``embed_dim``
    (:func:`nvit.arch.revit_spec` builds the architecture); a width the rule makes 0 (``E`` of 100 or less)
    is an error."""
    if not isinstance(embed_dim, int) or isinstance(embed_dim, bool) or embed_dim <= 0:
        raise SpecError(f"--embed must be a positive integer, got {embed_dim!r}")
    f = RevitFactors.of(embed_dim)
    if f.r == 0 or f.s == 0:
        raise SpecError(f"NViT's rule gives r = round(0.005·{embed_dim}) = {f.r} and s = round(0.05·{embed_dim}/8) "
                        f"= {f.s}: zero heads or QK channels; the rule needs an embedding above 100")
    out = []
    for j in range(depth):
        i = pattern_index(j, depth)
        heads = EDGE_HEADS if _HEADS_R[i] == 0 else _HEADS_R[i] * f.r
        out.append((heads, _QK_S[i] * f.s, V_DIM, _MLP_E[i] * embed_dim))
    return tuple(out)
