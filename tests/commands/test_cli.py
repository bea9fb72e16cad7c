"""The CLI: commands listed, `arch show`, one-line errors, NVIT_DEBUG tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

from cli_run import run_cli as run


def test_help_lists_the_commands(capsys) -> None:
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    for command in ("profile", "prune", "export", "compare", "demo", "arch"):
        assert command in out


def test_arch_show_deit_base(capsys) -> None:
    code, out, _ = run(["arch", "show", "deit_base"], capsys)
    assert code == 0
    assert "86.57 M params" in out and "17.56 GMACs" in out
    assert out.count("3072") == 12  # one row per block


def test_arch_show_json_file(tmp_path, capsys) -> None:
    from nvit.arch import ArchSpec, BlockSpec, save_arch

    spec = ArchSpec(embed_dim=32, blocks=(BlockSpec(2, 8, 16, 64), BlockSpec(1, 8, 8, 32)), img_size=8,
                    patch_size=2, in_chans=1, num_classes=10, name="mine")
    path = save_arch(spec, tmp_path / "arch.json")
    code, out, _ = run(["arch", "show", str(path), "--json"], capsys)
    assert code == 0
    doc = json.loads(out)
    assert doc["summary"]["params"] == spec.num_params()
    assert doc["arch"]["blocks"][0] == {"heads": 2, "qk_dim": 8, "v_dim": 16, "mlp_dim": 64}


def test_bad_spec_file_gives_one_line_and_exit_1(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"embed_dim": 64, "blocks": [{"heads": 0, "qk_dim": 8, "v_dim": 8, "mlp_dim": 8}]}')
    code, _, err = run(["arch", "show", str(bad)], capsys)
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "must all be positive (attention) or all 0 (no attention)" in lines[0]
    assert "Traceback" not in err


def test_debug_env_shows_traceback(tmp_path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    env_run = subprocess.run(
        [sys.executable, "-m", "nvit", "arch", "show", str(bad)],
        capture_output=True, text=True, env={"NVIT_DEBUG": "1", "PATH": ""}, check=False,
    )
    assert env_run.returncode != 0
    assert "Traceback" in env_run.stderr and "SpecError" in env_run.stderr


def test_profile_defaults_agree_everywhere() -> None:
    """The CLI and the service's profile job spell SweepOptions' defaults as literals: they must agree."""
    from nvit.commands import profile
    from nvit.profiler.sweep import SweepOptions
    from nvit.service.jobspec import ProfileRequest

    options = SweepOptions()
    assert options.calibration_models == profile.DEFAULT_CALIBRATION_MODELS
    assert options.check_models == profile.DEFAULT_CHECK_MODELS
    job = ProfileRequest(kind="profile", space="vit_test")
    assert (job.calibrate, job.check) == (options.calibration_models, options.check_models)
