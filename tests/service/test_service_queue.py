"""The job queue on SQLite and on a real PostgreSQL server: idempotent submit, routing, one lease per job under
concurrency, heartbeats, expiry and requeue, journal uploads, cancel and release, and a server restart with
queued and leased jobs that loses nothing."""

from __future__ import annotations

import threading

import pytest
import service_env as se

from nvit.service.errors import ApiError
from nvit.service.queue import JobKind, JobQueue, JobState, NewJob
from nvit.service.store import Store, sqlite_url

CPU_AGENT = {"id": "a1", "device_kind": "cpu", "device_name": "Test CPU 9000", "backends": ["onnxruntime", "torch"]}


@pytest.fixture(scope="module")
def postgres():
    with se.postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return sqlite_url(tmp_path)
    server = request.getfixturevalue("postgres")
    return se.fresh_database(server, f"q_{request.node.name.split('[')[0][-40:]}".lower())


def job(n: int = 0, **changes) -> NewJob:
    kwargs = dict(kind=JobKind.MEASURE, spec={"n": n}, device_kind="cpu", backend="onnxruntime")
    kwargs.update(changes)
    return NewJob(**kwargs)


def test_submit_is_idempotent_and_a_reused_key_with_another_request_is_refused(db_url) -> None:
    store = Store.open(db_url)
    queue = JobQueue(store, lease_s=10)
    first, created = queue.submit(job(1), now=1.0, idempotency_key="k")
    again, created_again = queue.submit(job(1), now=2.0, idempotency_key="k")
    assert created and not created_again and again["id"] == first["id"]
    with pytest.raises(ApiError) as refused:
        queue.submit(job(2), now=3.0, idempotency_key="k")
    assert refused.value.status == 422 and "different request" in refused.value.detail
    other, _ = queue.submit(job(2), now=4.0)
    assert other["id"] != first["id"] and len(queue.list()) == 2
    store.close()


def test_lease_routes_by_device_and_backend_and_hands_out_the_oldest_first(db_url) -> None:
    store = Store.open(db_url)
    queue = JobQueue(store, lease_s=10)
    gpu = queue.submit(job(0, device_kind="cuda", backend="tensorrt"), now=0.0)[0]
    other_cpu = queue.submit(job(1, device_name="Another CPU"), now=1.0)[0]
    trt = queue.submit(job(2, backend="tensorrt"), now=2.0)[0]
    mine = queue.submit(job(3, device_name="test cpu 9000"), now=3.0)[0]
    anyone = queue.submit(job(4), now=4.0)[0]
    order = [queue.lease(CPU_AGENT, now=10.0)["id"] for _ in range(2)]
    assert order == [mine["id"], anyone["id"]] and queue.lease(CPU_AGENT, now=10.0) is None
    for row in (gpu, other_cpu, trt):
        assert queue.get(row["id"])["state"] == JobState.QUEUED.value
    leased = queue.get(mine["id"])
    assert leased["state"] == "leased" and leased["agent_id"] == "a1" and leased["attempts"] == 1
    assert leased["lease_expires_at"] == pytest.approx(20.0)
    store.close()


