"""Settings of one service instance, and the context every request handler reaches through the app."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nvit.errors import NvitError
from nvit.service.auth import Authenticator
from nvit.service.blobs import BlobStore
from nvit.service.queue import JobQueue
from nvit.service.store import Store, sqlite_url

MIB = 1 << 20


@dataclass(frozen=True)
class ServiceSettings:
    state_dir: Path
    db_url: str | None = None  # None: SQLite in state_dir
    lease_s: float = 60.0  # a lease not extended for this long expires and its job is queued again
    long_poll_s: float = 20.0  # the longest an agent's lease request waits for work
    max_model_bytes: int = 1024 * MIB  # ONNX uploads (weights embedded: DeiT-B is ~350 MB)
    max_table_bytes: int = 64 * MIB
    max_json_bytes: int = 8 * MIB
    max_attempts: int = 3
    agent_offline_s: float = 120.0  # an agent not heard from for longer is listed as offline
    require_auth: bool = False
    listen_host: str = "127.0.0.1"  # where the server listens: anonymous calls only ever on loopback

    @property
    def database_url(self) -> str:
        return self.db_url or sqlite_url(self.state_dir)


def make_state_dir(path: Path) -> None:
    """The state folder, created if missing; a file there or no permission is one NvitError line."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise NvitError(f"the service state {path} is a file, not a folder (use another --state)") from None
    except OSError as exc:
        raise NvitError(f"cannot use {path} as the service state folder: {exc.strerror or exc}") from None
    if not path.is_dir():
        raise NvitError(f"the service state {path} is not a folder (use another --state)")


class Notifier:
    """Wakes long-polling lease requests when work may have appeared (a submit, a requeue)."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._event = asyncio.Event()

    def _notify(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = asyncio.Event()

    def notify(self) -> None:
        """Callable from any thread."""
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closing
                self._loop.call_soon_threadsafe(self._notify)

    async def wait(self, timeout_s: float) -> None:
        if self._event is None:
            await asyncio.sleep(timeout_s)
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout_s)


@dataclass
class ServiceContext:
    settings: ServiceSettings
    store: Store
    queue: JobQueue
    blobs: BlobStore
    auth: Authenticator
    notifier: Notifier
    predictors: OrderedDict[str, Any] = field(default_factory=OrderedDict)  # table sha → predictor (LRU)
    stopping: Callable[[], bool] = lambda: False  # the server is shutting down: long polls end now

    @classmethod
    def open(cls, settings: ServiceSettings) -> ServiceContext:
        make_state_dir(settings.state_dir)
        store = Store.open(settings.database_url)
        return cls(settings=settings, store=store, queue=JobQueue(store, lease_s=settings.lease_s),
                   blobs=BlobStore(settings.state_dir), auth=Authenticator(store, always=settings.require_auth,
                                                                   listen_host=settings.listen_host),
                   notifier=Notifier())

    @staticmethod
    def now() -> float:
        return time.time()
