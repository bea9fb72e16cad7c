"""``nvit agent``: the pull loop on a target device.

The agent registers its device fingerprint, then long-polls the server for work (outbound connections only:
it works behind NAT). For each job it leases it heart-beats from a thread, takes the device's exclusive lock
(:mod:`nvit.profiler.devicelock`, the same lock a local ``nvit profile`` takes), downloads the job's inputs
(sha256 checked), and runs the job in a child process (:mod:`nvit.service.worker`). Every progress event of
a profile job is answered only after the journal lines it reports are on the server, so an agent killed at
any point loses at most the configuration it was measuring; the next agent to lease the job resumes from the
server's journal. A lease the server no longer honours (expired and given to another agent, or the job
cancelled) stops the child at once. On SIGTERM/SIGINT the agent stops its child and hands the job back.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nvit.errors import NvitError
from nvit.profiler.devicelock import DeviceBusyError, device_lock
from nvit.service.client import ServiceClient
from nvit.service.errors import ServiceError
from nvit.service.worker import JOB_FILE, PARENT_ENV, TABLE_FILE
from nvit.vocab import DeviceKind

logger = logging.getLogger(__name__)

_RETRY_S = 2.0
_STDERR_TAIL = 20
_UPLOAD_TRIES = 5
_REPORT_TRIES = 8


class AgentStopped(Exception):
    """SIGTERM or SIGINT: stop the current job, hand it back, exit."""


@dataclass(frozen=True)
class AgentOptions:
    server: str
    work_dir: Path
    name: str = ""
    device: DeviceKind = DeviceKind.CPU
    cuda_index: int = 0
    token: str | None = None
    poll_s: float = 20.0  # how long one lease request waits for work


def available_backends(device: DeviceKind) -> list[str]:
    """Backends whose packages this machine has, for jobs on ``device`` (on a GPU, onnxruntime only in its
    GPU build)."""
    names = ["torch"] if importlib.util.find_spec("torch") else []
    if device is DeviceKind.CPU and importlib.util.find_spec("onnxruntime"):
        names.append("onnxruntime")
    if device is DeviceKind.CUDA:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            importlib.metadata.version("onnxruntime-gpu")
            names.append("onnxruntime")
        if importlib.util.find_spec("tensorrt"):
            names.append("tensorrt")
    return sorted(names)


class _Lost(Exception):
    """The server no longer honours this agent's lease (expired and given away, or cancelled)."""


class Agent:
    def __init__(self, options: AgentOptions) -> None:
        self.options = options
        self.client = ServiceClient(options.server, token=options.token, timeout_s=max(30.0, options.poll_s + 15.0))
        self.name = options.name or f"{socket.gethostname()}-{os.getpid()}"
        self.agent_id: str | None = None
        self.jobs_done = 0

    # ---- the loop ------------------------------------------------------------------------------------
    def run(self) -> int:
        """Serve jobs until stopped; returns the number of jobs run."""
        previous = signal.signal(signal.SIGTERM, _raise_stopped)
        try:
            while True:
                if self.agent_id is None:
                    self._register()
                leased = self._lease()
                if leased is not None:
                    self.run_job(leased["job"], leased["lease"])
                    self.jobs_done += 1
        except (AgentStopped, KeyboardInterrupt):
            logger.info("agent %s stopping", self.name)
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.client.close()
        return self.jobs_done

    def _register(self) -> None:
        from nvit.profiler.device import fingerprint

        fp = fingerprint(self.options.device, cuda_index=self.options.cuda_index, warm_up_s=0.0)
        body = {"name": self.name, "hostname": socket.gethostname(), "fingerprint": fp.to_dict(),
                "backends": available_backends(self.options.device)}
        while True:
            try:
                answer = self.client.post_json("/v1/agents", body)
                break
            except ServiceError as exc:
                if exc.status is not None:
                    raise
                logger.warning("%s (retrying in %.0f s)", exc, _RETRY_S)
                time.sleep(_RETRY_S)
        self.agent_id = self.client.expect(answer, {"id": str}, "the registration")["id"]
        logger.info("agent %s registered as %s on %s (%s), backends %s", self.name, self.agent_id,
                    fp.slug(), self.client.base_url, ", ".join(body["backends"]))

    def _lease(self) -> dict[str, Any] | None:
        try:
            response = self.client.request("POST", f"/v1/agents/{self.agent_id}/lease",
                                           params={"wait_s": self.options.poll_s}, ok=(404,))
        except ServiceError as exc:
            if exc.status is not None:
                raise
            logger.warning("%s (retrying in %.0f s)", exc, _RETRY_S)
            time.sleep(_RETRY_S)
            return None
        if response.status_code == 404:  # the server forgot this agent (a new database): register again
            self.agent_id = None
            return None
        if response.status_code != 200:
            return None
        leased = self.client.parse(response, "POST", "/v1/agents/.../lease")
        self.client.expect(leased, {"job": dict, "lease": dict}, "a lease")
        self.client.expect(leased["job"], {"id": int, "kind": str, "spec": dict}, "a leased job")
        self.client.expect(leased["lease"], {"heartbeat_s": (int, float)}, "a lease")
        return leased

    # ---- one job -------------------------------------------------------------------------------------
    def run_job(self, job: dict[str, Any], lease: dict[str, Any]) -> None:
        run = _JobRun(self, job, float(lease["heartbeat_s"]))
        logger.info("job %s (%s) leased", job["id"], job["kind"])
        try:
            run.execute()
        except _Lost as exc:
            logger.warning("job %s: %s; stopped", job["id"], exc)
        except (AgentStopped, KeyboardInterrupt):
            run.stop_child()
            with contextlib.suppress(_Lost, ServiceError):
                run.call("release", {})
            raise
        except Exception as exc:  # a refused upload, an unreadable input: the job fails, the agent goes on
            if isinstance(exc, NvitError):
                logger.warning("job %s: %s", job["id"], exc)
            else:
                logger.exception("job %s: agent error", job["id"])
            with contextlib.suppress(_Lost, ServiceError):
                run.call("fail", {"error": f"agent {self.name}: {exc}"})
        finally:
            run.close()


