"""Measuring latency: the backends (onnxruntime, torch, TensorRT) behind one interface, the timing harness,
search spaces and the sweep that turns them into a latency table, machine conditions and the self-check."""
