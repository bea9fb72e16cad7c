"""Real agents (onnxruntime on this CPU) against a real server: a profile end to end (``nvit serve
--local-agent``), pruning and comparing against the service's table, an agent killed mid-profile whose job
another agent finishes without losing or re-measuring a row, and two agents on one device that never measure
at the same time."""

from __future__ import annotations

import itertools
import json
import os
import signal

import service_env as se
import torch
from cli_run import run_cli

from nvit.arch import load_arch_file
from nvit.lut.table import LatencyTable
from nvit.models import build_model
from nvit.models.checkpoint import save_variant
from nvit.presets import preset
from nvit.profiler.space import SearchSpace
from nvit.service.auth import Scope, create_token
from nvit.service.client import file_sha256
from nvit.service.store import Store
from nvit.vocab import PartConfig


def profile_job(**changes) -> dict:
    body = {"kind": "profile", "space": se.SPACE, "calibrate": 1, "sentinel_every": 100,
            "backend_options": se.QUICK_BACKEND}
    body.update(changes)
    return body


def expected_keys() -> list[str]:
    return sorted(c.key for c in SearchSpace.from_dict(se.SPACE).configs())


def parts(lines: list[str]) -> list[dict]:
    return [r for r in map(json.loads, lines) if r.get("type") == "part"]


