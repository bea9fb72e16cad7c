"""Run the ``nvit`` CLI in-process the way a shell would: exit code, stdout and stderr."""

from __future__ import annotations

from nvit.cli import main


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out = capsys.readouterr()
    return code, out.out, out.err
