"""What one latency-table row measures; the words live in :mod:`nvit.vocab` (shared with the table)."""

from nvit.vocab import KIND_FIELDS, ONE_HALF_BLOCKS, WIDTH_FIELDS, PartConfig, PartKind, positive_int

__all__ = ["KIND_FIELDS", "ONE_HALF_BLOCKS", "WIDTH_FIELDS", "PartConfig", "PartKind", "positive_int"]
