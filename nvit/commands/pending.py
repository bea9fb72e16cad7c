"""Commands whose interface exists but whose implementation has not landed yet."""

from __future__ import annotations

import typer

from nvit.errors import NotBuiltError

_PENDING = {
}


def _make(name: str, doc: str):
    def command(ctx: typer.Context) -> None:
        raise NotBuiltError(f"'nvit {name}' is not implemented in this version yet")

    command.__doc__ = doc + " (not implemented yet)"
    command.__name__ = name
    return command


def register(app: typer.Typer) -> None:
    for name, doc in _PENDING.items():
        app.command(name, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(
            _make(name, doc)
        )
