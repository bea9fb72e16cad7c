"""Exporting a model for deployment: ONNX files verified against PyTorch in ONNX Runtime, and TensorRT engines
built as the profiler builds the parts it times (``nvit export``)."""
