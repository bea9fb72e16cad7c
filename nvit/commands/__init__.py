"""CLI commands, one module per command family; each module exposes ``register(app)``."""

from __future__ import annotations

import importlib

import typer

_MODULES = ("arch", "export", "compare", "profile", "lut", "prune", "train", "demo", "serve")


def register_all(app: typer.Typer) -> None:
    for name in _MODULES:
        importlib.import_module(f"nvit.commands.{name}").register(app)