def test_profile_prune_and_compare_through_the_service(tmp_path, capsys, monkeypatch) -> None:
    env = se.env_for(tmp_path)
    for key in ("NVIT_LOCK_DIR", "NVIT_CACHE_DIR"):
        monkeypatch.setenv(key, env[key])
    space_file = tmp_path / "space.json"
    space_file.write_text(json.dumps(se.SPACE))
    base = tmp_path / "base.pth"
    torch.save(build_model(preset("vit_test"), seed=0).state_dict(), base)
    state = tmp_path / "state"
    state.mkdir()
    store = Store.open(se.state_db_url(state))  # with a token, every call needs one: the local agent gets its own
    token = create_token(store, "ci", [Scope.SUBMIT])
    store.close()
    monkeypatch.setenv("NVIT_TOKEN", token)
    with se.running_server(state, env, "--local-agent") as server:
        code, out, err = run_cli(["profile", "--remote", server.url, "--space", str(space_file), "--threads", "1",
                                  "--calibrate", "1", "--sentinel-every", "100", "--backend-option",
                                  "harness=" + json.dumps(se.QUICK_HARNESS), "--out", str(tmp_path / "lut.parquet")],
                                 capsys)
        assert code == 0, err
        with server.client() as anonymous:
            assert anonymous.get("/v1/jobs/1").status_code == 401
        with server.client(token) as http:
            job = http.get("/v1/jobs/1").json()
            devices = http.get("/v1/devices").json()
        sha = job["result"]["lut"]
        assert job["state"] == "succeeded" and f"/v1/luts/{sha}" in out
        assert [d["agents"][0]["name"] for d in devices] == ["local"] and devices[0]["status"] == "idle"
        agents_table = state / "agent" / "jobs" / "1" / "lut.parquet"
        assert file_sha256(agents_table) == sha == file_sha256(tmp_path / "lut.parquet")
        table = LatencyTable.load(tmp_path / "lut.parquet")
        assert sorted(table.keys()) == expected_keys() and table.meta.backend == "onnxruntime"
        assert table.meta.settings["intra_op_threads"] == 1 and table.meta.calibration is not None

        small = preset("vit_test")
        save_variant(build_model(small.__class__.from_dict({**small.to_dict(), "name": "small", "embed_dim": 48}),
                                 seed=1), tmp_path / "small")
        url = f"{server.url}/v1/luts/{sha}"
        code, out, err = run_cli(["compare", str(tmp_path / "small"), "--lut", url, "--remote", server.url,
                                  "--out", str(tmp_path / "compare")], capsys)
        assert code == 0, err
        report = json.loads((tmp_path / "compare" / "compare.json").read_text())
        assert [r["name"] for r in report["results"]] == ["vit_test", "small"]
        assert all(r["measured_ms"] > 0 and r["predicted_ms"] > 0 for r in report["results"])
        assert report["context"]["remote"]["job"] == 2 and report["context"]["backend"]["intra_op_threads"] == 1
        # the agent watched its machine while it measured; the report's verdict rests on it
        assert report["context"]["conditions"]["verdict"] in ("quiet", "noisy", "unusable")
        assert report["trust"]["machine"] != "not watched"
        assert "measured vs predicted" in out
        # a table whose device is elsewhere: its targets are measured through the service's agent of that device
        import nvit.validation.targets as targets

        monkeypatch.setattr(targets, "_why_not_here", lambda table: "the table's device is elsewhere")
        code, out, err = run_cli(["prune", "--checkpoint", str(base), "--arch", "vit_test", "--lut", url, "--data",
                                  "digits", "--interval", "2", "--pace", "0.1", "--group-size", "16",
                                  "--min-embed-dim", "32", "--batch-size", "16", "--target-ratio", "0.85",
                                  "--no-eval", "--measure-targets", "on", "--out", str(tmp_path / "remote")], capsys)
        assert code == 0, err
        assert "through agent local" in " ".join((out + err).split())
        run = json.loads((tmp_path / "remote" / "prune_run.json").read_text())
        (record, *_) = run["measured_targets"]["records"]
        assert record["measured_ms"] > 0 and record["drift_ratio"] == 1.0 and record["arch"]["embed_dim"] >= 32
        with server.client(token) as http:
            jobs = http.get("/v1/jobs").json()
        assert any(j["kind"] == "measure" and j["spec"]["models"][0]["name"] == "pruned" for j in jobs)
    # with the service gone, auto says the targets are predicted only, and on refuses in one line
    code, out, err = run_cli(["prune", "--checkpoint", str(base), "--arch", "vit_test", "--lut", url, "--data",
                              "digits", "--interval", "2", "--pace", "0.1", "--group-size", "16", "--min-embed-dim",
                              "32", "--batch-size", "16", "--target-ratio", "0.85", "--no-eval", "--measure-targets",
                              "on", "--out", str(tmp_path / "refused")], capsys)
    assert code == 1 and "--measure-targets on: the table's device is elsewhere; the service cannot say" in err
    monkeypatch.undo()
    monkeypatch.setenv("NVIT_CACHE_DIR", env["NVIT_CACHE_DIR"])
    monkeypatch.setenv("NVIT_LOCK_DIR", env["NVIT_LOCK_DIR"])
    # The server stopped its agent and cleaned up; the table is cached: pruning against its URL needs no server.
    assert server.proc.returncode == 0 and not (state / "server.json").exists()
    monkeypatch.delenv("NVIT_TOKEN", raising=False)
    out_dir = tmp_path / "pruned"
    code, out, err = run_cli(["prune", "--checkpoint", str(base), "--arch", "vit_test", "--lut", url, "--data",
                              "digits", "--interval", "2", "--pace", "0.1", "--group-size", "16",
                              "--min-embed-dim", "32", "--batch-size", "16", "--target-ratio", "0.85", "--no-eval",
                              "--out", str(out_dir)], capsys)
    assert code == 0, err
    spec, prov = load_arch_file(out_dir / "ratio_0.85" / "arch.json")
    assert prov["lut"]["sha256"] == sha and spec.num_params() < small.num_params()


