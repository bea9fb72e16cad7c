"""Models built from their specs (the ViT with gates, the Swin), checkpoint loading by state-dict keys, and
slicing to a smaller dense model."""

from nvit.models.checkpoint import (
    infer_arch,
    load_checkpoint,
    load_model,
    load_variant,
    read_state_dict,
    save_variant,
    variant_provenance,
)
from nvit.models.slicing import BlockKeep, KeepIndices, apply_keep_as_gates, keep_from_gates, slice_model
from nvit.models.vit import VisionTransformer, build_model

__all__ = [
    "BlockKeep", "KeepIndices", "VisionTransformer", "apply_keep_as_gates", "build_model", "infer_arch",
    "keep_from_gates", "load_checkpoint", "load_model", "load_variant", "read_state_dict", "save_variant",
    "slice_model", "variant_provenance",
]
