"""Every input typed and bounded at the edge, against a real server: ids and filters beyond 64 bits, job specs
with NaN, infinities, strings for numbers, huge thread counts, negative seeds or the agent's own options, table
metadata of the wrong types (refused before anything is stored: no orphan file or row), LIKE wildcards taken
literally, chunked bodies over the limit, and uploads that hide external data or decompress to far more than
they weigh. Each is a 4xx problem document, never a 500."""

from __future__ import annotations

import json

import lut_fakes as fk
import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import service_env as se
from onnx import TensorProto, helper

from nvit.lut.meta import META_KEY
from nvit.profiler.sweep import SweepOptions, run_sweep
from nvit.service.store import Store, sqlite_url

PROBLEM = "application/problem+json"
MEASURE = {"kind": "measure", "models": [{"name": "m", "arch": "vit_test"}]}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("bounds")
    # the server's working folder holds the file a relative external-data reference names
    (root / "weights.bin").write_bytes(b"\0" * 4)
    with se.running_server(root / "state", se.env_for(root), "--max-table-mb", "1", cwd=root) as server:
        yield server


@pytest.fixture(scope="module")
def table_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("t") / "lut.parquet"
    with fk.FakeBackend() as backend:
        run_sweep(fk.tiny_space(), backend, path, device=fk.fake_device(),
                  options=SweepOptions(sentinel_every=50, calibration_models=2))
    return path


def problem_of(response) -> dict:
    assert response.headers["content-type"].startswith(PROBLEM), response.text
    body = response.json()
    assert body["status"] == response.status_code and body["detail"]
    return body


def refused(response, status: int = 422, text: str = "") -> None:
    assert response.status_code == status, response.text
    assert text in problem_of(response)["detail"], response.text


def stored(server) -> tuple[list, int, int]:
    """Files under blobs/ and tmp/, blob rows, table rows."""
    files = [p for p in (server.state / "blobs").rglob("*") if p.is_file()] + list((server.state / "tmp").iterdir())
    store = Store.open(sqlite_url(server.state))
    try:
        with store.read() as conn:
            counts = [conn.exec_driver_sql(f"SELECT count(*) FROM {t}").scalar() for t in ("blobs", "luts")]
    finally:
        store.close()
    return files, counts[0], counts[1]


def with_meta(path, out, **changes) -> bytes:
    """The table at ``path`` with its metadata changed (any JSON at all: what a forger writes)."""
    arrow = pq.read_table(path)
    meta = json.loads(arrow.schema.metadata[META_KEY])
    for key, value in changes.items():
        meta[key] = value
    pq.write_table(arrow.replace_schema_metadata({META_KEY: json.dumps(meta)}), out)
    return out.read_bytes()


def test_ids_and_filters_beyond_64_bits_are_refused_not_crashed(service) -> None:
    with service.client() as http:
        for path in ("/v1/jobs/99999999999999999999", "/v1/jobs/-1", "/v1/jobs/0", "/v1/jobs/1e3",
                     "/v1/jobs/99999999999999999999/journal"):
            refused(http.get(path), 422)
        refused(http.delete("/v1/jobs/99999999999999999999"), 422)
        for big in (2**63 - 1, 2**31):  # within 64 bits but beyond any id the database holds
            refused(http.get(f"/v1/jobs/{big}"), 404, f"no job {big}")
        for params in ({"batch": "99999999999999999999"}, {"batch": str(2**40)}, {"limit": "1e400"},
                       {"device": "x" * 1000}):
            refused(http.get("/v1/luts", params=params), 422)
        refused(http.post("/v1/agents/abc/lease", params={"wait_s": "nan"}), 422)
        refused(http.post("/v1/jobs/99999999999999999999/heartbeat", json={"agent_id": "a"}), 422)


