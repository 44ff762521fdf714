"""Resume after SIGKILL: a tiny CPU run killed at several points, resumed each time, ends exactly where an
uninterrupted run with the same seed ends (deterministic mode): same summary.json, masks and models.

Each run is a separate process (tests/kill_at.py) killed with SIGKILL, so nothing of the killed process
gets to clean up: no `finally`, no lock release, half-written files stay where they are."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llt.reporting.listing import list_runs
from llt.storage import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
KILL_AT = REPO / "tests" / "kill_at.py"

TINY = ["--preset", "demo", "--set", "model.width=4", "--set", "train.epochs=3", "--set", "train.milestones=[2]",
        "--set", "data.num_tasks=2", "--set", "data.exemplars_per_class=5", "--set", "train.batch_size=64",
        "--set", "prune.rate=0.2", "--set", "prune.finetune_epochs=3", "--set", "prune.max_rounds=2",
        "--set", "prune.retrain_after=false", "--set", "run.deterministic=true", "--set", "data.pool_size=300"]


def llt(point: str, arg: str, *args: str, grow: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, str(KILL_AT), point, arg, *(["--grow"] if grow else []), "--", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def killed(p: subprocess.CompletedProcess) -> bool:
    return p.returncode == -signal.SIGKILL


def run_args(out: Path, method: str, *extra: str) -> list[str]:
    return ["run", *TINY, "--set", f"run.method={method}", "--out", str(out), "--quiet", *extra]


def the_run(out: Path) -> Path:
    [rd] = [p for p in out.iterdir() if p.is_dir()]
    return rd


def assert_same_result(a: Path, b: Path) -> None:
    """Same summary, and bit-identical masks and stored models (every file that a finished run keeps)."""
    assert json.loads((a / "summary.json").read_text()) == json.loads((b / "summary.json").read_text())
    files = sorted(str(p.relative_to(a)) for p in (a / "masks").glob("*.pt")) + \
        sorted(str(p.relative_to(a)) for p in (a / "checkpoints").glob("*.pt"))
    assert files and files == sorted(str(p.relative_to(b)) for p in (b / "masks").glob("*.pt")) + \
        sorted(str(p.relative_to(b)) for p in (b / "checkpoints").glob("*.pt"))
    for name in files:
        x, _ = load_checkpoint(a / name)
        y, _ = load_checkpoint(b / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    for rd in (a, b):       # nothing half-done is left behind
        assert not (rd / "checkpoints" / "epoch").exists() and not (rd / "lock").exists()
        assert not list(rd.rglob("*.tmp"))


def epoch_of(path: Path) -> int:
    """The epoch an epoch checkpoint holds (it must load: a whole file)."""
    return json.loads(torch.load(path, weights_only=True)["meta"])["epoch"]


@pytest.fixture(scope="module")
def reference_bu(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    p = llt("none", "0", *run_args(out, "bu"), grow=True)
    assert p.returncode == 0, p.stderr
    return the_run(out)


def test_bottom_up_killed_at_four_points_resumes_to_the_uninterrupted_result(reference_bu, tmp_path):
    out = tmp_path / "out"
    args = run_args(out, "bu")

    # 1. inside an epoch: the third epoch of the task-1 reference training
    p = llt("epoch-step", "2", *args, grow=True)
    assert killed(p), p.stderr
    rd = the_run(out)
    assert epoch_of(rd / "checkpoints/epoch/bu-ref1.pt") == 2
    assert not (rd / "stages/ref1.done").exists() and (rd / "lock").is_file()     # the lock is left behind
    [row] = list_runs(out)
    assert row["state"] == "interrupted in bu-ref1 epoch 2/3" and row["final_sa"] is None

    # 2. `llt resume`: the training continues after epoch 2; killed inside pruning level 1 of task 1,
    #    right after the pruning (nothing of the level written yet)
    p = llt("prune", "1", "resume", str(rd), "--quiet", grow=True)
    assert killed(p), p.stderr
    assert "taking over" in p.stderr and "which stopped without releasing it" in p.stderr
    assert "task 1/2 reference: continuing after epoch 2 of 3" in p.stdout
    assert (rd / "stages/ref1.done").is_file() and not (rd / "stages/task1-level1.done").exists()
    assert not (rd / "checkpoints/epoch").exists()          # the finished stage took its epoch checkpoint along

    # 3. the same `llt run` command: level 1 again; killed in the middle of writing an epoch checkpoint
    #    over the previous one
    p = llt("checkpoint-write", "0", *args, grow=True)
    assert killed(p), p.stderr
    [tmp] = list((rd / "checkpoints/epoch").glob(".bu-task1-level1.pt.*.tmp"))
    assert tmp.stat().st_size > 0
    good = epoch_of(rd / "checkpoints/epoch/bu-task1-level1.pt")        # the previous checkpoint is whole
    assert good in (1, 2)

    # 4. resumed from that checkpoint; killed between tasks (right after task 1's marker)
    p = llt("done", "task1", "resume", str(rd), "--quiet", grow=True)
    assert killed(p), p.stderr
    assert f"task 1/2 level 1: continuing after epoch {good} of 3" in p.stdout
    assert not list(rd.rglob("*.tmp"))                       # the torn temporary was cleaned up
    assert (rd / "stages/task1.done").is_file() and not (rd / "stages/ref2.done").exists()

    # 5. to the end
    p = llt("none", "0", "resume", str(rd), "--quiet", grow=True)
    assert p.returncode == 0, p.stderr
    assert "task 1: ticket finished before (stage marker present), skipping" in p.stdout
    assert_same_result(rd, reference_bu)
    resumes = [json.loads(line) for line in (rd / "records.jsonl").read_text().splitlines()
               if '"resume"' in line]
    assert [(r["key"], r["epoch"]) for r in resumes] == [("bu-ref1", 2), ("bu-task1-level1", good)]


@pytest.mark.parametrize("method, extra, epochs_before_kill", [
    ("td", ["--set", "prune.td_rounds=[2,1]", "--set", "prune.finetune_epochs=2"], 4),   # in a level's fine-tuning
    ("cil", [], 4),                                                                      # in task 2
])
def test_top_down_and_dense_runs_killed_inside_an_epoch_resume_to_the_same_result(method, extra, epochs_before_kill,
                                                                                   tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    p = llt("none", "0", *run_args(ref, method, *extra))
    assert p.returncode == 0, p.stderr
    p = llt("epoch-step", str(epochs_before_kill), *run_args(out, method, *extra))
    assert killed(p), p.stderr
    assert list((the_run(out) / "checkpoints/epoch").glob("*.pt"))
    p = llt("none", "0", *run_args(out, method, *extra))
    assert p.returncode == 0, p.stderr
    assert "continuing after epoch" in p.stdout
    assert_same_result(the_run(out), the_run(ref))


# ------------------------------------------------------------------------------------------ llt resume: bad inputs

DENSE = ["--preset", "demo", "--set", "run.method=cil", "--set", "data.num_tasks=2", "--set", "train.epochs=1",
         "--set", "model.width=4", "--set", "data.exemplars_per_class=3", "--quiet"]


@pytest.fixture(scope="module")
def dense_original(tmp_path_factory):
    from llt.cli import main

    out = tmp_path_factory.mktemp("dense")
    assert main(["run", *DENSE, "--out", str(out)]) == 0
    return the_run(out)


@pytest.fixture()
def dense_run(dense_original, tmp_path):
    """A private copy of a finished dense run (tests damage it)."""
    return Path(shutil.copytree(dense_original, tmp_path / "runs" / dense_original.name))


def snapshot(rd: Path) -> dict:
    return {str(p.relative_to(rd)): p.read_bytes() for p in rd.rglob("*") if p.is_file()}


def test_resume_of_a_finished_run_checks_every_stage_and_changes_nothing(dense_run, capsys):
    from llt.cli import main

    before = snapshot(dense_run)
    assert main(["resume", str(dense_run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "is finished; checking every stage" in out and out.count("finished before (stage marker present)") == 2
    after = snapshot(dense_run)
    assert {k: v for k, v in after.items() if k != "summary.json"} == \
        {k: v for k, v in before.items() if k != "summary.json"}
    assert json.loads(after["summary.json"]) == json.loads(before["summary.json"])


@pytest.mark.parametrize("damage, message", [
    ("no-run", "is not an llt run directory (no manifest.json)"),
    ("manifest-json", "manifest.json: not a valid llt manifest"),
    ("manifest-schema", "manifest.json: not a valid llt manifest"),
    ("format", "was written by run-directory format 0; this llt writes format 2"),
    ("truncated", "checkpoints/task1.pt: not a valid llt checkpoint"),
    ("code", "checkpoints/task1.pt: not a valid llt checkpoint (names posix.system"),
    ("retrain-json", "retrain.json: not a valid re-training record"),
])
def test_resume_refuses_files_that_are_not_what_they_claim(dense_run, tmp_path, capsys, damage, message):
    from conftest import Evil

    from llt.cli import main

    target, sentinel = dense_run, tmp_path / "code-ran"
    (dense_run / "summary.json").unlink()          # an unfinished run: resume must read its checkpoints
    manifest = json.loads((dense_run / "manifest.json").read_text())
    if damage == "no-run":
        target = tmp_path / "elsewhere"
        target.mkdir()
    elif damage == "manifest-json":
        (dense_run / "manifest.json").write_text('{"format_version": 1, "config": ')
    elif damage == "manifest-schema":
        (dense_run / "manifest.json").write_text(json.dumps({"format_version": 1, "config": {"run": {"epochs": 3}}}))
    elif damage == "format":
        (dense_run / "manifest.json").write_text(json.dumps({**manifest, "format_version": 0}))
    elif damage == "truncated":
        data = (dense_run / "checkpoints/task1.pt").read_bytes()
        (dense_run / "checkpoints/task1.pt").write_bytes(data[: len(data) // 3])
    elif damage == "code":
        torch.save({"state": Evil(sentinel), "meta": "{}"}, dense_run / "checkpoints/task1.pt")
    else:
        (dense_run / "retrain.json").write_text('["not", "a", "record"]')
    before = snapshot(dense_run)
    assert main(["resume", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llt: error: ") and message in err and "Traceback" not in err and err.count("\n") == 1
    assert not sentinel.exists()
    assert snapshot(dense_run) == before           # nothing lost, nothing half-written, no lock left


def test_sigterm_stops_cleanly_and_the_run_continues(tmp_path):
    """A scheduler's SIGTERM unwinds like Ctrl-C: the lock is released, the last epoch is saved first."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "llt", *run_args(out, "cil")[:-1], "--jsonl"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    epochs = 0
    for line in proc.stderr:
        if line.startswith('{"event": "epoch"'):
            epochs += 1
            if epochs == 2:
                proc.send_signal(signal.SIGTERM)
                break
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 143
    assert "llt: stopped by SIGTERM; finished stages and the last epoch checkpoint are kept" in rest
    rd = the_run(out)
    assert not (rd / "lock").exists() and not list(rd.rglob("*.tmp"))
    [ckpt] = list((rd / "checkpoints/epoch").glob("*.pt"))
    assert epoch_of(ckpt) == 2                     # the last finished epoch was written before stopping
    p = llt("none", "0", "resume", str(rd), "--quiet")
    assert p.returncode == 0, p.stderr
    assert "task 1/2: continuing after epoch 2 of 3" in p.stdout and (rd / "summary.json").is_file()
