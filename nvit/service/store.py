"""The service's database: SQLAlchemy Core tables and the queries on tokens, agents, blobs and tables.

One schema for both engines: an embedded SQLite file by default (WAL with ``synchronous=NORMAL``: a crashed or
restarted server loses no commit, a power cut may lose the last ones; the server the only writer, write
transactions serialised in-process) and PostgreSQL by URL (``postgresql://...``, through psycopg) when a
team outgrows one box. Times are UNIX seconds (floats); JSON documents use the portable JSON type. The
schema carries a version in ``meta``; a database of another version is refused, never guessed at.
The job queue's queries live in :mod:`nvit.service.queue`.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from nvit.errors import NvitError

SCHEMA_VERSION = 2  # 2: agents.registered_by, jobs.table_sha256
SQLITE_FILE = "nvit.db"
_SQLITE_BUSY_TIMEOUT_MS = 30_000

metadata = sa.MetaData()

meta_table = sa.Table(
    "nvit_meta", metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

tokens = sa.Table(
    "tokens", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("secret_sha256", sa.String(64), nullable=False),
    sa.Column("scopes", sa.String(200), nullable=False),  # space-separated
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float),
)

agents = sa.Table(
    "agents", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("hostname", sa.String(200), nullable=False),
    sa.Column("device_key", sa.String(32), nullable=False, index=True),
    sa.Column("device_kind", sa.String(16), nullable=False),
    sa.Column("device_name", sa.String(300), nullable=False),
    sa.Column("fingerprint", sa.JSON, nullable=False),
    sa.Column("backends", sa.JSON, nullable=False),
    sa.Column("registered_by", sa.String(32)),  # the token that registered it (NULL: anonymous)
    sa.Column("registered_at", sa.Float, nullable=False),
    sa.Column("last_seen", sa.Float, nullable=False),
)

blobs = sa.Table(
    "blobs", metadata,
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),  # lut | onnx
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("info", sa.JSON, nullable=False),  # what inspecting it found (inputs, opset, ...)
    sa.Column("created_at", sa.Float, nullable=False),
)

luts = sa.Table(
    "luts", metadata,
    sa.Column("sha256", sa.String(64), sa.ForeignKey("blobs.sha256"), primary_key=True),
    sa.Column("device_key", sa.String(32), nullable=False, index=True),
    sa.Column("device_kind", sa.String(16), nullable=False),
    sa.Column("device_name", sa.String(300), nullable=False),
    sa.Column("backend", sa.String(64), nullable=False),
    sa.Column("precision", sa.String(16), nullable=False),
    sa.Column("batch_size", sa.Integer, nullable=False),
    sa.Column("num_tokens", sa.Integer, nullable=False),
    sa.Column("space_name", sa.String(200), nullable=False),
    sa.Column("space_fingerprint", sa.String(32), nullable=False),
    sa.Column("rows", sa.Integer, nullable=False),
    sa.Column("calibrated", sa.Boolean, nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),  # the table's own creation time (ISO 8601)
    sa.Column("uploaded_at", sa.Float, nullable=False, index=True),
    sa.Column("source", sa.String(100), nullable=False),  # upload | job <id> | merge
    sa.Column("meta", sa.JSON, nullable=False),
)

jobs = sa.Table(
    "jobs", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("spec", sa.JSON, nullable=False),
    sa.Column("spec_sha256", sa.String(64), nullable=False),
    sa.Column("idempotency_key", sa.String(200), unique=True),
    sa.Column("device_kind", sa.String(16), nullable=False),
    sa.Column("device_name", sa.String(300)),  # lower case; NULL: any device of the kind
    sa.Column("backend", sa.String(64), nullable=False),
    sa.Column("submitted_by", sa.String(32)),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("agent_id", sa.String(32)),
    sa.Column("lease_expires_at", sa.Float),
    sa.Column("progress", sa.JSON),
    sa.Column("result", sa.JSON),
    sa.Column("error", sa.Text),
    sa.Column("table_sha256", sa.String(64)),  # the table a profile job's agent uploaded (and checked) for it
)

job_journal = sa.Table(
    "job_journal", metadata,
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("line", sa.Text, nullable=False),
)


#: Schema versions this nvit upgrades in place (columns added; nothing rewritten): version → statements.
_MIGRATIONS = {
    "1": ("ALTER TABLE agents ADD COLUMN registered_by VARCHAR(32)",
          "ALTER TABLE jobs ADD COLUMN table_sha256 VARCHAR(64)"),
}


class StoreError(NvitError):
    """The service database cannot be opened or has another schema."""


def sqlite_url(state_dir: str | os.PathLike[str]) -> str:
    return f"sqlite:///{Path(state_dir).resolve() / SQLITE_FILE}"


def normalise_url(url: str) -> str:
    """``postgresql://`` and ``postgres://`` go through psycopg (version 3), the driver nvit installs."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")  # WAL: a crash of the server loses nothing, a power cut the last commits
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
    cur.close()


