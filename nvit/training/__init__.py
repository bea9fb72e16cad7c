"""Training a model (ViT or Swin): fitting with checkpoints and resume, distillation, data-parallel set-up and
step batches (used by ``nvit train``, ``nvit finetune``, the pruning loop's recovery training, the demo and
benchmarks)."""
