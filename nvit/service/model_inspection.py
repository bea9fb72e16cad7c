"""Inspect untrusted uploads in a child process: ONNX models and latency tables.

The server never parses an upload itself. ``python -m nvit.service.model_inspection KIND PATH`` runs in a child with
limits on memory and CPU time (and a wall-clock timeout), prints one JSON line (``{"ok": true, "info":
...}`` or ``{"ok": false, "error": "..."}``) and exits; a parser crash or hang costs the child, not the
server.

ONNX rules: the file parses as an ONNX protobuf and passes ``onnx.checker``; no tensor anywhere refers to
external data (initializers and sparse initializers, tensors and sparse tensors in node attributes, of the
main graph, every subgraph, every ``training_info`` graph and every function); every opset import and every
node is in the standard ONNX domain and names an operator ONNX defines; no model-local functions; exactly
one graph input (float32 or float16, rank 4: images) and one output. A serialized TensorRT engine
(executable code) is not ONNX and never passes. The child runs in an empty folder of its own, so nothing
is ever resolved against the server's working directory.

Tables: the Parquet footer is read first (rows, columns, row groups, uncompressed size, the metadata's
size) and a file whose footer promises more than a table can hold is refused before anything is
decompressed; then :meth:`nvit.lut.table.LatencyTable.load` with its checks, and its base
architecture parsed (a table the predictor cannot read is refused here, not at ``/v1/predict``).

The child's address space is capped: a fixed allowance for the interpreter and its libraries plus a few
times the upload's size, never more than :data:`MAX_MEMORY_BYTES`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from nvit.service.errors import ApiError, unprocessable

STANDARD_DOMAINS = ("", "ai.onnx")
_TIMEOUT_S = 300.0
BASE_MEMORY_BYTES = 768 << 20  # the interpreter with numpy, pandas, pyarrow, onnx, single-threaded (address space)
MEMORY_PER_UPLOAD_BYTE = 3  # a protobuf parse holds the file and its message; a table its columns
MAX_MEMORY_BYTES = 4 << 30
_CPU_LIMIT_S = 300
MEMORY_ENV = "NVIT_INSPECT_MEMORY_BYTES"
#: Bounds a latency table's footer must keep (a grid of a few thousand configurations is a few hundred KiB).
MAX_TABLE_ROWS = 1_000_000
MAX_TABLE_COLUMNS = 64
MAX_TABLE_ROW_GROUPS = 1024
MAX_TABLE_UNCOMPRESSED_BYTES = 64 << 20
MAX_TABLE_META_BYTES = 4 << 20
_SINGLE_THREADED = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


def memory_cap_bytes(size_bytes: int) -> int:
    return min(MAX_MEMORY_BYTES, BASE_MEMORY_BYTES + MEMORY_PER_UPLOAD_BYTE * size_bytes)


def inspect_upload(kind: str, path: str | os.PathLike[str], *, what: str, timeout_s: float = _TIMEOUT_S
                   ) -> dict[str, Any]:
    """Inspect ``path`` in a child process; the facts it found, or an :class:`ApiError` (422) saying why
    the upload is refused."""
    path = Path(path).resolve()
    env = {**os.environ, **_SINGLE_THREADED, MEMORY_ENV: str(memory_cap_bytes(path.stat().st_size))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_package_root(), env.get("PYTHONPATH")]))
    workdir = tempfile.mkdtemp(prefix="nvit-inspect-")  # empty: a relative path resolves to nothing
    try:
        proc = subprocess.run([sys.executable, "-m", "nvit.service.model_inspection", kind, str(path)], cwd=workdir,
                              env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise unprocessable(f"inspecting the {what} took longer than {timeout_s:g} s") from None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
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


def _package_root() -> str:
    """The folder that holds the ``nvit`` package (the child runs elsewhere and must still find it)."""
    return str(Path(__file__).resolve().parents[2])


# ---- in the child -------------------------------------------------------------------------------------
class Refused(Exception):
    """An upload breaks a rule; the message says which."""


def _attribute_tensors(attr: Any) -> Any:
    """Every tensor an attribute holds, whatever its declared type says (a field may be set regardless)."""
    if attr.HasField("t"):
        yield attr.t
    yield from attr.tensors
    for sparse in [*([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []), *attr.sparse_tensors]:
        yield sparse.values
        yield sparse.indices


def _attribute_graphs(attr: Any) -> Any:
    if attr.HasField("g"):
        yield attr.g
    yield from attr.graphs


def _graphs(graph: Any) -> Any:
    """``graph`` and every subgraph inside its nodes' attributes."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in _attribute_graphs(attr):
                yield from _graphs(sub)