class Store:
    """The database of one service. Use :meth:`write` for transactions that change rows, :meth:`read`
    otherwise; both yield a SQLAlchemy Core connection."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.is_sqlite = engine.dialect.name == "sqlite"
        self._write_lock = threading.Lock() if self.is_sqlite else contextlib.nullcontext()

    @classmethod
    def open(cls, url: str) -> Store:
        url = normalise_url(url)
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": _SQLITE_BUSY_TIMEOUT_MS / 1000}
        else:
            kwargs["pool_pre_ping"] = True
        try:
            engine = sa.create_engine(url, **kwargs)
        except (sa.exc.ArgumentError, ImportError) as exc:
            raise StoreError(f"cannot use database {_redact(url)}: {exc}") from None
        if engine.dialect.name == "sqlite":
            sa.event.listen(engine, "connect", _sqlite_pragmas)
        store = cls(engine)
        try:
            store._init_schema()
        except sa.exc.DBAPIError as exc:  # unreachable, not a database (a corrupt file), no permission
            engine.dispose()
            first = (str(exc.orig).strip().splitlines() or ["?"])[0] if exc.orig else str(exc)
            raise StoreError(f"cannot open database {_redact(url)}: {first}") from None
        except BaseException:
            engine.dispose()
            raise
        return store

    def _init_schema(self) -> None:
        with self.write() as conn:
            metadata.create_all(conn)
            found = conn.execute(sa.select(meta_table.c.value).where(meta_table.c.key == "schema_version")).scalar()
            if found is None:
                conn.execute(meta_table.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
            elif found in _MIGRATIONS:
                for statement in _MIGRATIONS[found]:
                    conn.execute(sa.text(statement))
                conn.execute(meta_table.update().where(meta_table.c.key == "schema_version")
                             .values(value=str(SCHEMA_VERSION)))
            elif found != str(SCHEMA_VERSION):
                raise StoreError(f"the service database has schema version {found}; this nvit uses "
                                 f"{SCHEMA_VERSION} (use another --state or --db)")

    def close(self) -> None:
        self.engine.dispose()

    @contextlib.contextmanager
    def write(self) -> Iterator[sa.Connection]:
        with self._write_lock, self.engine.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def read(self) -> Iterator[sa.Connection]:
        with self.engine.connect() as conn:
            yield conn

    # ---- tokens -----------------------------------------------------------------------------------
    def add_token(self, token_id: str, name: str, secret_sha256: str, scopes: list[str], now: float) -> None:
        with self.write() as conn:
            conn.execute(tokens.insert().values(id=token_id, name=name, secret_sha256=secret_sha256,
                                                scopes=" ".join(scopes), created_at=now))

    def token(self, token_id: str) -> Mapping[str, Any] | None:
        with self.read() as conn:
            return conn.execute(sa.select(tokens).where(tokens.c.id == token_id)).mappings().first()

    def list_tokens(self) -> list[Mapping[str, Any]]:
        with self.read() as conn:
            return list(conn.execute(sa.select(tokens).order_by(tokens.c.created_at)).mappings())

    def active_token_count(self) -> int:
        with self.read() as conn:
            query = sa.select(sa.func.count()).select_from(tokens).where(tokens.c.revoked_at.is_(None))
            return int(conn.execute(query).scalar_one())

    def revoke_token(self, token_id: str, now: float) -> bool:
        with self.write() as conn:
            done = conn.execute(tokens.update().where(tokens.c.id == token_id, tokens.c.revoked_at.is_(None))
                                .values(revoked_at=now))
            return done.rowcount == 1

    # ---- agents -----------------------------------------------------------------------------------
    def add_agent(self, row: dict[str, Any]) -> None:
        with self.write() as conn:
            conn.execute(agents.insert().values(**row))

    def agent(self, agent_id: str) -> Mapping[str, Any] | None:
        with self.read() as conn:
            return conn.execute(sa.select(agents).where(agents.c.id == agent_id)).mappings().first()

    def touch_agent(self, agent_id: str, now: float) -> None:
        with self.write() as conn:
            conn.execute(agents.update().where(agents.c.id == agent_id).values(last_seen=now))

    def list_agents(self, seen_after: float) -> list[Mapping[str, Any]]:
        with self.read() as conn:
            query = sa.select(agents).where(agents.c.last_seen >= seen_after).order_by(agents.c.registered_at)
            return list(conn.execute(query).mappings())

    # ---- blobs and tables -------------------------------------------------------------------------
    def add_blob(self, sha256: str, kind: str, size_bytes: int, info: dict[str, Any], now: float) -> bool:
        """Record a blob; False when it was already known (content addressing makes that harmless)."""
        with self.write() as conn:
            if conn.execute(sa.select(blobs.c.sha256).where(blobs.c.sha256 == sha256)).first() is not None:
                return False
            conn.execute(blobs.insert().values(sha256=sha256, kind=kind, size_bytes=size_bytes, info=info,
                                               created_at=now))
            return True

    def blob(self, sha256: str) -> Mapping[str, Any] | None:
        with self.read() as conn:
            return conn.execute(sa.select(blobs).where(blobs.c.sha256 == sha256)).mappings().first()

    def add_lut(self, row: dict[str, Any], *, size_bytes: int, info: dict[str, Any], now: float) -> bool:
        """Record a table's blob and register the table, in one transaction (a refusal leaves neither);
        False when it was already registered."""
        with self.write() as conn:
            if conn.execute(sa.select(luts.c.sha256).where(luts.c.sha256 == row["sha256"])).first() is not None:
                return False
            if conn.execute(sa.select(blobs.c.sha256).where(blobs.c.sha256 == row["sha256"])).first() is None:
                conn.execute(blobs.insert().values(sha256=row["sha256"], kind="lut", size_bytes=size_bytes, info=info,
                                                   created_at=now))
            conn.execute(luts.insert().values(**row))
            return True

    def lut(self, sha256: str) -> Mapping[str, Any] | None:
        with self.read() as conn:
            return conn.execute(sa.select(luts).where(luts.c.sha256 == sha256)).mappings().first()

    def list_luts(self, *, device: str | None = None, backend: str | None = None, precision: str | None = None,
                  batch_size: int | None = None, space: str | None = None, limit: int = 100
                  ) -> list[Mapping[str, Any]]:
        """Tables matching every filter given, newest upload first. ``device`` matches a device key, a kind
        (cpu/cuda) or a device name (case-insensitive substring); ``space`` a space name or fingerprint."""
        query = sa.select(luts)
        if device:  # a substring, its % and _ matched as themselves
            query = query.where(sa.or_(luts.c.device_key == device, luts.c.device_kind == device.lower(),
                                       sa.func.lower(luts.c.device_name).contains(device.lower(), autoescape=True)))
        if backend:
            query = query.where(luts.c.backend == backend)
        if precision:
            query = query.where(luts.c.precision == precision)
        if batch_size is not None:
            query = query.where(luts.c.batch_size == batch_size)
        if space:
            query = query.where(sa.or_(luts.c.space_name == space, luts.c.space_fingerprint == space))
        query = query.order_by(luts.c.uploaded_at.desc(), luts.c.sha256).limit(limit)
        with self.read() as conn:
            return list(conn.execute(query).mappings())


def _redact(url: str) -> str:
    """A database URL without its password."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<unparseable URL>"
