"""The ``nvit`` command line: a thin Typer app over the library.

Every command lives in :mod:`nvit.commands` and only parses options, calls the library and prints.
Library errors (:class:`~nvit.errors.NvitError`) become one red line and a non-zero exit code;
``NVIT_DEBUG=1`` shows the full traceback instead.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import typer
from rich.console import Console
from rich.markup import escape

from nvit import __version__
from nvit.commands import register_all
from nvit.errors import NvitError

app = typer.Typer(
    name="nvit",
    help=(
        "Latency-driven architecture search for Vision Transformers: profile a GPU into a latency lookup "
        "table, prune a pretrained ViT globally with Hessian-aware saliency until it meets a latency "
        "target, export it, and compare measured against predicted latency."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"nvit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log library progress (INFO) to stderr."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


register_all(app)


def debug_enabled() -> bool:
    return os.environ.get("NVIT_DEBUG", "").strip() not in ("", "0", "false", "no")


def _rank_prefix() -> str:
    """``[rank N] `` under torchrun for ranks other than 0, so a multi-process error says where it came from."""
    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    return f"[rank {rank}] " if world not in ("", "1") and rank not in ("", "0") else ""


def _tell_launcher(message: str) -> None:
    """Under torchrun, leave the one-line error where its failure report looks (instead of "To enable
    traceback see ..."): the JSON error file named by ``TORCHELASTIC_ERROR_FILE``."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump({"message": {"message": message, "extraInfo": {"timestamp": str(int(time.time()))}}}, fh)
    except OSError:
        pass  # the launcher then reports the exit code alone


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        app(args=argv, prog_name="nvit")
    except NvitError as exc:
        if debug_enabled():
            raise
        err_console.print(f"[bold red]error:[/] {escape(_rank_prefix() + str(exc))}", soft_wrap=True,
                          highlight=False)
        _tell_launcher(f"nvit error: {exc}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        if debug_enabled():
            raise
        err_console.print("[bold red]interrupted[/]; completed work was saved, rerun the command to resume")
        sys.exit(130)
