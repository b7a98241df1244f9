"""Outputs never destroy what tfmq did not write, and a crash at any point leaves one complete output."""

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tfmq.errors import TfmqError
from tfmq.files import (
    MARKER_FILE,
    atomic_directory,
    check_output_file,
    check_output_folder,
    owned_json,
    stamped,
    write_json,
)


def write_output(path: Path, text: str, **options) -> None:
    with atomic_directory(path, kind="test", **options) as staging:
        (staging / "result.txt").write_text(text)


def hidden_leftovers(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir() if entry.name.startswith("."))


def test_an_output_of_the_same_kind_is_replaced_whole(tmp_path):
    write_output(tmp_path / "out", "old")
    write_output(tmp_path / "out", "new")
    assert (tmp_path / "out" / "result.txt").read_text() == "new"
    assert json.loads((tmp_path / "out" / MARKER_FILE).read_text())["files"] == ["result.txt"]
    assert hidden_leftovers(tmp_path) == []


@pytest.mark.parametrize("setup, fragment", [
    (lambda out: (out.mkdir(), (out / "notes.txt").write_text("keep")), "was not written by tfmq"),
    (lambda out: out.write_text("keep"), "is not a folder"),
    (lambda out: (write_output(out, "old"), (out / "notes.txt").write_text("keep")), "files tfmq did not write"),
])
def test_anything_else_is_refused_without_overwrite_and_left_as_it_was(tmp_path, setup, fragment):
    out = tmp_path / "out"
    setup(out)
    before = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*"))
    with pytest.raises(TfmqError, match=fragment):
        write_output(out, "new")
    assert sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")) == before
    write_output(out, "new", overwrite=True)  # the user said so
    assert (out / "result.txt").read_text() == "new"


def test_another_kind_of_tfmq_output_is_not_replaced(tmp_path):
    with atomic_directory(tmp_path / "out", kind="quantized-model") as staging:
        (staging / "quantization.json").write_text("{}")
    with pytest.raises(TfmqError, match="tfmq quantized-model output, not a test"):
        write_output(tmp_path / "out", "new")


def test_the_current_folder_its_parents_the_root_and_inputs_are_refused_even_with_overwrite(tmp_path, monkeypatch):
    work = tmp_path / "work"
    model = tmp_path / "model"
    for folder in (work, model):
        folder.mkdir()
        (folder / "notes.txt").write_text("keep")
    monkeypatch.chdir(work)
    for path in (Path("."), Path(".."), Path("/"), Path.home(), model, model / "unet", tmp_path):
        with pytest.raises(TfmqError, match="refusing to write output"):
            check_output_folder(path, "test", overwrite=True, protected=[model])
    assert (work / "notes.txt").read_text() == (model / "notes.txt").read_text() == "keep"
    # A file may go into an input folder (eval's metrics.json), but may not be an input.
    assert check_output_file(model / "metrics.json", owned_json, protected=[model])
    with pytest.raises(TfmqError, match="overlaps the input"):
        check_output_file(model / "notes.txt", owned_json, overwrite=True, protected=[model / "notes.txt"])


def test_unwritable_places_are_refused_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(TfmqError, match="is not a folder"):
        check_output_folder(tmp_path / "file" / "out", "test")
    with pytest.raises(TfmqError, match="is a folder"):
        check_output_file(tmp_path, owned_json)
    if os.geteuid() != 0:  # root writes anywhere; a read-only mount still refuses it (os.access says so)
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(TfmqError, match="not writable"):
            check_output_folder(locked / "out", "test")


def test_output_files_replace_only_what_tfmq_wrote(tmp_path):
    user_file = tmp_path / "metrics.json"
    user_file.write_text(json.dumps({"mine": 1}))
    with pytest.raises(TfmqError, match="was not written by tfmq"):
        check_output_file(user_file, owned_json)
    write_json(tmp_path / "ours.json", stamped({"fid": 1.0}))
    assert check_output_file(tmp_path / "ours.json", owned_json)


def test_json_has_no_nan(tmp_path):
    path = write_json(tmp_path / "a.json", {"value": float("nan"), "rows": [float("inf"), 1.5]})
    assert json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(name)) == {
        "value": None, "rows": [None, 1.5]}


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_permissions_follow_the_umask(tmp_path, mask):
    previous = os.umask(mask)
    try:
        write_output(tmp_path / "out", "x")
        write_json(tmp_path / "a.json", {})
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((tmp_path / "out" / "result.txt").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~mask


KILL_BETWEEN_RENAMES = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import tfmq.files as files

    renames = []
    real_rename = os.rename

    def rename(source, target):
        renames.append((source, target))
        if len(renames) == 2:  # the old output is aside, the new one not yet in place: die like kill -9
            os._exit(9)
        real_rename(source, target)

    files.os.rename = rename
    with files.atomic_directory(Path(sys.argv[1]), kind="test") as staging:
        (staging / "result.txt").write_text("new")
""")


def test_a_kill_between_the_two_renames_loses_nothing_and_the_next_run_recovers(tmp_path):
    out = tmp_path / "out"
    write_output(out, "old")
    killed = subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, str(out)], capture_output=True)
    assert killed.returncode == 9
    assert not out.exists()
    left = hidden_leftovers(tmp_path)
    assert len(left) == 2 and {name.split(".")[2].rsplit("-", 2)[0] for name in left} == {
        "tfmq-staging", "tfmq-previous"}
    previous = next(tmp_path / name for name in left if "tfmq-previous" in name)
    assert (previous / "result.txt").read_text() == "old"  # one complete output exists all along
    # The next run on that path puts the previous output back, drops the dead run's staging, then writes.
    with atomic_directory(out, kind="test") as staging:
        assert (out / "result.txt").read_text() == "old"
        (staging / "result.txt").write_text("newer")
    assert (out / "result.txt").read_text() == "newer"
    assert hidden_leftovers(tmp_path) == []


def test_a_live_runs_staging_is_left_alone(tmp_path):
    live = tmp_path / f".out.tfmq-staging-{os.getppid()}-abcd"
    live.mkdir()
    write_output(tmp_path / "out", "x")
    assert live.is_dir()


def test_cli_out_dot_keeps_the_users_files(tmp_path):
    (tmp_path / "notes.txt").write_text("keep")
    cli = [sys.executable, "-m", "tfmq.cli", "sample", "--steps", "2", "--num", "2", "--quiet"]
    done = subprocess.run([*cli, "--out", "."], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "current folder" in done.stderr
    done = subprocess.run([*cli, "--out", "notes.txt"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 2 and "is not a folder" in done.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "keep"


def test_a_kill_while_writing_leaves_nothing_that_looks_complete(tmp_path):
    script = textwrap.dedent("""
        import os, sys
        from pathlib import Path
        import tfmq.files as files

        with files.atomic_directory(Path(sys.argv[1]), kind="test") as staging:
            (staging / "half.txt").write_text("half")
            os._exit(9)
    """)
    killed = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out")], capture_output=True)
    assert killed.returncode == 9 and not (tmp_path / "out").exists()
    write_output(tmp_path / "out", "whole")
    assert hidden_leftovers(tmp_path) == []
