"""Running the service: uvicorn on a socket bound here, optionally with an agent beside it.

The socket is bound before the app starts, so ``--port 0`` works (the kernel picks a free port) and the URL
is known at once: it is printed and written to ``STATE/server.json`` for scripts and tests. A non-loopback
address is refused unless the server has tokens (anonymous access is for this machine only, and the app
checks that again on every request: see :mod:`nvit.service.auth`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from nvit.errors import NvitError
from nvit.fileio import atomic_write_text
from nvit.service.auth import Scope, is_loopback, new_token
from nvit.service.config import ServiceContext, ServiceSettings
from nvit.service.procs import stop_process

logger = logging.getLogger(__name__)

SERVER_FILE = "server.json"
_GRACEFUL_SHUTDOWN_S = 3


def wait_for_server_url(state_dir: Path, proc: subprocess.Popen[Any], *, timeout_s: float,
                        probe_timeout_s: float) -> str:
    """The URL of ``nvit serve --state STATE_DIR`` running as PROC, once its ``/healthz`` answers 200.

    Raises NvitError when PROC exits or TIMEOUT_S passes first."""
    import httpx

    info = Path(state_dir) / SERVER_FILE
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise NvitError(f"nvit serve exited with {proc.returncode}")
        if info.exists():
            url = json.loads(info.read_text())["url"]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/healthz", timeout=probe_timeout_s).status_code == 200:
                    return url
        if time.monotonic() > deadline:
            raise NvitError("nvit serve did not start")
        time.sleep(0.1)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto given explicitly: asyncio only disables Nagle's algorithm (TCP_NODELAY) on sockets that say they
    # are TCP, and without it every small response waits ~40 ms for a delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise NvitError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(False)
    sock.listen(128)  # connections made before the app starts wait in the backlog
    return sock


def url_of(host: str, port: int) -> str:
    return f"http://[{host.strip('[]')}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextlib.contextmanager
def local_agent(url: str, state_dir: Path, token: str | None) -> Iterator[subprocess.Popen[bytes]]:
    """``nvit agent`` in a child process, stopped (SIGTERM, then SIGKILL) when the block ends."""
    env = dict(os.environ)
    if token:
        env["NVIT_TOKEN"] = token
    proc = subprocess.Popen([sys.executable, "-m", "nvit", "agent", "--server", url, "--work-dir",
                             str(state_dir / "agent"), "--name", "local"], env=env)
    try:
        yield proc
    finally:
        stop_process(proc)


def serve(settings: ServiceSettings, *, host: str, port: int, with_agent: bool = False,
          on_ready: Callable[[str], None] | None = None) -> None:
    """Serve until SIGINT/SIGTERM."""
    import uvicorn

    from nvit.service.app import create_app

    settings = dataclasses.replace(settings, listen_host=host)
    ctx = ServiceContext.open(settings)
    try:
        tokens = ctx.store.active_token_count()
        if not is_loopback(host) and not tokens:
            raise NvitError(f"refusing to listen on {host} without tokens: anyone who can reach it could use "
                            f"the service; create one first with 'nvit serve token create --state "
                            f"{settings.state_dir} --scope admin', or listen on 127.0.0.1")
        agent_token = None
        if with_agent and (tokens or settings.require_auth):
            _, _, agent_token = new_token()
            ctx.auth.add_memory_token(agent_token, "local agent", {Scope.AGENT})
        sock = bind(host, port)
    except BaseException:
        ctx.store.close()
        raise
    url = url_of(host, sock.getsockname()[1])
    app = create_app(settings, context=ctx)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                           timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S))
    ctx.stopping = lambda: server.should_exit  # agents waiting for work are answered at once
    info = settings.state_dir / SERVER_FILE
    atomic_write_text(info, json.dumps({"url": url, "pid": os.getpid()}) + "\n")
    if on_ready is not None:
        on_ready(url)
    try:
        with contextlib.ExitStack() as stack:
            if with_agent:
                stack.enter_context(local_agent(url, settings.state_dir, agent_token))
            stack.enter_context(_signals_end_serving())
            server.run(sockets=[sock])
    finally:
        sock.close()
        info.unlink(missing_ok=True)


@contextlib.contextmanager
def _signals_end_serving() -> Iterator[None]:
    """uvicorn shuts down gracefully on SIGINT/SIGTERM and then re-raises the signal to the handler it found;
    a no-op handler there lets ``serve`` return and clean up (stop its agent, remove server.json)."""
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
