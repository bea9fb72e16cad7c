"""What the pruning tests share across folders: the small base model, a FLOPs stand-in's dense latency, digits
as step batches and a quick pruning config."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from nvit.presets import preset
from nvit.pruning.config import PruneConfig, Target
from nvit.training.batches import StepBatches

SPEC = preset("vit_test")
DENSE_MS = 4.0
MIN_EMBED = 32


def digits_batches(batch_size: int = 16) -> StepBatches:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:512], dtype=torch.float32)[:, None] / 16.0
    x = (x - x.mean()) / x.std()
    return StepBatches(TensorDataset(x, torch.tensor(d.target[:512])), batch_size=batch_size, seed=0)


def config(*targets: Target, **changes) -> PruneConfig:
    """Width-only pruning unless ``remove`` is given (tests/pruning/test_sublayer_pruning.py covers removal)."""
    kwargs = dict(targets=targets, interval=3, pace=0.06, saliency_window=2, min_embed_dim=MIN_EMBED,
                  lr=1e-3, batch_size=16, seed=0, remove=())
    kwargs.update(changes)
    return PruneConfig(**kwargs)
