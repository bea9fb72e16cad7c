"""CLI options several commands take, declared once (each command's own options stay with it)."""

from __future__ import annotations

import typer

#: ``nvit compare`` and ``nvit demo``: how a measurement that was not quiet ends.
STRICT_MEASUREMENTS = typer.Option(
    False, "--strict", help="Fail (exit 1) instead of warning when the measurements were not quiet: a noisy row, "
    "a measured order contradicting the predicted one, or a busy machine.")
#: ``nvit profile`` and ``nvit export --measure``: the CPU backends' threads.
THREADS = typer.Option(None, "--threads", help="Intra-op threads of CPU backends; give a table's own "
                       "(nvit lut show) to time as it was profiled.", show_default="every available core")
#: ``nvit profile`` and ``nvit export --measure``: any other backend option.
BACKEND_OPTIONS = typer.Option([], "--backend-option", help="Backend option KEY=VALUE (repeatable), e.g. "
                               "allow_spinning=false or harness='{\"time_cap_s\": 1}'.")
#: ``nvit lut predict`` and ``nvit prune``: refuse a table of another precision.
REQUIRE_PRECISION = typer.Option(None, "--precision", help="Require a table of this precision.")
