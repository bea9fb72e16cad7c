"""An ``--out`` that cannot be what a command writes (a file where a folder goes, a folder where a file goes)
is refused before any work with one error line and exit code 1."""

from __future__ import annotations

import pytest
from cli_run import run_cli

from nvit.errors import OutputError
from nvit.fileio import atomic_write_text, output_file, output_folder

FOLDER_COMMANDS = {
    "export": ["export", "vit_test"],
    "compare": ["compare", "vit_test", "--lut", "missing.parquet"],
    "train": ["train", "--epochs", "1"],
    "prune": ["prune", "--target-ratio", "0.5", "--lut", "missing.parquet"],
    "demo": ["demo", "--quick"],
}


@pytest.mark.parametrize("command", sorted(FOLDER_COMMANDS))
def test_a_folder_out_that_is_a_file_is_one_error_line(command, tmp_path, capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    code, _, err = run_cli([*FOLDER_COMMANDS[command], "--out", str(blocker)], capsys)
    assert code == 1
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"--out {blocker} must be a folder, but a file is in the way" in err.replace("\n", "")
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("argv", [["profile", "--space", "vit_test"], ["lut", "merge", "a.parquet", "b.parquet"]])
def test_a_file_out_that_is_a_folder_is_one_error_line(argv, tmp_path, capsys):
    code, _, err = run_cli([*argv, "--out", str(tmp_path)], capsys)
    assert code == 1 and err.count("\n") == 1
    assert f"--out {tmp_path} is a folder; give a file name" in err


def test_output_path_checks(tmp_path):
    (tmp_path / "file").write_text("x")
    assert output_folder(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert output_folder(tmp_path) == tmp_path
    with pytest.raises(OutputError, match=r"sub must be a folder, but a file is in the way \(its parent .*file is"):
        output_folder(tmp_path / "file" / "sub")
    assert output_file(tmp_path / "new.parquet") == tmp_path / "new.parquet"
    assert output_file(tmp_path / "file") == tmp_path / "file"  # an existing file may be replaced or resumed
    with pytest.raises(OutputError, match="the folder of --out"):
        output_file(tmp_path / "file" / "t.parquet")


def test_atomic_writes_report_a_blocked_path_in_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=r"folder .*file/sub must be a folder"):
        atomic_write_text(tmp_path / "file" / "sub" / "a.json", "{}")
    with pytest.raises(OutputError, match="is a folder; a file cannot be written there"):
        atomic_write_text(tmp_path, "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
