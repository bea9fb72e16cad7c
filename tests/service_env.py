"""Real service components for tests: ``nvit serve`` and ``nvit agent`` processes, and a PostgreSQL server.

Every context manager stops what it started (SIGTERM, then SIGKILL), even when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from nvit.service.procs import stop_process

REPO = Path(__file__).resolve().parent.parent
#: A short timing protocol: these tests check plumbing, not latency figures.
QUICK_HARNESS = {"warmup_s": 0.01, "rewarm_s": 0.0, "time_cap_s": 0.05, "repeats": 1, "min_samples": 10}
QUICK_BACKEND = {"intra_op_threads": 1, "harness": QUICK_HARNESS}
#: A vit_test space of 12 configurations whose grid holds every width a --group-size 16 prune can reach.
SPACE = {"base": "vit_test", "embed_dims": [32, 64], "heads": [1, 4], "qk_dims": [16], "v_dims": [16],
         "mlp_dims": [16, 256], "blocks_per_embed": 1, "name": "svc-test"}
STARTUP_S = 60.0


def env_for(tmp: Path, **extra: str) -> dict[str, str]:
    """Environment of service processes: this checkout first on the path, private lock and cache dirs."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("NVIT_LOCK_DIR", str(tmp / "locks"))
    env.setdefault("NVIT_CACHE_DIR", str(tmp / "cache"))
    env.pop("NVIT_TOKEN", None)
    env.update(extra)
    return env


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[Any]
    state: Path
    log: Path

    def client(self, token: str | None = None, timeout_s: float = 60.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)


@contextlib.contextmanager
def running_server(state: Path, env: dict[str, str], *args: str, cwd: Path | None = None) -> Iterator[Server]:
    """``nvit serve --state STATE --port 0 ARGS`` (in folder ``cwd``) until the block ends."""
    # imported here: the server side needs the service extra, this module's other helpers do not
    from nvit.errors import NvitError
    from nvit.service.server import SERVER_FILE, wait_for_server_url

    state.mkdir(parents=True, exist_ok=True)
    (state / SERVER_FILE).unlink(missing_ok=True)
    if os.environ.get(SERVICE_DB_ENV) == "postgresql" and "--db" not in args:
        args = (*args, "--db", state_db_url(state))  # the whole service suite on PostgreSQL
    log = state.parent / f"{state.name}-server.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "nvit", "serve", "--state", str(state), "--port", "0", *args],
                                env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    try:
        try:
            url = wait_for_server_url(state, proc, timeout_s=STARTUP_S, probe_timeout_s=5)
        except NvitError as exc:
            pytest.fail(f"{exc}: {log.read_text()[-2000:]}")
        yield Server(url, proc, state, log)
    finally:
        stop_process(proc)


@contextlib.contextmanager
def running_agent(url: str, work_dir: Path, env: dict[str, str], name: str, *args: str,
                  token: str | None = None) -> Iterator[subprocess.Popen[Any]]:
    """``nvit agent`` (this CPU, onnxruntime) until the block ends; its log is WORK_DIR.log."""
    work_dir.mkdir(parents=True, exist_ok=True)
    env = dict(env)
    if token:
        env["NVIT_TOKEN"] = token
    with open(work_dir.with_suffix(".log"), "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "nvit", "agent", "--server", url, "--work-dir",
                                 str(work_dir), "--name", name, "--poll-s", "2", *args],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        stop_process(proc)


def wait_for(predicate: Any, *, timeout_s: float, what: str, every_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")


def wait_job(client: httpx.Client, job_id: int, *, timeout_s: float = 240.0, states: tuple[str, ...] = (
        "succeeded", "failed", "cancelled")) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["state"] in states else None

    return wait_for(done, timeout_s=timeout_s, what=f"job {job_id} to reach {'/'.join(states)}")


def processes_running(text: str) -> list[int]:
    """Pids of live processes whose command line contains ``text`` (Linux /proc)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if text in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                state = (cmdline.parent / "stat").read_text().split(") ", 1)[1][:1]
                if state != "Z":
                    found.append(int(cmdline.parent.name))
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- PostgreSQL ---------------------------------------------------------------------------------------
def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL server (initdb + pg_ctl) on a free port; yields the URL of its database
    ``postgres``. Skips the test where PostgreSQL or psycopg is missing. PostgreSQL refuses to run as root,
    so under root it runs as ``nobody``."""
    pg_ctl, initdb = _pg_bin("pg_ctl"), _pg_bin("initdb")
    if pg_ctl is None or initdb is None:
        pytest.skip("PostgreSQL is not installed (no pg_ctl/initdb; Debian: apt-get install postgresql)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed (pip install 'nvit[postgres]')")
    user = None
    folder = Path(tempfile.mkdtemp(prefix="nvit-pg-"))  # under /tmp: reachable by an unprivileged user
    if os.geteuid() == 0:
        import pwd

        try:
            entry = pwd.getpwnam("nobody")
        except KeyError:
            shutil.rmtree(folder, ignore_errors=True)
            pytest.skip("PostgreSQL refuses to run as root and this machine has no user 'nobody'")
        user = "nobody"
        os.chown(folder, entry.pw_uid, entry.pw_gid)
    data, port = folder / "data", free_port()
    run = dict(user=user, capture_output=True, text=True, check=False, timeout=120)
    started = False
    try:
        made = subprocess.run([initdb, "-D", str(data), "-U", "nvit", "--auth=trust", "-E", "UTF8", "--locale=C"],
                              **run)
        if made.returncode != 0:
            pytest.skip(f"initdb failed: {(made.stderr.strip().splitlines() or ['?'])[-1]}")
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        up = subprocess.run([pg_ctl, "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start"], **run)
        if up.returncode != 0:
            pytest.skip(f"pg_ctl start failed: {(up.stderr.strip().splitlines() or ['?'])[-1]}")
        started = True
        yield f"postgresql://nvit@127.0.0.1:{port}/postgres"
    finally:
        if started:
            subprocess.run([pg_ctl, "-D", str(data), "-m", "immediate", "stop"], **run)
        shutil.rmtree(folder, ignore_errors=True)


#: ``NVIT_TEST_SERVICE_DB=postgresql pytest tests/test_service_*.py``: every server a test starts without
#: ``--db`` keeps its state in a fresh database of one PostgreSQL server shared by the session.
SERVICE_DB_ENV = "NVIT_TEST_SERVICE_DB"
_SESSION_PG: dict[str, Any] = {}


def state_db_url(state: Path) -> str:
    """The database of a server whose ``--state`` is ``state``: its SQLite file, or under
    :data:`SERVICE_DB_ENV` a fresh database on the session's PostgreSQL server, the same one every time for
    one ``state`` (tokens a test creates are where its server looks)."""
    from nvit.service.store import sqlite_url

    if os.environ.get(SERVICE_DB_ENV) != "postgresql":
        return sqlite_url(state)
    if "url" not in _SESSION_PG:
        import atexit

        context = postgres_server()
        _SESSION_PG["url"] = context.__enter__()
        atexit.register(context.__exit__, None, None, None)
    bound = _SESSION_PG.setdefault("by_state", {})
    key = str(Path(state).resolve())
    if key not in bound:
        bound[key] = fresh_database(_SESSION_PG["url"], f"svc{len(bound) + 1}")
    return bound[key]


def fresh_database(server_url: str, name: str) -> str:
    """Create database ``name`` on the server (dropping an old one) and return its URL."""
    import psycopg

    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return server_url.rsplit("/", 1)[0] + "/" + name