def _raise_stopped(signum: int, frame: Any) -> None:
    raise AgentStopped()


class _JobRun:
    """State of one leased job: heartbeats, the child, the journal offset."""

    def __init__(self, agent: Agent, job: dict[str, Any], heartbeat_s: float) -> None:
        self.agent, self.job, self.heartbeat_s = agent, job, heartbeat_s
        self.client = agent.client
        self.jobdir = agent.options.work_dir / "jobs" / str(job["id"])
        self.lost = threading.Event()
        self.lost_reason = ""
        self.progress: dict[str, Any] | None = None
        self.running = False
        self.child: subprocess.Popen[str] | None = None
        self._stop_beat = threading.Event()
        self._beat = threading.Thread(target=self._heartbeats, daemon=True, name=f"heartbeat-{job['id']}")
        self.journal_uploaded = 0  # lines the server holds
        self._journal_offset = 0  # bytes of the local journal read so far
        self._journal_pending: list[str] = []
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL)

    # -- server calls --
    def call(self, what: str, body: dict[str, Any], *, tries: int = 1) -> Any:
        """POST /v1/jobs/{id}/{what} as this agent; a refusal (409) means the lease is lost. When the server
        cannot be reached, retry (``tries`` in all, with back-off), then return None."""
        for attempt in range(tries):
            try:
                return self.client.post_json(f"/v1/jobs/{self.job['id']}/{what}",
                                             {"agent_id": self.agent.agent_id, **body})
            except ServiceError as exc:
                if exc.status == 409:
                    self._lose(str(exc))
                    raise _Lost(self.lost_reason) from None
                if exc.status is not None:
                    raise
                logger.warning("job %s: %s", self.job["id"], exc)
                if attempt < tries - 1:
                    time.sleep(min(self.heartbeat_s, 0.5 * 2**attempt))
        return None

    def _lose(self, reason: str) -> None:
        self.lost_reason = reason
        self.lost.set()
        self.stop_child()

    def _heartbeats(self) -> None:
        while not self._stop_beat.wait(self.heartbeat_s):
            with contextlib.suppress(_Lost, ServiceError):
                self.call("heartbeat", {"progress": self.progress, "running": self.running})
            if self.lost.is_set():
                return

    # -- the job --
    def execute(self) -> None:
        self._beat.start()
        opts = self.agent.options
        holder = f"nvit agent {self.agent.name} job {self.job['id']}"
        try:
            with device_lock(opts.device, cuda_index=opts.cuda_index, holder=holder, on_wait=self._waiting,
                             stop=self.lost.is_set) as lock:
                self._run_locked(lock.acquired_at)
        except DeviceBusyError:
            raise _Lost(self.lost_reason) from None

    def _waiting(self, holder: str) -> None:
        logger.info("job %s waits for the device (busy with %s)", self.job["id"], holder)
        self.progress = {"phase": "waiting for the device", "holder": holder}

    def _run_locked(self, locked_at: float) -> None:
        if self.jobdir.exists():
            shutil.rmtree(self.jobdir)
        self.jobdir.mkdir(parents=True)
        files = self._fetch_inputs()
        (self.jobdir / JOB_FILE).write_text(json.dumps({**self.job, "files": files}))
        started = time.time()
        outcome = self._run_child()
        finished = time.time()
        timing = {"worker_started_at": started, "worker_finished_at": finished, "device_locked_at": locked_at,
                  "agent": {"id": self.agent.agent_id, "name": self.agent.name}}
        if outcome.get("event") == "result":
            result = {**outcome["result"], **timing}
            if self.job["kind"] == "profile":
                table = self.jobdir / TABLE_FILE
                view = self.client.upload(f"/v1/jobs/{self.job['id']}/table", table,
                                          params={"agent_id": self.agent.agent_id})
                result |= {"lut": view["sha256"], "lut_url": view["url"], "table_sha256": view["sha256"]}
            if self.call("complete", {"result": result}, tries=_REPORT_TRIES) is None:
                raise ServiceError(f"could not report job {self.job['id']}: the server did not answer")
            logger.info("job %s succeeded", self.job["id"])
        else:
            message = outcome.get("message") or self._crash_message(outcome.get("returncode"))
            self.call("fail", {"error": message}, tries=_REPORT_TRIES)
            logger.warning("job %s failed: %s", self.job["id"], message)

    def _fetch_inputs(self) -> dict[str, str]:
        spec = self.job["spec"]
        files: dict[str, str] = {}
        cache = self.agent.options.work_dir / "cache"
        wanted = [("lut", spec["lut"], "/v1/luts/")] if spec.get("lut") else []
        wanted += [(m["onnx"], m["onnx"], "/v1/models/") for m in spec.get("models", []) if "onnx" in m]
        for key, sha, route in wanted:
            files[key] = str(self.client.download_cached(route + sha, cache / sha, sha))
        if self.job["kind"] == "profile":
            from nvit.profiler.journal import journal_path

            lines = self.client.get_json(f"/v1/jobs/{self.job['id']}/journal")["lines"]
            jpath = journal_path(self.jobdir / TABLE_FILE)
            if lines:
                jpath.write_text("".join(line + "\n" for line in lines))
                logger.info("job %s resumes from %d journal lines", self.job["id"], len(lines))
            self.journal_uploaded = len(lines)
            self._journal_offset = jpath.stat().st_size if jpath.exists() else 0
        return files

    def _run_child(self) -> dict[str, Any]:
        env = {**os.environ, PARENT_ENV: str(os.getpid())}
        if self.agent.options.device is DeviceKind.CUDA:
            env["CUDA_VISIBLE_DEVICES"] = str(self.agent.options.cuda_index)
        self.child = subprocess.Popen([sys.executable, "-m", "nvit.service.worker", str(self.jobdir)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, bufsize=1, env=env)
        copier = threading.Thread(target=self._copy_stderr, daemon=True)
        copier.start()
        self.running = True
        outcome: dict[str, Any] = {}
        assert self.child.stdout is not None and self.child.stdin is not None
        for line in self.child.stdout:
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                continue
            if message.get("event") == "progress":
                self.progress = message["progress"]
                self._report_progress()
                with contextlib.suppress(BrokenPipeError, ValueError):
                    self.child.stdin.write("\n")
                    self.child.stdin.flush()
            else:
                outcome = message
        returncode = self.child.wait()
        copier.join(timeout=5)
        self.running = False
        if self.lost.is_set():
            raise _Lost(self.lost_reason)
        return outcome or {"event": "crash", "returncode": returncode}

    def _report_progress(self) -> None:
        """Upload the journal lines the child has written (profile jobs), or just the progress."""
        if self.job["kind"] != "profile":
            self.call("heartbeat", {"progress": self.progress, "running": True})
            return
        self._read_journal()
        answer = self.call("journal", {"start": self.journal_uploaded, "lines": self._journal_pending,
                                       "progress": self.progress}, tries=_UPLOAD_TRIES)
        if answer is not None:
            self.journal_uploaded = answer["lines"]
            self._journal_pending = []
            return
        logger.warning("job %s: %d journal lines not uploaded yet; they go with the next upload",
                       self.job["id"], len(self._journal_pending))

    def _read_journal(self) -> None:
        from nvit.profiler.journal import journal_path

        jpath = journal_path(self.jobdir / TABLE_FILE)
        with contextlib.suppress(FileNotFoundError), open(jpath, "rb") as fh:
            fh.seek(self._journal_offset)
            data = fh.read()
            complete = data[:data.rfind(b"\n") + 1]
            self._journal_offset += len(complete)
            self._journal_pending += [line.decode() for line in complete.split(b"\n") if line.strip()]

    def _copy_stderr(self) -> None:
        assert self.child is not None and self.child.stderr is not None
        for line in self.child.stderr:
            self._stderr_tail.append(line.rstrip())
            sys.stderr.write(line)

    def _crash_message(self, returncode: Any) -> str:
        last = next((line for line in reversed(self._stderr_tail) if line.strip()), "")
        return f"the job's worker process exited with status {returncode}" + (f": {last[:500]}" if last else "")

    def stop_child(self) -> None:
        child = self.child
        if child is not None and child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.kill()

    def close(self) -> None:
        self._stop_beat.set()
        self.stop_child()
        if self.child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.child.wait(timeout=10)
        if self._beat.is_alive():
            self._beat.join(timeout=self.heartbeat_s + 1)
