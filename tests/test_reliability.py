"""Run-directory lock (live, stale and foreign owners), format versions, machine-readable progress."""

import json
import os
import platform
import subprocess

from conftest import full_disk

from llt.cli import main

STREAM = ["run", "--preset", "demo", "--set", "run.method=stream", "--quiet"]


def first_run(tmp_path):
    assert main([*STREAM, "--out", str(tmp_path)]) == 0
    [rd] = list(tmp_path.iterdir())
    return rd


def test_a_run_directory_in_use_is_refused(tmp_path, capsys):
    rd = first_run(tmp_path)
    (rd / "lock").write_text(json.dumps({"host": platform.node(), "pid": os.getpid(), "since": 0}))
    assert main([*STREAM, "--out", str(tmp_path)]) == 2
    assert f"is in use by process {os.getpid()}" in capsys.readouterr().err
    assert (rd / "lock").is_file()                      # the owner's lock is left alone


def test_a_stale_lock_is_taken_over_and_released(tmp_path, capsys):
    rd = first_run(tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (rd / "lock").write_text(json.dumps({"host": platform.node(), "pid": dead.pid, "since": 0}))
    assert main([*STREAM, "--out", str(tmp_path)]) == 0
    assert f"removing a stale lock of process {dead.pid}" in capsys.readouterr().err
    assert not (rd / "lock").exists()


def test_a_lock_from_another_host_is_not_guessed_at(tmp_path, capsys):
    rd = first_run(tmp_path)
    (rd / "lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": 0}))
    assert main([*STREAM, "--out", str(tmp_path)]) == 2
    assert "locked by process 1 on host elsewhere" in capsys.readouterr().err


def test_a_run_directory_of_another_format_is_refused(tmp_path, capsys):
    rd = first_run(tmp_path)
    manifest = json.loads((rd / "manifest.json").read_text())
    manifest["format_version"] = 0
    (rd / "manifest.json").write_text(json.dumps(manifest))
    assert main([*STREAM, "--out", str(tmp_path)]) == 2
    assert "was written by run-directory format 0" in capsys.readouterr().err


def test_jsonl_progress_is_one_json_object_per_epoch(tmp_path, capsys):
    args = ["run", "--preset", "demo", "--set", "run.method=cil", "--set", "data.num_tasks=2", "--set", "train.epochs=2",
            "--set", "model.width=4", "--set", "data.exemplars_per_class=3", "--jsonl", "--out", str(tmp_path)]
    assert main(args) == 0
    err = capsys.readouterr().err
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert [(e["stage"], e["epoch"]) for e in events] == [("task 1/2", 1), ("task 1/2", 2), ("task 2/2", 1), ("task 2/2", 2)]
    assert all({"loss", "val", "lr", "seconds", "run_seconds_left"} <= set(e) for e in events)
    assert events[-1]["run_seconds_left"] == 0


def test_a_full_disk_stops_cleanly_and_the_run_continues_later(tmp_path, capsys, monkeypatch):
    disk = full_disk(lambda path: "task2" in path)
    args = ["run", "--preset", "demo", "--set", "run.method=cil", "--set", "data.num_tasks=2", "--set", "train.epochs=1",
            "--set", "model.width=4", "--set", "data.exemplars_per_class=3", "--quiet", "--out", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("llt: error: no space left on the device while writing") and "Traceback" not in err
    [rd] = list(tmp_path.iterdir())
    assert (rd / "stages/task1.done").is_file() and not (rd / "stages/task2.done").exists()
    assert not any(p.name.endswith(".tmp") for p in rd.rglob("*")) and not (rd / "lock").exists()
    disk.undo()
    assert main(args) == 0 and (rd / "summary.json").is_file()


def test_a_full_disk_while_writing_an_epoch_checkpoint_stops_cleanly(tmp_path, capsys, monkeypatch):
    disk = full_disk(lambda path: "checkpoints/epoch" in path)
    args = ["run", "--preset", "demo", "--set", "run.method=cil", "--set", "data.num_tasks=2", "--set", "train.epochs=2",
            "--set", "model.width=4", "--set", "data.exemplars_per_class=3", "--quiet", "--out", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("llt: error: no space left on the device while writing") and "checkpoints/epoch" in err
    assert "Traceback" not in err
    [rd] = list(tmp_path.iterdir())
    assert not (rd / "stages/task1.done").exists() and not (rd / "lock").exists()
    assert not any(p.name.endswith(".tmp") for p in rd.rglob("*"))
    disk.undo()
    assert main(args) == 0 and (rd / "summary.json").is_file()
    # with checkpoints off nothing is written per epoch (and the run directory is the same one)
    assert main([*args, "--set", "run.checkpoint_every=0"]) == 0 and len(list(tmp_path.iterdir())) == 1