def test_a_killed_agents_job_is_finished_by_another_without_losing_or_repeating_rows(tmp_path) -> None:
    env = se.env_for(tmp_path)
    with se.running_server(tmp_path / "state", env, "--lease-s", "3") as server, server.client() as http:
        job_id = http.post("/v1/jobs", json=profile_job(calibrate=0)).json()["id"]
        with se.running_agent(server.url, tmp_path / "a", env, "a") as first:
            se.wait_for(lambda: len(parts(http.get(f"/v1/jobs/{job_id}/journal").json()["lines"])) >= 4,
                        timeout_s=180, what="the first agent to measure four configurations")
            worker = str(tmp_path / "a" / "jobs")
            assert se.processes_running(worker)  # the job runs in the agent's child process
            os.kill(first.pid, signal.SIGKILL)
            first.wait()
            se.wait_for(lambda: not se.processes_running(worker), timeout_s=10,
                        what="the killed agent's worker to die with it")
        lines = http.get(f"/v1/jobs/{job_id}/journal").json()["lines"]
        uploaded = parts(lines)
        whole = [r for r in map(json.loads, lines) if r.get("type") in ("model", "check")]  # timed before the parts
        local_journal = tmp_path / "a" / "jobs" / str(job_id) / "lut.parquet.journal.jsonl"
        measured_by_first = parts(local_journal.read_text().splitlines())
        assert len(measured_by_first) - len(uploaded) <= 1  # at most the row in flight is not on the server
        assert measured_by_first[: len(uploaded)] == uploaded
        requeued = se.wait_job(http, job_id, timeout_s=30, states=("queued",))
        assert requeued["attempts"] == 1 and requeued["agent_id"] is None
        with se.running_agent(server.url, tmp_path / "b", env, "b"):
            done = se.wait_job(http, job_id)
        assert done["state"] == "succeeded", done["error"]
        assert done["attempts"] == 2 and done["result"]["resumed"] == len(uploaded) + len(whole)
        journal = parts(http.get(f"/v1/jobs/{job_id}/journal").json()["lines"])
        keys = [PartConfig(**r["config"]).key for r in journal]
        assert sorted(keys) == expected_keys()  # every configuration measured exactly once
        assert journal[: len(uploaded)] == uploaded
        table = LatencyTable.load(tmp_path / "b" / "jobs" / str(job_id) / "lut.parquet")
        assert done["result"]["lut"] == file_sha256(tmp_path / "b" / "jobs" / str(job_id) / "lut.parquet")
        by_key = {PartConfig(**r["config"]).key: r["stats"]["latency_ms_median"] for r in journal}
        for row in table.rows.itertuples():
            key = PartConfig(row.kind, row.embed_dim, row.heads, row.qk_dim, row.v_dim, row.mlp_dim).key
            assert row.latency_ms_median == by_key[key]  # the first agent's rows are in the table as measured


def test_two_agents_on_one_device_never_measure_at_the_same_time(tmp_path) -> None:
    env = se.env_for(tmp_path)
    body = {"kind": "measure", "models": [{"name": "m", "arch": "vit_test"}], "passes": 1,
            "backend_options": se.QUICK_BACKEND}
    with se.running_server(tmp_path / "state", env) as server, server.client() as http:
        ids = [http.post("/v1/jobs", json={**body, "models": [{"name": f"m{i}", "arch": "vit_test"}]}).json()["id"]
               for i in range(3)]
        with se.running_agent(server.url, tmp_path / "a", env, "a") as a, \
                se.running_agent(server.url, tmp_path / "b", env, "b") as b:
            jobs = [se.wait_job(http, i) for i in ids]
            # A job cancelled while it runs stops its worker at the next heartbeat; the agent carries on.
            profile = http.post("/v1/jobs", json=profile_job()).json()["id"]
            se.wait_job(http, profile, timeout_s=120, states=("running",))
            assert http.delete(f"/v1/jobs/{profile}").json()["state"] == "cancelled"
            se.wait_for(lambda: not se.processes_running(f"/jobs/{profile} "), timeout_s=20,
                        what="the cancelled job's worker to stop")
            assert a.poll() is None and b.poll() is None
    assert all(j["state"] == "succeeded" for j in jobs), [j["error"] for j in jobs]
    results = [j["result"] for j in jobs]
    assert {r["agent"]["name"] for r in results} == {"a", "b"}  # both agents took work
    intervals = sorted((r["worker_started_at"], r["worker_finished_at"]) for r in results)
    for (_, end), (start, _) in itertools.pairwise(intervals):
        assert start >= end, intervals
    for r in results:
        assert r["worker_started_at"] <= r["measure_started_at"] < r["measure_finished_at"] <= r["worker_finished_at"]
        assert r["models"][0]["stats"]["latency_ms_median"] > 0 and r["context"]["backend"]["intra_op_threads"] == 1
        assert r["context"]["conditions"]["verdict"] in ("quiet", "noisy", "unusable")
