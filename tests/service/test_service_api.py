"""The service's HTTP API on a real uvicorn server (random port, SQLite, tokens): authentication and scopes,
upload rules, unknown ids and bad specs (each a clear problem response that changes nothing), immutable
content-addressed tables with queries, predictions and merges, idempotent submits, and the CLI's one-line
errors when the service is down or refuses."""

from __future__ import annotations

import json
import re

import lut_fakes as fk
import onnx
import pytest
import service_env as se
import torch
from cli_run import run_cli
from onnx import TensorProto, helper

from nvit.lut.predictor import LatencyPredictor
from nvit.lut.table import LatencyTable
from nvit.presets import preset
from nvit.profiler.sweep import SweepOptions, run_sweep
from nvit.service.auth import Scope, create_token
from nvit.service.store import Store

PROBLEM = "application/problem+json"
NO_SUCH_SHA = "0" * 64


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A latency table (fake backend: its numbers are an oracle) and an ONNX export of vit_test."""
    from nvit.models import build_model
    from nvit.models.onnx import export_onnx

    folder = tmp_path_factory.mktemp("files")
    with fk.FakeBackend() as backend:
        run_sweep(fk.tiny_space(), backend, folder / "lut.parquet", device=fk.fake_device(),
                  options=SweepOptions(sentinel_every=50, calibration_models=2))
    model = build_model(preset("vit_test"), seed=0).eval()
    export_onnx(model, torch.randn(1, 1, 8, 8), folder / "model.onnx")
    return folder


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    state = root / "state"
    state.mkdir()
    store = Store.open(se.state_db_url(state))
    tokens = {s.value: create_token(store, f"{s.value}-user", [s]) for s in Scope}
    store.close()
    with se.running_server(state, se.env_for(root), "--max-model-mb", "2", "--max-table-mb", "1") as server:
        server.tokens = tokens
        yield server


def problem_of(response) -> dict:
    assert response.headers["content-type"].startswith(PROBLEM), response.text
    body = response.json()
    assert body["status"] == response.status_code and body["detail"] and body["title"]
    return body


def stored_files(state) -> list:
    return [p for p in (state / "blobs").rglob("*") if p.is_file()] + list((state / "tmp").iterdir())


def assert_nothing_stored(service) -> None:
    with service.client(service.tokens["admin"]) as admin:
        assert admin.get("/v1/jobs").json() == [] and admin.get("/v1/luts").json() == []
    assert stored_files(service.state) == []


def test_token_commands_store_only_a_hash(tmp_path, capsys) -> None:
    state = str(tmp_path / "state")
    code, out, err = run_cli(["serve", "token", "create", "--state", state, "--name", "ci", "--scope", "read",
                              "--scope", "submit"], capsys)
    assert code == 0, err
    token = out.strip()
    assert re.fullmatch(r"nvit_[0-9a-f]{12}_[A-Za-z0-9_-]{40,}", token)
    secret = token.split("_", 2)[2]
    assert secret.encode() not in (tmp_path / "state" / "nvit.db").read_bytes()
    code, out, _ = run_cli(["serve", "token", "list", "--state", state], capsys)
    token_id = token.split("_")[1]
    assert code == 0 and token_id in out and "read submit" in out and secret not in out
    code, out, _ = run_cli(["serve", "token", "revoke", token_id, "--state", state], capsys)
    assert code == 0 and "revoked" in out
    code, _, err = run_cli(["serve", "token", "revoke", token_id, "--state", state], capsys)
    assert code == 1 and "no active token" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["serve", "token", "create", "--state", state, "--name", "x", "--scope", "root"], capsys)
    assert code == 1 and "unknown scope 'root'" in err


def test_a_non_loopback_address_without_tokens_is_refused(tmp_path, capsys) -> None:
    code, _, err = run_cli(["serve", "--state", str(tmp_path / "s"), "--host", "0.0.0.0", "--port", "0"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "refusing to listen on 0.0.0.0 without tokens" in lines[0]


def test_calls_without_the_right_token_are_refused_and_change_nothing(service, files) -> None:
    fingerprint = {"kind": "cpu", "cpu": {"model_name": "X", "logical_cores": 1, "available_cores": 1,
                                          "threads_used": None, "platform": "p", "machine": "m",
                                          "python_version": "3"}, "gpu": None, "versions": {}}
    job = {"kind": "measure", "models": [{"name": "m", "arch": "vit_test"}]}
    with service.client() as anonymous, service.client("nvit_0123456789ab_forged") as forged:
        assert anonymous.get("/healthz").json()["status"] == "ok"
        refused = anonymous.get("/v1/luts")
        assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")
        assert "needs a bearer token" in problem_of(refused)["detail"]
        assert "unknown or revoked" in problem_of(forged.post("/v1/jobs", json=job))["detail"]
    cases = [
        ("read", "POST", "/v1/jobs", {"json": job}, "submit"),
        ("agent", "POST", "/v1/jobs", {"json": job}, "submit"),
        ("read", "DELETE", "/v1/jobs/1", {}, "submit"),
        ("read", "POST", "/v1/luts", {"content": (files / "lut.parquet").read_bytes()}, "submit"),
        ("submit", "POST", "/v1/agents", {"json": {"name": "a", "hostname": "h", "fingerprint": fingerprint,
                                                   "backends": ["onnxruntime"]}}, "agent"),
        ("submit", "POST", "/v1/agents/abc/lease", {}, "agent"),
        ("read", "POST", "/v1/jobs/1/heartbeat", {"json": {"agent_id": "a"}}, "agent"),
    ]
    for scope, method, path, kwargs, needed in cases:
        with service.client(service.tokens[scope]) as client:
            response = client.request(method, path, **kwargs)
        assert response.status_code == 403, (scope, path, response.text)
        assert f"lacks the '{needed}' scope" in problem_of(response)["detail"]
    with service.client(service.tokens["read"]) as reader:
        assert reader.get("/v1/devices").status_code == 200 and reader.get("/v1/jobs").json() == []
    assert_nothing_stored(service)


def onnx_variants(tmp_path, good) -> dict[str, bytes]:
    model = onnx.load(str(good))
    onnx.save_model(model, str(tmp_path / "external.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    node = helper.make_node("Evil", ["input"], ["output"], domain="com.example")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 8, 8])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 10])])
    standard = helper.make_opsetid("", 18)
    custom = helper.make_model(graph, opset_imports=[standard, helper.make_opsetid("com.example", 1)])
    undeclared = helper.make_model(graph, opset_imports=[standard])
    return {
        "external data": (tmp_path / "external.onnx").read_bytes(),
        "opset domain 'com.example' is not the standard ONNX domain": custom.SerializeToString(),
        "operator com.example::Evil is not in the standard ONNX domain": undeclared.SerializeToString(),
        "not an ONNX model": b"ftrt" + bytes(range(256)) * 64,  # what a serialized engine looks like to a parser
    }


def test_uploads_that_break_the_rules_are_refused_and_leave_nothing(service, files, tmp_path) -> None:
    good_table = (files / "lut.parquet").read_bytes()
    import pandas as pd

    pd.DataFrame({"a": [1, 2]}).to_parquet(tmp_path / "plain.parquet")
    with service.client(service.tokens["submit"]) as client:
        big = client.post("/v1/models", content=b"\0" * (3 << 20))
        assert big.status_code == 413 and "over the limit" in problem_of(big)["detail"]
        streamed = client.post("/v1/models", content=iter([b"\0" * (1 << 20)] * 3))  # no Content-Length
        assert streamed.status_code == 413, streamed.text
        for why, body in onnx_variants(tmp_path, files / "model.onnx").items():
            response = client.post("/v1/models", content=body)
            assert response.status_code == 422 and why in problem_of(response)["detail"], (why, response.text)
        tables = {"not a readable Parquet": good_table[: len(good_table) // 2],
                  "without nvit LUT metadata": (tmp_path / "plain.parquet").read_bytes()}
        for why, body in tables.items():
            response = client.post("/v1/luts", content=body)
            assert response.status_code == 422 and why in problem_of(response)["detail"], (why, response.text)
        assert client.post("/v1/luts", content=b"\0" * ((1 << 20) + 1)).status_code == 413
        huge_json = client.post("/v1/jobs", content=b" " * (9 << 20), headers={"Content-Type": "application/json"})
        assert huge_json.status_code == 413 and "over the limit" in problem_of(huge_json)["detail"]
        assert "is empty" in problem_of(client.post("/v1/luts", content=b""))["detail"]
    assert_nothing_stored(service)


def test_unknown_ids_and_bad_job_specs_are_clear_errors(service) -> None:
    measure = {"kind": "measure", "models": [{"name": "m", "arch": "vit_test"}]}
    with service.client(service.tokens["admin"]) as client:
        for method, path, status, text in [
            ("GET", "/v1/jobs/999", 404, "no job 999"), ("DELETE", "/v1/jobs/999", 404, "no job 999"),
            ("GET", f"/v1/luts/{NO_SUCH_SHA}", 404, "no table"), ("GET", "/v1/luts/abc", 400, "not a sha256"),
            ("GET", f"/v1/models/{NO_SUCH_SHA}", 404, "no model"),
            ("POST", "/v1/agents/nobody/lease", 404, "no agent nobody"),
        ]:
            response = client.request(method, path)
            assert response.status_code == status and text in problem_of(response)["detail"], path
        heartbeat = client.post("/v1/jobs/999/heartbeat", json={"agent_id": "a"})
        assert heartbeat.status_code == 404
        bad_jobs = [
            ({"kind": "profile", "space": "vit_huge"}, "unknown space preset 'vit_huge'"),
            ({"kind": "profile", "space": "/etc/passwd"}, "unknown space preset"),
            ({"kind": "profile", "space": {"base": "vit_test"}}, "missing key(s)"),
            ({"kind": "profile", "space": "vit_test", "colour": "red"}, "colour: Extra inputs"),
            ({"kind": "profile", "space": "vit_test", "backend": "nope"}, "unknown backend 'nope'"),
            ({"kind": "profile", "space": "vit_test", "backend_options": {"threads": 2}}, "threads are not among"),
            ({"kind": "teleport"}, "kind"),
            ({**measure, "lut": NO_SUCH_SHA}, "no stored table"),
            ({**measure, "models": [{"name": "m", "onnx": NO_SUCH_SHA}]}, "no uploaded ONNX model"),
            ({**measure, "models": [{"name": "m"}]}, "needs an arch, an onnx sha256, or both"),
            ({**measure, "models": [{"name": "m", "arch": {"embed_dim": 8}}]}, "missing key(s): blocks"),
            ({**measure, "models": [{"name": "m", "arch": "vit_test"}] * 2}, "unique"),
        ]
        for body, text in bad_jobs:
            response = client.post("/v1/jobs", json=body)
            assert response.status_code == 422 and text in problem_of(response)["detail"], (body, response.text)
    assert_nothing_stored(service)


def test_tables_are_content_addressed_immutable_queryable_and_mergeable(service, files, tmp_path) -> None:
    path = files / "lut.parquet"
    table = LatencyTable.load(path)
    attn = table.rows["kind"] == "attn"
    shards = [table.with_rows(table.rows[attn]), table.with_rows(table.rows[~attn])]
    other_device = table.with_meta(device_identity={**table.meta.device_identity, "cpu": "Another CPU"})
    for i, t in enumerate([*shards, other_device]):
        t.save(tmp_path / f"t{i}.parquet")
    with service.client(service.tokens["submit"]) as client:
        first = client.post("/v1/luts", content=path.read_bytes())
        again = client.post("/v1/luts", content=path.read_bytes())
        assert first.status_code == 201 and again.status_code == 200 and first.json() == again.json()
        sha = first.json()["sha256"]
        assert first.headers["location"] == f"/v1/luts/{sha}" and first.json()["device"]["name"] == "Test CPU 9000"
        download = client.get(f"/v1/luts/{sha}")
        assert download.content == path.read_bytes() and download.headers["etag"] == f'"{sha}"'
        assert "immutable" in download.headers["cache-control"]
        assert client.get(f"/v1/luts/{sha}", headers={"If-None-Match": f'"{sha}"'}).status_code == 304
        shard_shas = [client.post("/v1/luts", content=(tmp_path / f"t{i}.parquet").read_bytes()).json()["sha256"]
                      for i in range(2)]
        other = client.post("/v1/luts", content=(tmp_path / "t2.parquet").read_bytes()).json()
        assert [r["sha256"] for r in client.get("/v1/luts").json()] == [other["sha256"], *shard_shas[::-1], sha]
        for query, expected in [({"device": "another"}, [other["sha256"]]), ({"backend": "onnxruntime"}, []),
                                ({"device": "test cpu", "space": "tiny", "limit": 1}, [shard_shas[1]]),
                                ({"precision": "fp16"}, []), ({"batch": 1, "device": "cpu", "limit": 2},
                                                              [other["sha256"], shard_shas[1]])]:
            assert [r["sha256"] for r in client.get("/v1/luts", params=query).json()] == expected, query
        meta = client.get(f"/v1/luts/{sha}/meta").json()["meta"]
        assert meta["calibration"] == table.meta.calibration.to_dict()
        spec = preset("vit_test")
        predicted = client.post("/v1/predict", json={"lut": sha, "arch": spec.to_dict()}).json()
        local = LatencyPredictor(table)
        assert predicted["total_ms"] == pytest.approx(local.predict_ms(spec), rel=1e-12)
        assert predicted["blocks_ms"] == pytest.approx(local.block_latencies_ms(spec), rel=1e-12)
        merged = client.post("/v1/luts/merge", json={"luts": shard_shas})
        assert merged.status_code == 201 and merged.json()["rows"] == len(table), merged.text
        merged_table = LatencyTable.load(_save(tmp_path / "m.parquet", client.get(merged.json()["url"]).content))
        assert sorted(merged_table.keys()) == sorted(table.keys())
        refused = client.post("/v1/luts/merge", json={"luts": [sha, other["sha256"]]})
        assert refused.status_code == 422 and "different identity" in problem_of(refused)["detail"]


def _save(path, content: bytes):
    path.write_bytes(content)
    return path


def test_submits_are_idempotent_and_jobs_can_be_cancelled(service) -> None:
    body = {"kind": "measure", "models": [{"name": "m", "arch": "vit_test"}], "backend_options": se.QUICK_BACKEND}
    with service.client(service.tokens["submit"]) as client:
        first = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "same"})
        again = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "same"})
        assert first.status_code == 201 and again.status_code == 200 and again.json()["id"] == first.json()["id"]
        assert first.json()["state"] == "queued" and first.json()["spec"]["backend"] == "onnxruntime"
        other = client.post("/v1/jobs", json={**body, "passes": 3}, headers={"Idempotency-Key": "same"})
        assert other.status_code == 422 and "different request" in problem_of(other)["detail"]
        job_id = first.json()["id"]
        assert client.delete(f"/v1/jobs/{job_id}").json()["state"] == "cancelled"
        assert "already cancelled" in problem_of(client.delete(f"/v1/jobs/{job_id}"))["detail"]
        assert [j["id"] for j in client.get("/v1/jobs", params={"state": "cancelled"}).json()] == [job_id]


def test_the_cli_reports_an_absent_or_refusing_service_in_one_line(service, files, tmp_path, capsys,
                                                                   monkeypatch) -> None:
    monkeypatch.setenv("NVIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("NVIT_TOKEN", raising=False)
    dead = f"http://127.0.0.1:{se.free_port()}"
    with service.client(service.tokens["submit"]) as client:
        sha = client.post("/v1/luts", content=(files / "lut.parquet").read_bytes()).json()["sha256"]
    cases = [
        (["predict", "--lut", f"{dead}/v1/luts/{sha}", "--arch", "vit_test"], "cannot reach the nvit service"),
        (["compare", "vit_test", "--base", "vit_test", "--lut", str(files / "lut.parquet"), "--remote", dead,
          "--out", str(tmp_path / "c")], "cannot reach the nvit service"),
        (["compare", "vit_test", "--lut", str(files / "lut.parquet"), "--remote", dead], "two models are named"),
        (["predict", "--lut", f"{service.url}/v1/luts/{sha}", "--arch", "vit_test"], "needs a bearer token"),
        (["predict", "--lut", f"{service.url}/v1/lut/{sha}", "--arch", "vit_test"], "is not a table URL"),
    ]
    for argv, text in cases:
        code, _, err = run_cli(argv, capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 1 and len(lines) == 1 and text in lines[0], (argv, err)
    monkeypatch.setenv("NVIT_TOKEN", service.tokens["read"])
    for query in (f"/v1/luts/{sha}", "/v1/luts?device=test+cpu&space=tiny"):
        code, out, err = run_cli(["predict", "--lut", service.url + query, "--arch", "vit_test", "--json"], capsys)
        assert code == 0, err
        expected = LatencyPredictor(LatencyTable.load(files / "lut.parquet")).predict_ms(preset("vit_test"))
        assert json.loads(out)["total_ms"] == pytest.approx(expected, rel=1e-12)
    cached = tmp_path / "cache" / "luts" / f"{sha}.parquet"
    assert cached.read_bytes() == (files / "lut.parquet").read_bytes()
    cached.write_bytes(b"tampered")  # a damaged cache entry is fetched again, never used
    code, _, err = run_cli(["predict", "--lut", f"{service.url}/v1/luts/{sha}", "--arch", "vit_test"], capsys)
    assert code == 0, err
    assert cached.read_bytes() == (files / "lut.parquet").read_bytes()
