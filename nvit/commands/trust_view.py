"""How the CLI shows a measurement's trust: a row's noise cell and the report's verdict line."""

from __future__ import annotations

from typing import Any


def noise_cell(noise: tuple[str, ...]) -> str:
    return f"[yellow]{', '.join(noise)}[/]" if noise else "[green]ok[/]"


def trust_markup(trust: Any) -> str:
    colour = {"quiet": "green", "noisy": "yellow"}.get(trust.verdict.value, "red")
    lines = [f"[{colour}]{trust.line()}[/]"] + [f"  [{colour}]{c}[/]" for c in trust.conflicts]
    return "\n".join(lines)


def conditions_markup(conditions: dict[str, Any] | None, while_: str) -> str:
    """The machine's judged state while it measured something (``while_``: "profiling", "timing")."""
    if not conditions:
        return "[yellow]machine conditions not recorded[/] (measured before nvit watched them)"
    from nvit.profiler.conditions import Conditions

    c = Conditions.from_dict(conditions)
    colour = {"quiet": "green", "noisy": "yellow"}.get(c.verdict.value, "red")
    return f"conditions while {while_}: [{colour}]{c.summary()}[/]"
