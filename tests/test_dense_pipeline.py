"""The dense class-incremental pipeline end to end on the embedded digits (tiny model, CPU, seconds):
artifacts, resume across invocations, `llt eval`, and the bad inputs of the dense issue."""

import json
import shutil

import numpy as np
import pytest
import torch

from llt.cli import main
from llt.storage import load_checkpoint
from llt.trainer import Trainer

FAST = ["--set", "run.method=cil", "--set", "model.width=4", "--set", "train.epochs=2", "--set", "train.milestones=[1]",
        "--set", "data.num_tasks=3", "--set", "data.exemplars_per_class=5", "--set", "train.batch_size=32"]


def run(tmp_path, capsys, *extra, name="runs"):
    code = main(["run", "--preset", "demo", "--out", str(tmp_path / name), "--quiet", *FAST, *extra])
    out, err = capsys.readouterr()
    dirs = list((tmp_path / name).iterdir()) if (tmp_path / name).is_dir() else []
    return code, out, err, (dirs[0] if dirs else None)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One uninterrupted run, shared by several tests."""
    tmp = tmp_path_factory.mktemp("dense")
    assert main(["run", "--preset", "demo", "--out", str(tmp / "runs"), "--quiet", *FAST]) == 0
    [rd] = list((tmp / "runs").iterdir())
    return rd


def test_run_writes_every_artifact(finished):
    rd = finished
    summary = json.loads((rd / "summary.json").read_text())
    assert summary["method"] == "cil" and summary["dataset"] == "digits" and summary["num_tasks"] == 3
    assert [len(r) for r in summary["accuracy_matrix"]] == [1, 2, 3]
    assert summary["remaining_weights"] == [100.0, 100.0, 100.0] and summary["forgetting"][0] is None
    assert summary["sa"][-1] == pytest.approx(np.mean(summary["accuracy_matrix"][-1]))
    for t in (1, 2, 3):
        state, meta = load_checkpoint(rd / f"checkpoints/task{t}.pt")
        assert meta["row"] == pytest.approx(summary["accuracy_matrix"][t - 1], abs=1e-3) and "conv1.weight" in state
        assert (rd / f"stages/task{t}.done").is_file()
    for t in (1, 2):   # teaching sets after tasks 1 and 2 (none after the last task)
        state, meta = load_checkpoint(rd / f"teaching/task{t}.pt")
        assert state["images"].dtype == torch.uint8 and state["logits_main"].shape[1] == 2 * t
        assert meta["num_exemplars"] == 5 * 2 * t
    assert not (rd / "teaching/task3.pt").exists()
    events = [json.loads(line)["event"] for line in (rd / "records.jsonl").read_text().splitlines()]
    assert events == ["training", "task", "teaching", "training", "task", "teaching", "training", "task"]
    budget = summary["budget"]               # one training per task, one pass over data + memory per epoch
    assert [b["trainings"] for b in budget] == [1, 1, 1] and all(b["steps"] == b["epochs"] * b["steps_per_epoch"]
                                                                for b in budget)
    assert budget[0]["unlabeled_images"] == 0 and budget[1]["unlabeled_images"] > 0


def test_rerun_skips_finished_stages(finished, capsys):
    out_dir = finished.parent
    before = (finished / "summary.json").read_text()
    assert main(["run", "--preset", "demo", "--out", str(out_dir), "--quiet", *FAST]) == 0
    out = capsys.readouterr().out
    assert out.count("finished before (stage marker present), skipping") == 3
    assert json.loads((finished / "summary.json").read_text()) == json.loads(before)


def test_interrupted_run_continues_and_matches_an_uninterrupted_one(finished, tmp_path, capsys, monkeypatch):
    # fail in task 3 (a NaN loss), then run the same command again without the fault
    real = Trainer.distill_loss

    def failing(self, k, *a, **kw):
        loss = real(self, k, *a, **kw)
        return loss * float("nan") if k == 2 else loss

    monkeypatch.setattr(Trainer, "distill_loss", failing)
    code, out, err, rd = run(tmp_path, capsys)
    assert code == 2 and "the loss became nan in task 3, epoch 1" in err and "Traceback" not in err
    assert (rd / "stages/task2.done").is_file() and not (rd / "stages/task3.done").exists()
    assert (rd / "checkpoints/task2.pt").is_file() and not (rd / "summary.json").exists()
    monkeypatch.setattr(Trainer, "distill_loss", real)
    code, out, err, rd = run(tmp_path, capsys)
    assert code == 0 and out.count("skipping") == 2
    resumed = json.loads((rd / "summary.json").read_text())
    reference = json.loads((finished / "summary.json").read_text())
    assert resumed["accuracy_matrix"] == reference["accuracy_matrix"]
    a, _ = load_checkpoint(rd / "checkpoints/task3.pt")
    b, _ = load_checkpoint(finished / "checkpoints/task3.pt")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_eval_reproduces_the_stored_row(finished, capsys):
    stored = json.loads((finished / "summary.json").read_text())["accuracy_matrix"][1]
    assert main(["eval", str(finished), "--task", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("task 2 model: test accuracy per task ") and f"T2 {stored[1]:.2f}" in out
    assert f"T1 {stored[0]:.2f}" in out and "remaining weights 100.00 %" in out


def test_eval_refuses_unfinished_tasks_and_foreign_folders(finished, tmp_path, capsys):
    assert main(["eval", str(finished), "--task", "4"]) == 2
    assert "task 4 is not finished in this run (finished tasks: [1, 2, 3])" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--task", "1"]) == 2
    assert "is not an llt run directory" in capsys.readouterr().err


def test_checkpoint_that_does_not_fit_the_config(finished, tmp_path, capsys):
    rd = tmp_path / "out" / finished.name          # same name: the same `llt run` command reopens it
    shutil.copytree(finished, rd)
    from llt.models import build_model
    from llt.storage import save_checkpoint

    wrong = build_model(3, 2, width=8).state_dict()        # the run used width 4
    save_checkpoint(rd / "checkpoints/task1.pt", wrong, {"row": [0.0]})
    message = "conv1.weight has shape (8, 3, 3, 3) in the checkpoint, the model built from the config expects (4, 3, 3, 3)"
    assert main(["eval", str(rd), "--task", "1"]) == 2
    assert message in capsys.readouterr().err
    # continuing the run refuses it too, instead of training on top of it
    (rd / "stages/task2.done").unlink()
    (rd / "stages/task3.done").unlink()
    assert main(["run", "--preset", "demo", "--out", str(tmp_path / "out"), "--quiet", *FAST]) == 2
    assert message in capsys.readouterr().err
    assert not (rd / "stages/task2.done").exists()


def test_data_folder_without_the_configured_pool(tmp_path, capsys):
    code, out, err, rd = run(tmp_path, capsys, "--set", "data.pool=tinyimagenet32", "--set", f"data.data_dir={tmp_path}")
    assert code == 2 and "data.pool=tinyimagenet32: neither" in err and rd is None


def test_pool_of_another_image_size(tmp_path, capsys):
    np.save(tmp_path / "pool64.npy", np.zeros((10, 64, 64, 3), np.uint8))
    code, out, err, rd = run(tmp_path, capsys, "--set", f"data.pool={tmp_path / 'pool64.npy'}")
    assert code == 2 and "pool images are 64x64 but digits images are 32x32" in err and rd is None


def test_no_pool_with_teaching_on_is_refused_but_ablation_runs(tmp_path, capsys):
    code, out, err, rd = run(tmp_path, capsys, "--set", "data.pool=none")
    assert code == 2 and "lottery teaching is on" in err
    code, out, err, rd = run(tmp_path, capsys, "--set", "data.pool=none", "--set", "teaching.enabled=false",
                             "--set", "data.num_tasks=2", name="ablation")
    assert code == 0 and not (rd / "teaching").exists() and (rd / "summary.json").is_file()


def test_a_run_is_never_continued_or_evaluated_on_other_data(finished, tmp_path, capsys):
    rd = tmp_path / "out" / finished.name
    shutil.copytree(finished, rd)
    manifest = json.loads((rd / "manifest.json").read_text())
    manifest["stream"]["sha256_val_idx"] = "0" * 64         # as if the data had changed since the run
    (rd / "manifest.json").write_text(json.dumps(manifest))
    (rd / "stages/task3.done").unlink()
    assert main(["run", "--preset", "demo", "--out", str(tmp_path / "out"), "--quiet", *FAST]) == 2
    assert "the data no longer give this run's task stream (sha256_val_idx differ)" in capsys.readouterr().err
    assert not (rd / "stages/task3.done").exists()
    assert main(["eval", str(rd), "--task", "1"]) == 2
    assert "sha256_val_idx differ" in capsys.readouterr().err
