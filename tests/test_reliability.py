"""Run-directory lock (held, left by a dead process, noted by another host, raced for), format versions,
machine-readable progress, full disks."""

import json
import os
import platform
import subprocess
import sys

from conftest import REPO, full_disk

from llt.cli import main
from llt.config import load_config
from llt.reporting.listing import list_runs
from llt.runs import RunDir, run_name

STREAM = ["run", "--preset", "demo", "--set", "run.method=stream", "--quiet"]


def first_run(tmp_path):
    assert main([*STREAM, "--out", str(tmp_path)]) == 0
    [rd] = list(tmp_path.iterdir())
    return rd


def snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_run_directory_in_use_is_refused(tmp_path, capsys):
    rd = first_run(tmp_path)
    with RunDir(rd).lock():                 # an OS lock: a second open file description cannot take it
        before = snapshot(rd)
        assert list_runs(tmp_path)[0]["state"].startswith(f"running (process {os.getpid()}")
        assert main([*STREAM, "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert f"is in use by process {os.getpid()} on host {platform.node()}" in err and len(err.splitlines()) == 1
        assert snapshot(rd) == before       # nothing written, the owner's note left alone
    assert not (rd / "lock").exists()       # released: the owner note goes, the run is usable again
    assert main([*STREAM, "--out", str(tmp_path)]) == 0


def test_a_refused_process_names_the_live_owner_not_the_note_of_a_dead_one(tmp_path):
    """The owner writes its note just after taking the lock; a process refused in between must wait for
    that note rather than name the dead process whose note is still there (a race the test below hit)."""
    import fcntl
    import threading

    import pytest

    from llt.errors import LLTError

    rd = tmp_path / "run"
    rd.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (rd / "lock").write_text(json.dumps({"host": platform.node(), "pid": dead.pid, "since": 0}))
    fd = os.open(rd / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)                       # the lock is taken, its note not written yet
    note = json.dumps({"host": platform.node(), "pid": os.getpid(), "since": 0, "command": "llt run"})
    threading.Timer(0.3, lambda: (rd / "lock").write_text(note)).start()
    try:
        with pytest.raises(LLTError, match=f"in use by process {os.getpid()} on host"):
            with RunDir(rd).lock():
                pass
    finally:
        os.close(fd)


def test_a_lock_left_by_a_dead_process_is_taken_over_and_released(tmp_path, capsys):
    rd = first_run(tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (rd / "lock").write_text(json.dumps({"host": platform.node(), "pid": dead.pid, "since": 0, "command": "llt run"}))
    assert main([*STREAM, "--out", str(tmp_path)]) == 0
    assert f"taking over {rd.name} from process {dead.pid}" in capsys.readouterr().err
    assert not (rd / "lock").exists()


def test_a_note_from_another_host_does_not_block_when_nobody_holds_the_lock(tmp_path, capsys):
    # The OS lock is the truth: a process on another host that still ran would hold it (on a file
    # system with working locks); an owner note alone is what a crashed machine leaves behind.
    rd = first_run(tmp_path)
    (rd / "lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": 0}))
    assert main([*STREAM, "--out", str(tmp_path)]) == 0
    assert "from process 1 on host elsewhere" in capsys.readouterr().err


RACE = ["run", "--preset", "demo", "--set", "run.method=cil", "--set", "data.num_tasks=2", "--set", "train.epochs=3",
        "--set", "model.width=4", "--set", "data.exemplars_per_class=3", "--quiet"]


def test_processes_that_start_the_same_run_at_once_train_it_once(tmp_path):
    """Four processes start the same run within milliseconds of each other, on a run directory holding a
    lock note of a dead process (the case where two processes could both take a stale lock): exactly one
    trains; the others stop at once with one line naming it; the run's files are whole."""
    out = tmp_path / "runs"
    rd = out / run_name(load_config("demo", [a for a in RACE[4::2] if "=" in a]), "demo")
    rd.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (rd / "lock").write_text(json.dumps({"host": platform.node(), "pid": dead.pid, "since": 0}))
    # a barrier: each process imports torch and llt, says it is ready, and waits for the other three
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    code = ("import pathlib, sys, time; from llt.cli import main; b = pathlib.Path(sys.argv[1]); "
            "(b / sys.argv[2]).touch()\nwhile len(list(b.iterdir())) < 4: time.sleep(0.002)\n"
            "sys.exit(main(sys.argv[3:]))")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(barrier), str(i), *RACE, "--out", str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    results = [(p.wait(timeout=240), p.stdout.read(), p.stderr.read(), p.pid) for p in procs]
    winners = [r for r in results if r[0] == 0]
    assert len(winners) == 1, [(r[0], r[2][-300:]) for r in results]
    winner = winners[0]
    assert "task 2/2" in winner[1] and "finished before" not in winner[1]
    for rc, stdout, stderr, _ in (r for r in results if r is not winner):
        assert rc == 2 and "task 1/2" not in stdout
        assert stderr.count("\n") == 1 and f"is in use by process {winner[3]} on host" in stderr, stderr
    assert [d.name for d in out.iterdir()] == [rd.name]
    records = [json.loads(line) for line in (rd / "records.jsonl").read_text().splitlines()]
    assert [r["task"] for r in records if r["event"] == "task"] == [1, 2]       # trained once
    summary = json.loads((rd / "summary.json").read_text())
    assert summary["num_tasks"] == 2 and not (rd / "lock").exists()
    assert not any(p.name.endswith(".tmp") for p in rd.rglob("*"))


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