def test_concurrent_leases_never_hand_out_one_job_twice(db_url) -> None:
    store = Store.open(db_url)
    queue = JobQueue(store, lease_s=60)
    n_jobs, n_agents = 40, 6
    for i in range(n_jobs):
        queue.submit(job(i), now=float(i))
    got: dict[str, list[int]] = {}

    def agent(name: str) -> None:
        mine = got.setdefault(name, [])
        while (row := queue.lease({**CPU_AGENT, "id": name}, now=100.0)) is not None:
            mine.append(row["id"])

    threads = [threading.Thread(target=agent, args=(f"a{i}",)) for i in range(n_agents)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [i for mine in got.values() for i in mine]
    assert sorted(ids) == sorted({r["id"] for r in queue.list(limit=500)}) and len(ids) == n_jobs
    assert {r["agent_id"] for r in queue.list(limit=500)} <= set(got)
    store.close()


def test_expired_leases_go_back_to_the_queue_until_the_last_attempt(db_url) -> None:
    store = Store.open(db_url)
    queue = JobQueue(store, lease_s=5)
    row = queue.submit(job(max_attempts=2), now=0.0)[0]
    assert queue.lease(CPU_AGENT, now=1.0)["id"] == row["id"]
    queue.heartbeat(row["id"], "a1", now=4.0, progress={"done": 1}, running=True)
    assert queue.expire(now=8.0) == 0  # the heartbeat moved the expiry to 9
    assert queue.get(row["id"])["state"] == "running" and queue.get(row["id"])["progress"] == {"done": 1}
    assert queue.expire(now=9.5) == 1
    back = queue.get(row["id"])
    assert back["state"] == "queued" and back["agent_id"] is None and back["attempts"] == 1
    with pytest.raises(ApiError) as lost:  # the old holder can no longer report
        queue.heartbeat(row["id"], "a1", now=9.6)
    assert lost.value.status == 409 and "lease lost" in lost.value.detail
    second = {**CPU_AGENT, "id": "a2"}
    assert queue.lease(second, now=10.0)["attempts"] == 2
    assert queue.expire(now=20.0) == 0
    failed = queue.get(row["id"])
    assert failed["state"] == "failed" and "last allowed attempt" in failed["error"]
    store.close()


def test_journal_uploads_are_idempotent_gapless_and_only_from_the_holder(db_url) -> None:
    store = Store.open(db_url)
    queue = JobQueue(store, lease_s=5)
    row = queue.submit(job(kind=JobKind.PROFILE), now=0.0)[0]
    queue.lease(CPU_AGENT, now=0.0)
    lines = [f'{{"type": "part", "i": {i}}}' for i in range(5)]
    assert queue.append_journal(row["id"], "a1", 0, lines[:3], now=1.0) == 3
    assert queue.append_journal(row["id"], "a1", 1, lines[1:5], now=2.0) == 5  # a retried upload overlaps
    assert queue.journal(row["id"]) == lines
    for start, bad, why in ((7, lines[:1], "gap"), (2, ['{"other": 1}'], "differs")):
        with pytest.raises(ApiError) as refused:
            queue.append_journal(row["id"], "a1", start, bad, now=3.0)
        assert refused.value.status == 409 and why in refused.value.detail
    with pytest.raises(ApiError) as refused:
        queue.append_journal(row["id"], "intruder", 5, ['{"x": 1}'], now=3.0)
    assert refused.value.status == 409
    assert queue.get(row["id"])["state"] == "running" and queue.journal(row["id"]) == lines
    store.close()


def test_cancel_release_complete_and_fail(db_url) -> None:
    store = Store.open(db_url)
    queue = JobQueue(store, lease_s=5)
    a, b, c, d = (queue.submit(job(i), now=float(i))[0] for i in range(4))
    assert queue.cancel(a["id"], now=5.0)["state"] == "cancelled"
    with pytest.raises(ApiError) as refused:
        queue.cancel(a["id"], now=5.0)
    assert refused.value.status == 409
    assert queue.lease(CPU_AGENT, now=6.0)["id"] == b["id"]
    released = queue.release(b["id"], "a1", now=7.0)
    assert released["state"] == "queued" and released["attempts"] == 0
    assert queue.lease(CPU_AGENT, now=8.0)["id"] == b["id"]
    assert queue.complete(b["id"], "a1", {"models": []}, now=9.0)["result"] == {"models": []}
    assert queue.lease(CPU_AGENT, now=10.0)["id"] == c["id"]
    queue.cancel(c["id"], now=11.0)
    with pytest.raises(ApiError) as cancelled:
        queue.heartbeat(c["id"], "a1", now=12.0)
    assert "cancelled" in cancelled.value.detail
    assert queue.lease(CPU_AGENT, now=13.0)["id"] == d["id"]
    assert queue.fail(d["id"], "a1", "boom", now=14.0)["error"] == "boom"
    with pytest.raises(ApiError):
        queue.complete(d["id"], "a1", {}, now=15.0)
    with pytest.raises(ApiError) as missing:
        queue.get(999)
    assert missing.value.status == 404
    assert [r["state"] for r in queue.list()] == ["failed", "cancelled", "succeeded", "cancelled"]
    store.close()


def test_a_server_restart_with_queued_and_leased_jobs_loses_nothing(db_url, tmp_path) -> None:
    env = se.env_for(tmp_path)
    state = tmp_path / "state"
    body = {"kind": "measure", "models": [{"name": "m", "arch": "vit_test"}], "backend_options": se.QUICK_BACKEND}
    fingerprint = {"kind": "cpu", "cpu": {"model_name": "Test CPU 9000", "logical_cores": 2, "available_cores": 2,
                                          "threads_used": None, "platform": "test", "machine": "x86_64",
                                          "python_version": "3.11"}, "gpu": None, "versions": {}}
    args = ("--db", db_url, "--lease-s", "2")
    with se.running_server(state, env, *args) as server, server.client() as http:
        submitted = [http.post("/v1/jobs", json={**body, "passes": p}).json() for p in (1, 2, 3)]
        agent = http.post("/v1/agents", json={"name": "scripted", "hostname": "h", "fingerprint": fingerprint,
                                              "backends": ["onnxruntime"]}).json()
        leased = http.post(f"/v1/agents/{agent['id']}/lease", params={"wait_s": 0}).json()["job"]
        assert leased["id"] == submitted[0]["id"]
    assert server.proc.returncode == 0 and not (state / "server.json").exists()
    with se.running_server(state, env, *args) as server, server.client() as http:
        jobs = {j["id"]: j for j in http.get("/v1/jobs").json()}
        assert sorted(jobs) == sorted(j["id"] for j in submitted)
        for j in submitted:
            assert jobs[j["id"]]["spec"] == j["spec"]
        assert jobs[leased["id"]]["state"] in ("leased", "queued")
        # The lease of the agent that went away with the old server expires; every job is handed out again.
        again = []
        for _ in range(20):
            answer = http.post(f"/v1/agents/{agent['id']}/lease", params={"wait_s": 1})
            if answer.status_code == 200:
                again.append(answer.json()["job"]["id"])
            if len(again) == 3:
                break
        assert sorted(again) == sorted(j["id"] for j in submitted)


def test_a_version_1_database_is_upgraded_in_place_and_keeps_its_rows(db_url) -> None:
    import sqlalchemy as sa

    from nvit.service.store import SCHEMA_VERSION

    store = Store.open(db_url)
    queue = JobQueue(store, lease_s=10)
    kept = queue.submit(job(7), now=1.0)[0]
    with store.write() as conn:  # what nvit with schema 1 left: no agent owner, no job table
        conn.execute(sa.text("ALTER TABLE agents DROP COLUMN registered_by"))
        conn.execute(sa.text("ALTER TABLE jobs DROP COLUMN table_sha256"))
        conn.execute(sa.text("UPDATE nvit_meta SET value = '1' WHERE key = 'schema_version'"))
    store.close()
    store = Store.open(db_url)
    with store.read() as conn:
        version = conn.execute(sa.text("SELECT value FROM nvit_meta WHERE key = 'schema_version'")).scalar()
        columns = {c["name"] for c in sa.inspect(conn).get_columns("jobs")}
    assert version == str(SCHEMA_VERSION) == "2" and "table_sha256" in columns
    assert JobQueue(store, lease_s=10).get(kept["id"])["spec"] == {"n": 7}
    store.close()
