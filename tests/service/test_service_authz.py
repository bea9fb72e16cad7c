"""Who may do what, tried the way an attacker or a careless client would, against real servers on 127.0.0.1:
anonymous access decided on every request, web pages kept from writing (cross-site, text/plain, DNS
rebinding), jobs owned by their submitter, idempotency keys per token, agents bound to their token and acting
only on their leases, and a profile job's table that must be what it claims to be."""

from __future__ import annotations

import contextlib
import time

import lut_fakes as fk
import pytest
import service_env as se

from nvit.lut.table import LatencyTable
from nvit.profiler.sweep import SweepOptions, run_sweep
from nvit.service.app import create_app
from nvit.service.auth import Scope, create_token
from nvit.service.config import ServiceSettings
from nvit.service.store import Store, sqlite_url

PROBLEM = "application/problem+json"
TOKENS = {"submit-a": [Scope.SUBMIT], "submit-b": [Scope.SUBMIT], "agent-a": [Scope.AGENT],
          "agent-b": [Scope.AGENT], "admin": [Scope.ADMIN]}
MEASURE = {"kind": "measure", "models": [{"name": "m", "arch": "vit_test"}], "backend_options": se.QUICK_BACKEND}


def problem_of(response) -> dict:
    assert response.headers["content-type"].startswith(PROBLEM), response.text
    body = response.json()
    assert body["status"] == response.status_code and body["detail"]
    return body


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """A table of the tiny space as an onnxruntime profile job on the fake CPU would make it, and mislabelled
    variants of it (each a file)."""
    folder = tmp_path_factory.mktemp("tables")
    with fk.FakeBackend() as backend:
        run_sweep(fk.tiny_space(), backend, folder / "raw.parquet", device=fk.fake_device(),
                  options=SweepOptions(sentinel_every=50, calibration_models=2))
    honest = LatencyTable.load(folder / "raw.parquet").with_meta(backend="onnxruntime")
    identity = honest.meta.device_identity
    variants = {
        "honest": honest,
        "device": honest.with_meta(device_identity={**identity, "cpu": "Another CPU"}),
        "backend": honest.with_meta(backend="torch"),
        "precision": honest.with_meta(precision="fp16"),
        "batch size": honest.with_meta(batch_size=2),
        "token count": honest.with_meta(num_tokens=50),
        "space": honest.with_meta(protocol={**honest.meta.protocol, "space_fingerprint": "0" * 16}),
    }
    for name, table in variants.items():
        table.save(folder / f"{name.replace(' ', '_')}.parquet")
    return {name: (folder / f"{name.replace(' ', '_')}.parquet").read_bytes() for name in variants}


@contextlib.contextmanager
def tokened_server(root):
    state = root / "state"
    state.mkdir(parents=True)
    store = Store.open(se.state_db_url(state))
    tokens = {name: create_token(store, name, scopes) for name, scopes in TOKENS.items()}
    store.close()
    with se.running_server(state, se.env_for(root)) as server:
        clients = {name: server.client(token) for name, token in tokens.items()}
        try:
            yield server, clients
        finally:
            for c in clients.values():
                c.close()