def _model_graphs(model: Any) -> Any:
    """Every graph of a model: the main graph, the training graphs, and theirs subgraphs."""
    yield from _graphs(model.graph)
    for info in model.training_info:
        for graph in (info.initialization, info.algorithm):
            yield from _graphs(graph)


def _tensors(graph: Any) -> Any:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            yield from _attribute_tensors(attr)


def _function_tensors(model: Any) -> Any:
    """Tensors inside model-local functions' nodes (and their subgraphs)."""
    for function in model.functions:
        for node in function.node:
            for attr in node.attribute:
                yield from _attribute_tensors(attr)
                for sub in _attribute_graphs(attr):
                    for graph in _graphs(sub):
                        yield from _tensors(graph)
        for attr in function.attribute_proto:
            yield from _attribute_tensors(attr)


def external_tensor(model: Any) -> str | None:
    """The name of the first tensor anywhere in ``model`` that refers to external data (None: none does)."""
    import itertools

    import onnx

    every = itertools.chain(itertools.chain.from_iterable(_tensors(g) for g in _model_graphs(model)),
                            _function_tensors(model))
    for tensor in every:
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
            return tensor.name or "(unnamed)"
    return None


def inspect_onnx(path: Path) -> dict[str, Any]:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError):
        raise Refused("not an ONNX model (it does not parse as an ONNX protobuf)") from None
    if not model.HasField("graph") or not model.opset_import:
        raise Refused("not an ONNX model (no graph or no opset import)")
    external = external_tensor(model)
    if external is not None:
        raise Refused(f"tensor {external!r} refers to external data; only self-contained ONNX files are accepted")
    for opset in model.opset_import:
        if opset.domain not in STANDARD_DOMAINS:
            raise Refused(f"opset domain {opset.domain!r} is not the standard ONNX domain")
    if model.functions:
        raise Refused(f"model-local functions are not accepted ({model.functions[0].domain}::"
                      f"{model.functions[0].name})")
    ops: set[str] = set()
    for graph in _model_graphs(model):
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


def check_parquet_footer(path: Path) -> None:
    """Refuse a Parquet file whose footer promises more than a latency table holds, before decompressing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        footer = pq.read_metadata(path)
    except (pa.ArrowException, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise Refused(f"not a readable Parquet latency table ({first})") from None
    if footer.num_rows > MAX_TABLE_ROWS or footer.num_columns > MAX_TABLE_COLUMNS:
        raise Refused(f"the table has {footer.num_rows} rows and {footer.num_columns} columns (at most "
                      f"{MAX_TABLE_ROWS} and {MAX_TABLE_COLUMNS})")
    if footer.num_row_groups > MAX_TABLE_ROW_GROUPS:
        raise Refused(f"the table has {footer.num_row_groups} row groups (at most {MAX_TABLE_ROW_GROUPS})")
    uncompressed = 0
    for g in range(footer.num_row_groups):
        group = footer.row_group(g)
        uncompressed += sum(max(group.column(c).total_uncompressed_size, 0) for c in range(group.num_columns))
    if uncompressed > MAX_TABLE_UNCOMPRESSED_BYTES:
        raise Refused(f"the table decompresses to {uncompressed} bytes (at most {MAX_TABLE_UNCOMPRESSED_BYTES})")
    meta_bytes = sum(len(k) + len(v) for k, v in (footer.metadata or {}).items())
    if meta_bytes > MAX_TABLE_META_BYTES:
        raise Refused(f"the table's metadata is {meta_bytes} bytes (at most {MAX_TABLE_META_BYTES})")


def inspect_lut(path: Path) -> dict[str, Any]:
    from nvit.arch import ArchSpec
    from nvit.errors import LutError, NvitError
    from nvit.lut.table import LatencyTable

    check_parquet_footer(path)
    try:
        table = LatencyTable.load(path)
    except LutError as exc:
        raise Refused(str(exc).replace(str(path), "the upload")) from None
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise Refused(f"the table cannot be read: {exc!r}"[:300]) from None
    try:
        ArchSpec.from_dict(table.meta.base_arch)  # what the predictor checks architectures against
    except (NvitError, TypeError, ValueError, KeyError, AttributeError) as exc:
        raise Refused(f"the table's base architecture is invalid: {exc}"[:300]) from None
    return {"meta": table.meta.to_dict(), "rows": len(table), "counts": table.counts()}


_INSPECTORS = {"onnx": inspect_onnx, "lut": inspect_lut}


def _limit_resources() -> None:
    import resource

    memory = int(os.environ.get(MEMORY_ENV) or MAX_MEMORY_BYTES)
    for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, _CPU_LIMIT_S)):
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
