"""Inspect untrusted uploads in a child process: ONNX models and latency tables.

The server never parses an upload itself. ``python -m nvit.service.inspect KIND PATH`` runs in a child with
limits on memory and CPU time (and a wall-clock timeout), prints one JSON line (``{"ok": true, "info":
...}`` or ``{"ok": false, "error": "..."}``) and exits; a parser crash or hang costs the child, not the
server.

ONNX rules: the file parses as an ONNX protobuf and passes ``onnx.checker``; no tensor anywhere (graph,
subgraphs, attributes) refers to external data; every opset import and every node is in the standard ONNX
domain and names an operator ONNX defines; no model-local functions; exactly one graph input (float32 or
float16, rank 4: images) and one output. A serialized TensorRT engine (executable code) is not ONNX and
never passes. Tables: :meth:`nvit.lut.table.LatencyTable.load` with its checks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from nvit.service.errors import ApiError, unprocessable

STANDARD_DOMAINS = ("", "ai.onnx")
_TIMEOUT_S = 300.0
_MEMORY_LIMIT_BYTES = 8 << 30
_CPU_LIMIT_S = 300


def inspect_upload(kind: str, path: str | os.PathLike[str], *, what: str, timeout_s: float = _TIMEOUT_S
                   ) -> dict[str, Any]:
    """Inspect ``path`` in a child process; the facts it found, or an :class:`ApiError` (422) saying why
    the upload is refused."""
    try:
        proc = subprocess.run([sys.executable, "-m", "nvit.service.inspect", kind, str(path)],
                              capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise unprocessable(f"inspecting the {what} took longer than {timeout_s:g} s") from None
    lines = proc.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        answer = None
    if not isinstance(answer, dict):
        tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise ApiError(422, "invalid input", f"the {what} could not be inspected ({tail[:300]})")
    if not answer.get("ok"):
        raise unprocessable(f"the {what} is refused: {answer.get('error', 'no reason given')}")
    return dict(answer["info"])


# ---- in the child -------------------------------------------------------------------------------------
class Refused(Exception):
    """An upload breaks a rule; the message says which."""


def _graphs(graph: Any) -> Any:
    """``graph`` and every subgraph inside its nodes' attributes."""
    import onnx

    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def _tensors(graph: Any) -> Any:
    import onnx

    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors


def inspect_onnx(path: Path) -> dict[str, Any]:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError):
        raise Refused("not an ONNX model (it does not parse as an ONNX protobuf)") from None
    if not model.HasField("graph") or not model.opset_import:
        raise Refused("not an ONNX model (no graph or no opset import)")
    for opset in model.opset_import:
        if opset.domain not in STANDARD_DOMAINS:
            raise Refused(f"opset domain {opset.domain!r} is not the standard ONNX domain")
    if model.functions:
        raise Refused(f"model-local functions are not accepted ({model.functions[0].domain}::"
                      f"{model.functions[0].name})")
    ops: set[str] = set()
    for graph in _graphs(model.graph):
        for tensor in _tensors(graph):
            if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
                raise Refused(f"tensor {tensor.name!r} refers to external data; only self-contained ONNX "
                              "files are accepted")
        for node in graph.node:
            if node.domain not in STANDARD_DOMAINS:
                raise Refused(f"operator {node.domain}::{node.op_type} is not in the standard ONNX domain")
            if not onnx.defs.has(node.op_type, node.domain):
                raise Refused(f"operator {node.op_type!r} is not a standard ONNX operator")
            ops.add(node.op_type)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = (str(exc).strip().splitlines() or ["invalid"])[0]
        raise Refused(f"onnx.checker: {first[:300]}") from None
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise Refused(f"the model must have one input and one output, it has {len(inputs)} and "
                      f"{len(model.graph.output)}")
    tensor_type = inputs[0].type.tensor_type
    dtypes = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16"}
    if tensor_type.elem_type not in dtypes:
        raise Refused("the model input must be float32 or float16")
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim]
    if len(dims) != 4 or not all(isinstance(d, int) and d > 0 for d in dims[1:]):
        raise Refused(f"the model input must be images [batch, channels, height, width] with fixed channels "
                      f"and size, it is {dims}")
    return {"input_name": inputs[0].name, "input_shape": dims, "input_dtype": dtypes[tensor_type.elem_type],
            "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import}, "ops": sorted(ops),
            "nodes": len(model.graph.node)}


def inspect_lut(path: Path) -> dict[str, Any]:
    from nvit.errors import LutError
    from nvit.lut.table import LatencyTable

    try:
        table = LatencyTable.load(path)
    except LutError as exc:
        raise Refused(str(exc).replace(str(path), "the upload")) from None
    return {"meta": table.meta.to_dict(), "rows": len(table), "counts": table.counts()}


_INSPECTORS = {"onnx": inspect_onnx, "lut": inspect_lut}


def _limit_resources() -> None:
    import resource

    for limit, value in ((resource.RLIMIT_AS, _MEMORY_LIMIT_BYTES), (resource.RLIMIT_CPU, _CPU_LIMIT_S)):
        try:
            _, hard = resource.getrlimit(limit)
            resource.setrlimit(limit, (value if hard == resource.RLIM_INFINITY else min(value, hard), hard))
        except (ValueError, OSError):
            pass


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in _INSPECTORS:
        print(json.dumps({"ok": False, "error": f"usage: KIND PATH with KIND in {sorted(_INSPECTORS)}"}))
        return 2
    _limit_resources()
    try:
        info = _INSPECTORS[argv[0]](Path(argv[1]))
    except Refused as exc:
        print(json.dumps({"ok": False, "error": str(exc)}))
        return 0
    except MemoryError:
        print(json.dumps({"ok": False, "error": "inspecting it needs more memory than allowed"}))
        return 0
    print(json.dumps({"ok": True, "info": info}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