def register(client, cpu: str = "Test CPU 9000") -> str:
    fingerprint = fk.fake_device(cpu).to_dict()
    response = client.post("/v1/agents", json={"name": "a", "hostname": "h", "fingerprint": fingerprint,
                                               "backends": ["onnxruntime"]})
    assert response.status_code == 201, response.text
    return response.json()["id"]


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_anonymous_access_is_decided_on_every_request(tmp_path) -> None:
    """Revoking the last token of a server on 0.0.0.0 locks it; a loopback server answers anonymous calls only
    on its loopback address. (In-process: no socket on anything but loopback.)"""
    from fastapi.testclient import TestClient

    store = Store.open(sqlite_url(tmp_path))
    token = create_token(store, "only", [Scope.READ])
    token_id = token.split("_")[1]
    everywhere = create_app(ServiceSettings(state_dir=tmp_path, listen_host="0.0.0.0"))
    with TestClient(everywhere, base_url="http://192.0.2.10:8787") as client:
        assert client.get("/v1/luts").status_code == 401
        assert client.get("/v1/luts", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert store.revoke_token(token_id, time.time())
        time.sleep(1.2)  # past the token count's cache
        anonymous = client.get("/v1/luts")
        assert anonymous.status_code == 401 and "bearer token" in problem_of(anonymous)["detail"]
        assert client.get("/v1/luts", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    store.close()
    loopback = create_app(ServiceSettings(state_dir=tmp_path, listen_host="127.0.0.1"))
    with TestClient(loopback, base_url="http://192.0.2.10:8787") as client:
        # no active token, loopback server, but the call came in on another address
        assert client.get("/v1/luts", headers={"Host": "localhost"}).status_code == 401
    with TestClient(loopback, base_url="http://127.0.0.1:8787") as client:
        assert client.get("/v1/luts").status_code == 200


def test_web_pages_cannot_write_to_or_rebind_an_anonymous_loopback_server(tmp_path, tables) -> None:
    with se.running_server(tmp_path / "state", se.env_for(tmp_path)) as server, server.client() as http:
        port = server.url.rsplit(":", 1)[1]
        table = tables["device"]  # what a page would plant: a table claiming another device
        attacks = [
            ({"Content-Type": "text/plain"}, 415),  # a simple request: no CORS preflight
            ({"Content-Type": "application/x-www-form-urlencoded"}, 415),
            ({"Content-Type": "multipart/form-data; boundary=x"}, 415),
            ({"Origin": "http://evil.example"}, 403),
            ({"Origin": "null"}, 403),
            ({"Sec-Fetch-Site": "cross-site"}, 403),
            ({"Sec-Fetch-Site": "same-site"}, 403),
            ({"Host": f"rebound.evil.example:{port}"}, 403),  # DNS rebinding: the page's name, our address
        ]
        for headers, status in attacks:
            response = http.post("/v1/luts", content=table, headers=headers)
            assert response.status_code == status, (headers, response.text)
            problem_of(response)
        assert http.get("/v1/luts", headers={"Host": f"rebound.evil.example:{port}"}).status_code == 403
        bodiless = http.post("/v1/agents/abc/lease", headers={"Origin": "http://evil.example"})
        assert bodiless.status_code == 403
        as_text = http.post("/v1/jobs", content=b'{"kind": "measure", "models": [{"name": "m", "arch": "vit_test"}]}',
                            headers={"Content-Type": "text/plain"})
        assert as_text.status_code == 415 and "application/json" in problem_of(as_text)["detail"]
        assert http.get("/v1/luts").json() == [] and http.get("/v1/jobs").json() == []
        # this machine's own pages and clients are not refused
        same_origin = http.post("/v1/luts", content=tables["honest"], headers={
            "Origin": f"http://localhost:{port}", "Sec-Fetch-Site": "same-origin",
            "Content-Type": "application/octet-stream"})
        assert same_origin.status_code == 201, same_origin.text
        assert [t["sha256"] for t in http.get("/v1/luts", params={"device": "cpu"}).json()] == [
            same_origin.json()["sha256"]]


def test_jobs_belong_to_their_submitter_and_idempotency_keys_to_their_token(tmp_path) -> None:
    with tokened_server(tmp_path) as (_, c):
        mine = c["submit-a"].post("/v1/jobs", json=MEASURE, headers={"Idempotency-Key": "k"}).json()
        theirs = c["submit-b"].post("/v1/jobs", json={**MEASURE, "passes": 3}, headers={"Idempotency-Key": "k"})
        assert theirs.status_code == 201 and theirs.json()["id"] != mine["id"]  # the same key, another token
        again = c["submit-b"].post("/v1/jobs", json={**MEASURE, "passes": 3}, headers={"Idempotency-Key": "k"})
        assert again.status_code == 200 and again.json()["id"] == theirs.json()["id"]
        refused = c["submit-b"].delete(f"/v1/jobs/{mine['id']}")
        assert refused.status_code == 403 and "another token" in problem_of(refused)["detail"]
        assert c["submit-a"].get(f"/v1/jobs/{mine['id']}").json()["state"] == "queued"
        assert c["submit-a"].delete(f"/v1/jobs/{mine['id']}").json()["state"] == "cancelled"
        assert c["admin"].delete(f"/v1/jobs/{theirs.json()['id']}").json()["state"] == "cancelled"


def test_agents_act_only_with_their_token_and_on_their_leases(tmp_path) -> None:
    with tokened_server(tmp_path) as (_, c):
        a, b = register(c["agent-a"]), register(c["agent-b"])
        job = c["submit-a"].post("/v1/jobs", json=MEASURE).json()["id"]
        leased = c["agent-a"].post(f"/v1/agents/{a}/lease", params={"wait_s": 5})
        assert leased.status_code == 200 and leased.json()["job"]["id"] == job
        # agent-b's token, agent a's id: every call refused, nothing changed
        for method, path, body in [("POST", f"/v1/agents/{a}/lease", None),
                                   ("POST", f"/v1/jobs/{job}/heartbeat", {"agent_id": a}),
                                   ("POST", f"/v1/jobs/{job}/fail", {"agent_id": a, "error": "sabotage"}),
                                   ("POST", f"/v1/jobs/{job}/release", {"agent_id": a}),
                                   ("POST", f"/v1/jobs/{job}/journal", {"agent_id": a, "start": 0, "lines": []})]:
            response = c["agent-b"].request(method, path, json=body)
            assert response.status_code == 403 and "another token" in problem_of(response)["detail"], path
        # agent-b's own agent: not its lease
        stolen = c["agent-b"].post(f"/v1/jobs/{job}/fail", json={"agent_id": b, "error": "sabotage"})
        assert stolen.status_code == 409 and "lease lost" in problem_of(stolen)["detail"]
        state = c["submit-a"].get(f"/v1/jobs/{job}").json()
        assert state["state"] == "leased" and state["agent_id"] == a and state["error"] is None
        assert c["agent-a"].post(f"/v1/jobs/{job}/heartbeat", json={"agent_id": a}).status_code == 200
        # a measure result must time the job's models on the leasing agent's device, with sane figures
        good = fk.stats(0.5).as_dict()
        models = [{"name": "m", "stats": good, "predicted_ms": 0.4}]
        here = fk.fake_device().to_dict()

        def one(stats=None, **fields):
            return {"models": [{"name": "m", "stats": {**good, **(stats or {})}, **fields}], "device": here}

        for result, text in [({"models": models, "device": fk.fake_device("Another CPU").to_dict()}, "Another CPU"),
                             ({"models": models}, "not given"),
                             ({"models": [], "device": here}, "one each: m"),
                             (one({"latency_ms_median": -1.0}), "latency_ms_median must be a finite latency"),
                             (one({"latency_ms_p90": "fast"}), "latency_ms_p90 must be a finite latency"),
                             (one({"latency_ms_p99": 1e9}), "latency_ms_p99 must be a finite latency"),
                             (one({"cov": -0.1}), "cov must be a finite number"),
                             (one({"n_samples": 2.5}), "n_samples must be an integer"),
                             (one({"n_samples": True}), "n_samples must be an integer"),
                             (one({"latency_ms_p10": 0.9}), "quantiles are out of order"),
                             (one({"gpu_secret": 1}), "unknown timing field"),
                             (one({"stop_reason": "bribed"}), "stop_reason must be one of"),
                             (one(predicted_ms=0.0), "predicted_ms must be a finite latency"),
                             ({"models": [{"name": "m", "stats": [1, 2]}], "device": here}, "not an object"),
                             (one({"latency_ms_std": None}), "latency_ms_std must be a finite number")]:
            response = c["agent-a"].post(f"/v1/jobs/{job}/complete", json={"agent_id": a, "result": result})
            assert response.status_code == 422 and text in problem_of(response)["detail"], result
        done = c["agent-a"].post(f"/v1/jobs/{job}/complete", json={"agent_id": a, "result": {
            "models": models, "device": fk.fake_device().to_dict()}})
        assert done.status_code == 200 and done.json()["state"] == "succeeded"


def test_a_profile_jobs_table_must_be_what_the_job_asked_for_from_the_agents_device(tmp_path, tables) -> None:
    with tokened_server(tmp_path) as (_, c):
        planted = c["submit-b"].post("/v1/luts", content=tables["device"]).json()["sha256"]  # any stored table
        agent = register(c["agent-a"])
        body = {"kind": "profile", "space": fk.tiny_space().to_dict(), "backend": "onnxruntime"}
        job = c["submit-a"].post("/v1/jobs", json=body).json()["id"]
        assert c["agent-a"].post(f"/v1/agents/{agent}/lease", params={"wait_s": 5}).json()["job"]["id"] == job
        route = f"/v1/jobs/{job}/table"
        for what in ("device", "backend", "precision", "batch size", "token count", "space"):
            response = c["agent-a"].post(route, params={"agent_id": agent}, content=tables[what])
            assert response.status_code == 422 and f"table's {what} is" in problem_of(response)["detail"], what
        for result in ({"lut": planted}, {"lut": "f" * 64}):
            response = c["agent-a"].post(f"/v1/jobs/{job}/complete", json={"agent_id": agent, "result": result})
            assert response.status_code == 422 and "only with the table uploaded" in problem_of(response)["detail"]
        assert [t["sha256"] for t in c["admin"].get("/v1/luts").json()] == [planted]  # nothing else stored
        honest = c["agent-a"].post(route, params={"agent_id": agent}, content=tables["honest"])
        assert honest.status_code == 201, honest.text
        sha = honest.json()["sha256"]
        response = c["agent-a"].post(f"/v1/jobs/{job}/complete", json={"agent_id": agent, "result": {"lut": planted}})
        assert response.status_code == 422  # still not another table
        done = c["agent-a"].post(f"/v1/jobs/{job}/complete", json={"agent_id": agent, "result": {"lut": sha}})
        assert done.status_code == 200 and done.json()["state"] == "succeeded"
        listed = c["admin"].get("/v1/luts", params={"device": "test cpu 9000"}).json()
        assert [t["sha256"] for t in listed] == [sha] and listed[0]["source"] == f"job {job}"
