"""The job queue: states, leases with heartbeats and expiry, idempotent submission, the profile journal.

States: ``queued → leased → running → succeeded | failed | cancelled``. An agent leases the oldest queued job
its device and backends can run; the lease lasts ``lease_s`` seconds and every heartbeat (or journal upload)
extends it. A lease that stops heart-beating expires and the job goes back to the queue (after
``max_attempts`` leases it fails instead). Only the agent holding the lease may report on a job, so a slow
agent whose lease expired can never add rows or results behind the new holder's back.

A ``profile`` job's journal (the JSON lines :func:`nvit.profiler.sweep.run_sweep` appends, one per measured
configuration) is uploaded line by line as the agent measures; the next agent to lease the job starts from
it, so a dead agent loses at most the configuration it was measuring.

On PostgreSQL the hand-out takes the candidate row ``FOR UPDATE SKIP LOCKED``, so concurrent servers never
block on each other; everywhere the lease itself is a conditional update of a queued row, so one job is
never leased twice.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from nvit.service.errors import ApiError, conflict, forbidden, not_found
from nvit.service.schemas import DB_INT_MAX
from nvit.service.store import Store, job_journal, jobs

DEFAULT_MAX_ATTEMPTS = 3
_LEASE_RETRIES = 5


class JobKind(str, enum.Enum):
    PROFILE = "profile"
    MEASURE = "measure"


class JobState(str, enum.Enum):
    QUEUED = "queued"
    LEASED = "leased"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


ACTIVE_STATES = (JobState.LEASED.value, JobState.RUNNING.value)


@dataclass(frozen=True)
class NewJob:
    """What a submitted job needs to be routed: the device kind and (optionally) name, and the backend."""

    kind: JobKind
    spec: dict[str, Any]
    device_kind: str
    backend: str
    device_name: str | None = None
    max_attempts: int = DEFAULT_MAX_ATTEMPTS

    def spec_sha256(self) -> str:
        doc = {"kind": self.kind.value, "spec": self.spec, "device_kind": self.device_kind,
               "device_name": self.device_name, "backend": self.backend}
        return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class JobQueue:
    def __init__(self, store: Store, *, lease_s: float) -> None:
        self.store = store
        self.lease_s = lease_s

    # ---- clients ------------------------------------------------------------------------------------
    def submit(self, new: NewJob, *, now: float, idempotency_key: str | None = None,
               submitted_by: str | None = None) -> tuple[Mapping[str, Any], bool]:
        """Queue a job; with an ``idempotency_key`` this submitter already used for the same request, return
        that job instead (``created`` False). The same key with a different request is refused. Keys are
        the submitter's own: another token's key of the same name is another key."""
        spec_sha = new.spec_sha256()
        stored_key = None if idempotency_key is None else scoped_key(submitted_by, idempotency_key)
        for _ in range(2):  # a concurrent submit with the same key (PostgreSQL) is found on the second round
            try:
                with self.store.write() as conn:
                    if stored_key is not None:
                        found = conn.execute(sa.select(jobs).where(jobs.c.idempotency_key == stored_key)
                                             ).mappings().first()
                        if found is not None:
                            if found["spec_sha256"] != spec_sha:
                                raise ApiError(422, "idempotency key reused",
                                               f"Idempotency-Key {idempotency_key!r} was used for job {found['id']}"
                                               " with a different request")
                            return found, False
                    result = conn.execute(jobs.insert().values(
                        kind=new.kind.value, state=JobState.QUEUED.value, spec=new.spec, spec_sha256=spec_sha,
                        idempotency_key=stored_key, device_kind=new.device_kind,
                        device_name=new.device_name.lower() if new.device_name else None, backend=new.backend,
                        submitted_by=submitted_by, created_at=now, updated_at=now, attempts=0,
                        max_attempts=new.max_attempts))
                    job_id = result.inserted_primary_key[0]
                    return _get(conn, job_id), True
            except sa.exc.IntegrityError:
                if idempotency_key is None:
                    raise
        raise conflict(f"Idempotency-Key {idempotency_key!r} is being used by a concurrent request")

    def get(self, job_id: int) -> Mapping[str, Any]:
        with self.store.read() as conn:
            return _get(conn, job_id)

    def list(self, *, state: str | None = None, kind: str | None = None, limit: int = 100) -> list[Mapping[str, Any]]:
        query = sa.select(jobs).order_by(jobs.c.id.desc()).limit(limit)
        if state:
            query = query.where(jobs.c.state == state)
        if kind:
            query = query.where(jobs.c.kind == kind)
        with self.store.read() as conn:
            return list(conn.execute(query).mappings())

    def cancel(self, job_id: int, *, now: float, by: str | None = None, admin: bool = True) -> Mapping[str, Any]:
        """Cancel a job that has not finished; its agent learns at its next heartbeat and stops. Only the
        token that submitted it (``by``) or an ``admin`` may."""
        with self.store.write() as conn:
            row = _get(conn, job_id, for_update=True)
            if not admin and row["submitted_by"] != by:
                raise forbidden(f"job {job_id} was submitted by another token; only that token or an admin may "
                                "cancel it")
            if JobState(row["state"]).terminal:
                raise conflict(f"job {job_id} is already {row['state']}")
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(
                state=JobState.CANCELLED.value, lease_expires_at=None, updated_at=now))
            return _get(conn, job_id)

    def journal(self, job_id: int) -> list[str]:
        with self.store.read() as conn:
            _get(conn, job_id)
            query = sa.select(job_journal.c.line).where(job_journal.c.job_id == job_id).order_by(job_journal.c.seq)
            return list(conn.execute(query).scalars())

    # ---- agents -------------------------------------------------------------------------------------
    def lease(self, agent: Mapping[str, Any], *, now: float) -> Mapping[str, Any] | None:
        """The oldest queued job this agent can run, now leased to it; ``None`` when there is none."""
        self.expire(now=now)
        candidates = (sa.select(jobs.c.id)
                      .where(jobs.c.state == JobState.QUEUED.value, jobs.c.device_kind == agent["device_kind"],
                             sa.or_(jobs.c.device_name.is_(None), jobs.c.device_name == agent["device_name"].lower()),
                             jobs.c.backend.in_(list(agent["backends"])))
                      .order_by(jobs.c.id).limit(1))
        if not self.store.is_sqlite:
            candidates = candidates.with_for_update(skip_locked=True)
        for _ in range(_LEASE_RETRIES):
            with self.store.write() as conn:
                job_id = conn.execute(candidates).scalar()
                if job_id is None:
                    return None
                taken = conn.execute(jobs.update().where(jobs.c.id == job_id, jobs.c.state == JobState.QUEUED.value)
                                     .values(state=JobState.LEASED.value, agent_id=agent["id"],
                                             lease_expires_at=now + self.lease_s, attempts=jobs.c.attempts + 1,
                                             updated_at=now))
                if taken.rowcount == 1:
                    return _get(conn, job_id)
        return None

    def heartbeat(self, job_id: int, agent_id: str, *, now: float, progress: dict[str, Any] | None = None,
                  running: bool = False) -> Mapping[str, Any]:
        """Extend the lease (and record progress); refused when the agent no longer holds it."""
        with self.store.write() as conn:
            row = _held(conn, job_id, agent_id)
            values: dict[str, Any] = {"lease_expires_at": now + self.lease_s, "updated_at": now}
            if progress is not None:
                values["progress"] = progress
            if running:
                values["state"] = JobState.RUNNING.value
            conn.execute(jobs.update().where(jobs.c.id == row["id"]).values(**values))
            return _get(conn, job_id)

    def append_journal(self, job_id: int, agent_id: str, start: int, lines: Sequence[str], *, now: float,
                       progress: dict[str, Any] | None = None) -> int:
        """Append journal ``lines`` that begin at line ``start``; lines already stored must be identical
        (a retried upload), a gap is refused. Extends the lease. Returns the number of lines stored."""
        with self.store.write() as conn:
            _held(conn, job_id, agent_id)
            stored = list(conn.execute(sa.select(job_journal.c.line).where(job_journal.c.job_id == job_id)
                                       .order_by(job_journal.c.seq)).scalars())
            if start > len(stored) or start < 0:
                raise conflict(f"job {job_id} journal has {len(stored)} lines; an upload from line {start} "
                               "would leave a gap")
            overlap = stored[start:start + len(lines)]
            if list(lines[:len(overlap)]) != overlap:
                raise conflict(f"job {job_id} journal differs from the upload at line {start}")
            new = list(lines[len(overlap):])
            if new:
                conn.execute(job_journal.insert(), [{"job_id": job_id, "seq": len(stored) + i, "line": line}
                                                     for i, line in enumerate(new)])
            values: dict[str, Any] = {"lease_expires_at": now + self.lease_s, "updated_at": now,
                                      "state": JobState.RUNNING.value}
            if progress is not None:
                values["progress"] = progress
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(**values))
            return len(stored) + len(new)

    def attach_table(self, job_id: int, agent_id: str, sha256: str, *, now: float) -> Mapping[str, Any]:
        """Record the (checked) table the agent holding the lease uploaded for this profile job."""
        with self.store.write() as conn:
            _held(conn, job_id, agent_id)
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(
                table_sha256=sha256, lease_expires_at=now + self.lease_s, updated_at=now))
            return _get(conn, job_id)

    def complete(self, job_id: int, agent_id: str, result: dict[str, Any], *, now: float,
                 table_sha256: str | None = None) -> Mapping[str, Any]:
        """Finish a job; a profile job only with the table its agent uploaded for it (``table_sha256``)."""
        with self.store.write() as conn:
            row = _held(conn, job_id, agent_id)
            if row["kind"] == JobKind.PROFILE.value and (row["table_sha256"] is None
                                                         or row["table_sha256"] != table_sha256):
                raise ApiError(422, "invalid input", f"job {job_id} completes only with the table uploaded for it "
                               f"(POST /v1/jobs/{job_id}/table), not {table_sha256!r}")
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(
                state=JobState.SUCCEEDED.value, result=result, error=None, lease_expires_at=None, updated_at=now))
            return _get(conn, job_id)

    def fail(self, job_id: int, agent_id: str, error: str, *, now: float) -> Mapping[str, Any]:
        return self._finish(job_id, agent_id, now, state=JobState.FAILED, error=error)

    def release(self, job_id: int, agent_id: str, *, now: float) -> Mapping[str, Any]:
        """Hand a job back (the agent is stopping): queued again, and this lease does not count."""
        with self.store.write() as conn:
            _held(conn, job_id, agent_id)
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(
                state=JobState.QUEUED.value, agent_id=None, lease_expires_at=None, updated_at=now,
                attempts=sa.func.max(jobs.c.attempts - 1, 0) if self.store.is_sqlite
                else sa.func.greatest(jobs.c.attempts - 1, 0)))
            return _get(conn, job_id)

    def expire(self, *, now: float) -> int:
        """Requeue the jobs whose lease ran out (or fail them after ``max_attempts`` leases); returns how
        many went back to the queue."""
        stale = sa.and_(jobs.c.state.in_(ACTIVE_STATES), jobs.c.lease_expires_at < now)
        with self.store.write() as conn:
            conn.execute(jobs.update().where(stale, jobs.c.attempts >= jobs.c.max_attempts).values(
                state=JobState.FAILED.value, lease_expires_at=None, updated_at=now,
                error="the lease expired on the last allowed attempt (the agent stopped heart-beating)"))
            requeued = conn.execute(jobs.update().where(stale).values(
                state=JobState.QUEUED.value, agent_id=None, lease_expires_at=None, updated_at=now))
            return requeued.rowcount

    def active_by_agent(self) -> dict[str, int]:
        """Agent id → the job it holds."""
        with self.store.read() as conn:
            rows = conn.execute(sa.select(jobs.c.agent_id, jobs.c.id).where(jobs.c.state.in_(ACTIVE_STATES)))
            return {a: j for a, j in rows if a is not None}

    def _finish(self, job_id: int, agent_id: str, now: float, *, state: JobState,
                result: dict[str, Any] | None = None, error: str | None = None) -> Mapping[str, Any]:
        with self.store.write() as conn:
            _held(conn, job_id, agent_id)
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(
                state=state.value, result=result, error=error, lease_expires_at=None, updated_at=now))
            return _get(conn, job_id)


def scoped_key(submitter: str | None, key: str) -> str:
    """The stored form of an Idempotency-Key: one submitter's key never meets another's."""
    return hashlib.sha256(f"{submitter or 'anonymous'}\n{key}".encode()).hexdigest()


def _get(conn: sa.Connection, job_id: int, *, for_update: bool = False) -> Mapping[str, Any]:
    if not 1 <= job_id <= DB_INT_MAX:  # beyond what the id column holds: no such job
        raise not_found(f"no job {job_id}")
    query = sa.select(jobs).where(jobs.c.id == job_id)
    if for_update:  # PostgreSQL: hold the row until the transaction ends (SQLite writers are serialised)
        query = query.with_for_update()
    row = conn.execute(query).mappings().first()
    if row is None:
        raise not_found(f"no job {job_id}")
    return row


def _held(conn: sa.Connection, job_id: int, agent_id: str) -> Mapping[str, Any]:
    """The job, which ``agent_id`` must hold under a live lease."""
    row = _get(conn, job_id, for_update=True)
    if row["state"] == JobState.CANCELLED.value:
        raise conflict(f"job {job_id} was cancelled")
    if row["state"] not in ACTIVE_STATES or row["agent_id"] != agent_id:
        raise conflict(f"lease lost: job {job_id} is {row['state']}"
                       + (" and held by another agent" if row["agent_id"] not in (None, agent_id) else ""))
    return row
