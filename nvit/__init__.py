"""nvit: latency-driven global structural pruning of Vision Transformers."""

__version__ = "0.1.0"