def test_job_specs_with_bad_numbers_or_the_agents_own_options_are_refused(service) -> None:
    raw = '{"kind": "measure", "models": [{"name": "m", "arch": "vit_test"}], "backend_options": %s}'
    cases = [
        (raw % '{"harness": {"warmup_s": NaN}}', "warmup_s"),
        (raw % '{"harness": {"time_cap_s": Infinity}}', "time_cap_s"),
        (raw % '{"harness": {"time_cap_s": "0.1"}}', "time_cap_s"),
        (raw % '{"harness": {"repeats": 1.5}}', "repeats"),
        (raw % '{"intra_op_threads": 18446744073709551616}', "intra_op_threads"),
        (raw % '{"intra_op_threads": 100000}', "intra_op_threads"),
        (raw % '{"cache_dir": "/etc"}', "belong to the agent's machine"),
        (raw % '{"cuda_index": 3}', "belong to the agent's machine"),
        ('{"kind": "profile", "space": "vit_test", "seed": -1}', "seed"),
        ('{"kind": "profile", "space": "vit_test", "seed": 18446744073709551616}', "seed"),
        ('{"kind": "profile", "space": "vit_test", "calibrate": "8"}', "calibrate"),
        ('{"kind": "measure", "models": [{"name": "m", "arch": {"embed_dim": 1e999, "blocks": []}}]}', "arch"),
        ('{"kind": "measure", "models": [{"name": "m", "arch": "vit_test"}], "passes": NaN}', "passes"),
    ]
    with service.client() as http:
        for body, text in cases:
            refused(http.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"}), 422, text)
        huge = {"embed_dim": 1 << 20, "blocks": [{"heads": 1, "qk_dim": 8, "v_dim": 8, "mlp_dim": 8}]}
        refused(http.post("/v1/jobs", json={**MEASURE, "models": [{"name": "m", "arch": huge}]}), 422, "a width of")
        space = {**fk.tiny_space().to_dict(), "mlp_dims": [64, 1 << 20]}
        refused(http.post("/v1/jobs", json={"kind": "profile", "space": space}), 422, "beyond the service's bounds")
        refused(http.post("/v1/predict", content='{"lut": "%s", "arch": {"embed_dim": NaN}}' % ("0" * 64),
                          headers={"Content-Type": "application/json"}), 422)
        assert http.get("/v1/jobs").json() == []
        # the bounded options still go through, typed as given
        ok = http.post("/v1/jobs", json={**MEASURE, "backend_options": se.QUICK_BACKEND})
        assert ok.status_code == 201 and ok.json()["spec"]["backend_options"] == se.QUICK_BACKEND
        http.delete(f"/v1/jobs/{ok.json()['id']}")


def test_table_metadata_of_the_wrong_types_is_refused_before_anything_is_stored(service, table_file,
                                                                                 tmp_path) -> None:
    identity = json.loads(pq.read_table(table_file).schema.metadata[META_KEY])["device_identity"]
    forged = {
        "backend": {"name": "x"}, "device_identity": ["cpu"], "protocol": "x", "batch_size": 10**20,
        "num_tokens": 2**40, "calibration": {"scale": "big", "offset_ms": 0}, "precision": ["fp32"],
        "device_kind": "cuda", "space": {"name": {"a": 1}}, "versions": {"torch": 3}, "created_at": 5,
        "base_arch": {"embed_dim": 8}, "sentinel": {"a": 1},
    }
    with service.client() as http:
        before = stored(service)
        for key, value in forged.items():
            body = with_meta(table_file, tmp_path / f"{key}.parquet", **{key: value})
            response = http.post("/v1/luts", content=body)
            assert response.status_code == 422, (key, response.text)
            problem_of(response)
        body = with_meta(table_file, tmp_path / "cal.parquet", calibration={"scale": 1e308 * 10, "offset_ms": 0})
        refused(http.post("/v1/luts", content=body), 422)
        body = with_meta(table_file, tmp_path / "id.parquet", device_identity={**identity, "threads_used": "1"})
        refused(http.post("/v1/luts", content=body), 422, "threads_used")
        assert stored(service) == before  # no file, no blob row, no table row
        good = http.post("/v1/luts", content=table_file.read_bytes())
        assert good.status_code in (200, 201)
        sha = good.json()["sha256"]
        predicted = http.post("/v1/predict", json={"lut": sha, "arch": "vit_test"})
        assert predicted.status_code == 200 and predicted.json()["total_ms"] > 0


def test_like_wildcards_in_filters_match_only_themselves(service, table_file) -> None:
    with service.client() as http:
        sha = http.post("/v1/luts", content=table_file.read_bytes()).json()["sha256"]
        for wildcard in ("%", "_", "test%9000", "t_st", "\\"):
            assert http.get("/v1/luts", params={"device": wildcard}).json() == [], wildcard
        assert [t["sha256"] for t in http.get("/v1/luts", params={"device": "cpu 9"}).json()] == [sha]


def test_bodies_over_the_limit_are_413_even_when_chunked(service) -> None:
    with service.client() as http:
        jobs = len(http.get("/v1/jobs").json())
        chunked = http.post("/v1/jobs", content=iter([b" " * (1 << 20)] * 9),
                            headers={"Content-Type": "application/json"})
        refused(chunked, 413, "over the limit")
        table = http.post("/v1/luts", content=iter([b"\0" * (1 << 19)] * 3))
        refused(table, 413, "over the limit")
        assert len(http.get("/v1/jobs").json()) == jobs and list((service.state / "tmp").iterdir()) == []


def _model(nodes, *, training=None, inputs=None) -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 8, 8])
    graph = helper.make_graph(nodes, "g", inputs or [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    if training is not None:
        model.training_info.append(training)
    return model.SerializeToString()


def _external(name: str) -> onnx.TensorProto:
    tensor = helper.make_tensor(name, TensorProto.FLOAT, [1], [1.0])
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="weights.bin")  # relative: the server's folder if resolved
    return tensor


def test_onnx_external_data_is_found_wherever_it_hides(service, tmp_path) -> None:
    sparse = onnx.SparseTensorProto(values=_external("sparse_values"),
                                    indices=helper.make_tensor("i", TensorProto.INT64, [1], [0]), dims=[1])
    in_attribute = helper.make_node("Constant", [], ["c"], sparse_value=sparse)
    add = helper.make_node("Identity", ["x"], ["y"])
    training = onnx.TrainingInfoProto(initialization=helper.make_graph(
        [helper.make_node("Constant", [], ["w"], value=_external("train_weight"))], "init", [], []))
    branch = helper.make_graph([helper.make_node("Constant", [], ["k"], value=_external("deep"))], "b", [],
                               [helper.make_tensor_value_info("k", TensorProto.FLOAT, [1])])
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    nested = helper.make_node("If", ["cond"], ["k"], then_branch=branch, else_branch=branch)
    cases = {
        "sparse_values": _model([in_attribute, add]),
        "train_weight": _model([add], training=training),
        "deep": _model([nested, add], inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8]),
                                              cond]),
    }
    assert (service.state.parent / "weights.bin").is_file()  # the server's folder: never looked at
    before = stored(service)
    with service.client() as http:
        for name, body in cases.items():
            refused(http.post("/v1/models", content=body), 422, f"tensor {name!r} refers to external data")
    assert stored(service) == before


def test_a_parquet_bomb_is_refused_from_its_footer(service, tmp_path) -> None:
    """Half a megabyte that decompresses to 800 MB: refused before any page is read."""
    bomb = tmp_path / "bomb.parquet"
    pq.write_table(pa.table({"x": pa.array(np.zeros(100_000_000, dtype=np.int64))}), bomb, compression="zstd",
                   row_group_size=100_000_000)
    wide, dictionary = tmp_path / "wide.parquet", tmp_path / "dictionary.parquet"
    strings = pa.table({"s": pa.array(["a" * (1 << 20)] * 80)})
    pq.write_table(strings, wide, compression="zstd", use_dictionary=False)
    # dictionary-encoded, the footer honestly says 1 MB: decoding it to 80 MB hits the inspector's memory cap
    pq.write_table(strings, dictionary, compression="zstd")
    assert all(p.stat().st_size < 1 << 20 for p in (bomb, wide, dictionary))
    with service.client() as http:
        refused(http.post("/v1/luts", content=bomb.read_bytes()), 422, "100000000 rows")
        refused(http.post("/v1/luts", content=wide.read_bytes()), 422, "decompresses to")
        refused(http.post("/v1/luts", content=dictionary.read_bytes()), 422, "is refused")
