"""``nvit serve`` (the latency service), ``nvit serve token create|list|revoke`` and ``nvit agent``."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Table

from nvit.errors import NvitError

if TYPE_CHECKING:
    from nvit.service.config import ServiceSettings

serve_app = typer.Typer(help="Run the latency service: tables, profile and measure jobs for agents on target "
                             "devices (FastAPI + SQLite, or PostgreSQL with --db).", no_args_is_help=False)
token_app = typer.Typer(help="Create, list and revoke the service's bearer tokens.", no_args_is_help=True)
serve_app.add_typer(token_app, name="token")

SERVICE_EXTRA = "the service needs its extra: pip install 'nvit[service]'"


def default_state_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "nvit" / "service"


_STATE = typer.Option(None, "--state", help="State directory: the SQLite database and the blobs.",
                      show_default="~/.local/share/nvit/service")
_DB = typer.Option(None, "--db", help="Database URL instead of SQLite in --state, e.g. "
                   "postgresql://user@host/nvit (blobs stay in --state).")


def _require_service_extra() -> None:
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "sqlalchemy") if importlib.util.find_spec(m) is None]
    if missing:
        raise NvitError(f"{SERVICE_EXTRA} (missing: {', '.join(missing)})")


def _settings(state: Path | None, db: str | None, **kwargs: Any) -> ServiceSettings:
    from nvit.service.config import ServiceSettings

    return ServiceSettings(state_dir=(state or default_state_dir()).expanduser(), db_url=db, **kwargs)


def _log_service_progress() -> None:
    logger = logging.getLogger("nvit.service")
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)


@serve_app.callback(invoke_without_command=True)
def serve(
    ctx: typer.Context,
    state: Path | None = _STATE,
    db: str | None = _DB,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; anything but loopback needs "
                             "tokens (create one first)."),
    port: int = typer.Option(8787, "--port", help="Port (0: any free port; the URL is printed and written to "
                             "STATE/server.json)."),
    local_agent: bool = typer.Option(False, "--local-agent", help="Also run an agent for this machine's CPU."),
    lease_s: float = typer.Option(60.0, "--lease-s", min=1.0, help="Seconds an agent's lease lasts without a "
                                  "heartbeat before its job goes back to the queue."),
    max_model_mb: int = typer.Option(1024, "--max-model-mb", min=1, help="Largest ONNX upload (MiB)."),
    max_table_mb: int = typer.Option(64, "--max-table-mb", min=1, help="Largest table upload (MiB)."),
    require_auth: bool = typer.Option(False, "--require-auth", help="Refuse anonymous calls even with no tokens."),
) -> None:
    """Serve latency tables, profile and measure jobs to agents, and predictions (OpenAPI at /docs)."""
    if ctx.invoked_subcommand is not None:
        return
    _require_service_extra()
    from nvit.service.config import MIB
    from nvit.service.server import serve as run_server

    settings = _settings(state, db, lease_s=lease_s, max_model_bytes=max_model_mb * MIB,
                         max_table_bytes=max_table_mb * MIB, require_auth=require_auth)
    console = Console(stderr=True)
    _log_service_progress()

    def ready(url: str) -> None:
        console.print(f"nvit service on [bold]{url}[/] (API docs {url}/docs); state in {settings.state_dir}"
                      + (" with a local agent" if local_agent else ""), highlight=False)

    run_server(settings, host=host, port=port, with_agent=local_agent, on_ready=ready)


def _store(state: Path | None, db: str | None):
    _require_service_extra()
    from nvit.service.config import make_state_dir
    from nvit.service.store import Store

    settings = _settings(state, db)
    make_state_dir(settings.state_dir)
    return Store.open(settings.database_url)


@token_app.command("create")
def token_create(
    name: str = typer.Option(..., "--name", help="Who or what uses the token (shown in lists)."),
    scope: list[str] = typer.Option(["read"], "--scope", help="read | submit | agent | admin (repeatable)."),
    state: Path | None = _STATE,
    db: str | None = _DB,
) -> None:
    """Create a bearer token and print it (the only time it is shown; only its hash is stored)."""
    from nvit.service.auth import create_token, parse_scopes

    scopes = parse_scopes(scope)
    store = _store(state, db)
    try:
        token = create_token(store, name, scopes)
    finally:
        store.close()
    Console(stderr=True).print(f"token for {name!r} with scope(s) {', '.join(s.value for s in scopes)} "
                               "(shown once; give it as NVIT_TOKEN or --token):", highlight=False)
    typer.echo(token)


@token_app.command("list")
def token_list(state: Path | None = _STATE, db: str | None = _DB) -> None:
    """The tokens (ids, names, scopes; never secrets)."""
    store = _store(state, db)
    try:
        rows = store.list_tokens()
    finally:
        store.close()
    table = Table("id", "name", "scopes", "created", "revoked")
    for r in rows:
        revoked = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["revoked_at"])) if r["revoked_at"] else ""
        table.add_row(r["id"], r["name"], r["scopes"], time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created_at"])),
                      revoked)
    Console().print(table)


@token_app.command("revoke")
def token_revoke(token_id: str = typer.Argument(..., help="The token's id (see 'token list')."),
                 state: Path | None = _STATE, db: str | None = _DB) -> None:
    """Revoke a token: calls that carry it are refused from now on."""
    store = _store(state, db)
    try:
        if not store.revoke_token(token_id, time.time()):
            raise NvitError(f"no active token {token_id!r}")
    finally:
        store.close()
    Console().print(f"revoked token {token_id}")


def agent(
    server: str = typer.Option(..., "--server", help="URL of the service, e.g. http://gpu-box:8787."),
    token: str | None = typer.Option(None, "--token", envvar="NVIT_TOKEN", help="Bearer token with the agent "
                                     "scope (default: $NVIT_TOKEN).", show_envvar=False),
    work_dir: Path = typer.Option(Path("~/.cache/nvit/agent"), "--work-dir", help="Job folders and downloads."),
    name: str = typer.Option("", "--name", help="Name shown in the device list (default: host-pid)."),
    gpu: bool = typer.Option(False, "--gpu", help="Measure on the CUDA device (default: this CPU)."),
    cuda_index: int = typer.Option(0, "--cuda-index", min=0, help="Which GPU, with --gpu."),
    poll_s: float = typer.Option(20.0, "--poll-s", min=0.5, help="How long one request for work waits."),
) -> None:
    """Run jobs for a service on this device: pulls work (outbound only), holds the device's exclusive lock
    while measuring, heartbeats, uploads results. Stop with Ctrl-C: the job in hand goes back to the queue."""
    from nvit.service.agent import Agent, AgentOptions
    from nvit.vocab import DeviceKind

    _log_service_progress()
    options = AgentOptions(server=server, work_dir=work_dir.expanduser(), name=name, token=token, poll_s=poll_s,
                           device=DeviceKind.CUDA if gpu else DeviceKind.CPU, cuda_index=cuda_index)
    options.work_dir.mkdir(parents=True, exist_ok=True)
    done = Agent(options).run()
    Console(stderr=True).print(f"agent stopped after {done} job(s)")


def register(app: typer.Typer) -> None:
    app.add_typer(serve_app, name="serve")
    app.command("agent")(agent)
