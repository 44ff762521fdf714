"""Bottom-Up tickets, TR-BU re-training and ticket/dense evaluation on tiny CPU runs.

The accuracy-based rules are replaced by deterministic ones (monkeypatch) where a test needs a given path
through the stage machine; the thresholds themselves are tested as pure functions."""

import json
import shutil

import pytest
import torch

from llt.cli import main
from llt.models import build_model
from llt.pruning import Mask, prune_count
from llt.methods import bottomup
from llt.storage import load_checkpoint

FAST = ["--set", "run.method=bu", "--set", "model.width=4", "--set", "train.epochs=2", "--set", "train.milestones=[1]",
        "--set", "data.num_tasks=3", "--set", "data.exemplars_per_class=5", "--set", "train.batch_size=32",
        "--set", "prune.rate=0.2", "--set", "prune.finetune_epochs=1", "--set", "prune.max_rounds=2",
        "--set", "prune.retrain_after=false"]


def run_bu(out, *extra):
    return main(["run", "--preset", "demo", "--out", str(out), "--quiet", *FAST, *extra])


def model():
    return build_model(3, 2, width=4)


def masks_of(rd):
    return [Mask.load(rd / f"masks/task{t}.pt", model()) for t in (1, 2, 3)]


def test_stop_rules_follow_the_original():
    assert bottomup.first_task_rule_broken(2.0, 90.0, 2.0, 90.0)          # task 1: >= on both
    assert not bottomup.first_task_rule_broken(1.9, 99.0, 2.0, 90.0)
    assert not bottomup.first_task_rule_broken(5.0, 89.9, 2.0, 90.0)
    assert not bottomup.regrow_rule_broken(2.0, 95.0, 2.0, 90.0)          # re-grow: > on both
    assert bottomup.regrow_rule_broken(2.1, 90.1, 2.0, 90.0)
    assert bottomup.accept_ticket(0.99, 1.0) and not bottomup.accept_ticket(1.0, 1.0)


def test_masks_only_grow_and_follow_the_round_arithmetic(grown):
    m1, m2, m3 = masks_of(grown)
    assert m1.issubset(m2) and m2.issubset(m3)
    total = m1.num_total()
    kept = total - prune_count(0.2, total)
    kept -= prune_count(0.2, kept)
    assert m1.num_kept() == kept                                   # task 1: 2 rounds of IMP, the cap
    for old, new in ((m1, m2), (m2, m3)):                         # re-grow: 2 rounds over the free weights
        free = old.num_total() - old.num_kept()
        grown_part = free - prune_count(0.2, free)
        grown_part -= prune_count(0.2, grown_part)
        assert new.num_kept() == old.num_kept() + grown_part
    summary = json.loads((grown / "summary.json").read_text())
    assert summary["first_task_hit_cap"] is True and summary["regrows"] == 2 and summary["regrows_hit_cap"] == 2
    assert all(d.startswith(("imp: cap", "grow:")) for d in summary["decisions"])
    assert summary["remaining_weights"] == pytest.approx([100 * m.density() for m in (m1, m2, m3)])
    assert len(summary["reference_matrix"]) == 3 and summary["decision_split"] == "val"


def test_tickets_keep_pruned_weights_at_zero_and_records_name_decisions(grown):
    net = model()
    for t, mask in enumerate(masks_of(grown), 1):
        state, meta = load_checkpoint(grown / f"checkpoints/task{t}.pt")
        net.load_state_dict(state)
        assert mask.pruned_nonzero(net) == {} and meta["capped"] is True
    recs = [json.loads(line) for line in (grown / "records.jsonl").read_text().splitlines()]
    levels = [(r["task"], r["level"]) for r in recs if r["event"] == "level"]
    assert levels == [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2)]
    lvl = next(r for r in recs if r["event"] == "level")
    assert set(lvl) >= {"density", "per_layer_density", "decision_accuracy", "drop", "sparsity", "rule_broken", "test_row"}
    tickets = [r for r in recs if r["event"] == "ticket"]
    assert [r["decision"].split(":")[0] for r in tickets] == ["imp", "grow", "grow"]
    assert [r["event"] for r in recs].count("reference") == 3 and [r["event"] for r in recs].count("candidate") == 2


def test_accepted_tasks_leave_the_mask_unchanged(tmp_path, monkeypatch):
    monkeypatch.setattr(bottomup, "accept_ticket", lambda gap, decay: True)
    assert run_bu(tmp_path) == 0
    [rd] = list(tmp_path.iterdir())
    m1, m2, m3 = masks_of(rd)
    assert m1 == m2 == m3
    summary = json.loads((rd / "summary.json").read_text())
    assert [d.split(":")[0] for d in summary["decisions"]] == ["imp", "accept", "accept"]


def test_the_state_before_the_breaking_round_is_kept(tmp_path, monkeypatch):
    # break the task-1 rule at round 2 (sparsity 36 %): round 1 (80 % remaining) must be kept
    monkeypatch.setattr(bottomup, "first_task_rule_broken", lambda drop, sparsity, d, b: sparsity > 30)
    monkeypatch.setattr(bottomup, "accept_ticket", lambda gap, decay: True)
    assert run_bu(tmp_path, "--set", "data.num_tasks=2") == 0
    [rd] = list(tmp_path.iterdir())
    m1 = Mask.load(rd / "masks/task1.pt", build_model(2, 2, width=4))
    assert m1.num_kept() == m1.num_total() - prune_count(0.2, m1.num_total())
    state, meta = load_checkpoint(rd / "checkpoints/task1.pt")
    level1, _ = load_checkpoint(rd / "checkpoints/task1-level1.pt")
    assert all(torch.equal(state[k], level1[k]) for k in state)
    assert "stop rule at round 2" in meta["decision"] and "kept round 1" in meta["decision"]


def test_retrain_and_evaluation_of_tickets_and_dense_references(grown, tmp_path, capsys):
    assert main(["retrain", str(grown), "--out", str(tmp_path), "--quiet"]) == 0
    [rd] = [p for p in tmp_path.iterdir()]
    assert rd.name == grown.name + "-retrain-original"
    summary = json.loads((rd / "summary.json").read_text())
    bu = json.loads((grown / "summary.json").read_text())
    assert summary["method"] == "trbu" and summary["init"] == "original"
    assert summary["remaining_weights"] == pytest.approx(bu["remaining_weights"])
    net = model()
    for t, mask in enumerate(masks_of(grown), 1):
        state, _ = load_checkpoint(rd / f"checkpoints/task{t}.pt")
        net.load_state_dict(state)
        assert mask.pruned_nonzero(net) == {}
    capsys.readouterr()
    assert main(["eval", str(grown), "--task", "2", "--dense"]) == 0
    out = capsys.readouterr().out
    ref_row = bu["reference_matrix"][1]
    assert "task 2 dense reference" in out and f"T2 {ref_row[1]:.2f}" in out and "remaining weights 100.00 %" in out
    assert main(["eval", str(grown), "--task", "3", "--ticket"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("task 3 ticket:") and f"T3 {bu['accuracy_matrix'][2][2]:.2f}" in out and f"remaining weights {bu['remaining_weights'][2]:.2f} %" in out
    for init in ("reference", "random"):
        assert main(["retrain", str(grown), "--out", str(tmp_path), "--quiet", "--init", init]) == 0
        assert (tmp_path / f"{grown.name}-retrain-{init}" / "summary.json").is_file()
    # `llt resume` of an interrupted TR-BU directory: task 1 kept, tasks 2-3 re-trained to the same result
    for name in ("stages/task2.done", "stages/task3.done", "summary.json"):
        (rd / name).unlink()
    capsys.readouterr()
    assert main(["resume", str(rd), "--quiet"]) == 0
    assert "task 1: re-trained before (stage marker present), skipping" in capsys.readouterr().out
    assert json.loads((rd / "summary.json").read_text()) == summary


def test_bad_inputs_for_retrain_and_eval(grown, tmp_path, capsys):
    # not a run / not finished / another method
    assert main(["retrain", str(tmp_path)]) == 2
    assert "is not an llt run directory" in capsys.readouterr().err
    unfinished = tmp_path / "unfinished"
    shutil.copytree(grown, unfinished)
    (unfinished / "summary.json").unlink()
    assert main(["retrain", str(unfinished)]) == 2
    assert "is not a finished run" in capsys.readouterr().err
    other = tmp_path / "other"
    shutil.copytree(grown, other)
    s = json.loads((other / "summary.json").read_text())
    (other / "summary.json").write_text(json.dumps({**s, "method": "cil"}))
    assert main(["retrain", str(other)]) == 2
    assert "is a finished run of method 'cil', not a ticket run ('td' or 'bu'" in capsys.readouterr().err
    assert main(["retrain", str(other), "--mask", "random"]) == 2
    assert "not a ticket run" in capsys.readouterr().err
    # growing masks claimed to be a Top-Down run's: Top-Down tickets must shrink
    (other / "summary.json").write_text(json.dumps({**s, "method": "td"}))
    assert main(["retrain", str(other)]) == 2
    assert "Top-Down tickets only shrink" in capsys.readouterr().err
    assert main(["retrain", str(other), "--init", "reference"]) == 2
    assert "--init reference needs a Bottom-Up run" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "unfinished"]     # nothing left behind
    # masks that are not nested
    broken = tmp_path / "broken"
    shutil.copytree(grown, broken)
    m2 = Mask.load(broken / "masks/task2.pt", model())
    m2.masks["layer1.0.conv1.weight"] = torch.zeros_like(m2.masks["layer1.0.conv1.weight"])
    m2.save(broken / "masks/task2.pt")
    assert main(["retrain", str(broken), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "the mask of task 1 keeps" in err and "layer1.0.conv1.weight" in err and "task 2 drops" in err
    # a task the run has not reached; --dense on a run without references
    assert main(["eval", str(grown), "--task", "4"]) == 2
    assert "task 4 is not finished" in capsys.readouterr().err
    dense_run = tmp_path / "dense"
    shutil.copytree(grown, dense_run)
    manifest = json.loads((dense_run / "manifest.json").read_text())
    manifest["config"]["run"]["method"] = "cil"
    (dense_run / "manifest.json").write_text(json.dumps(manifest))
    assert main(["eval", str(dense_run), "--task", "1", "--dense"]) == 2
    assert "--dense needs a Bottom-Up run" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("prune.deacc=-1", "prune.deacc: must be non-negative"),
    ("prune.accept_decay=-0.5", "prune.accept_decay: must be non-negative"),
    ("prune.base_sparsity=101", "prune.base_sparsity: must be within 0-100"),
    ("prune.base_sparsity=-5", "prune.base_sparsity: must be within 0-100"),
    ("prune.max_rounds=-1", "prune.max_rounds: must be non-negative"),
])
def test_thresholds_out_of_range(tmp_path, capsys, override, message):
    assert run_bu(tmp_path, "--set", override) == 2
    assert message in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_tinyimagenet_preset_runs_end_to_end_on_64x64_images(tmp_path, capsys):
    import numpy as np

    from conftest import make_tinyimagenet

    make_tinyimagenet(tmp_path / "data", num_classes=4, train_per_class=10, val_per_class=3)
    np.save(tmp_path / "data" / "imagenet64-pool.npy", np.random.default_rng(0).integers(0, 256, (40, 64, 64, 3), dtype=np.uint8))
    args = ["run", "--preset", "tinyimagenet-bu", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "runs"),
            "--quiet", "--set", "data.num_tasks=2", "--set", "data.classes_per_task=2", "--set", "model.width=4",
            "--set", "train.epochs=1", "--set", "train.milestones=[1]", "--set", "train.batch_size=16",
            "--set", "data.exemplars_per_class=3", "--set", "prune.finetune_epochs=1", "--set", "prune.max_rounds=1",
            "--set", "teaching.neighbours=5"]
    assert main(args) == 0, capsys.readouterr().err
    [rd] = list((tmp_path / "runs").iterdir())
    manifest = json.loads((rd / "manifest.json").read_text())
    assert manifest["dataset"]["image_shape"] == [3, 64, 64] and manifest["pool"]["num_images"] == 40
    state, _ = load_checkpoint(rd / "checkpoints/task2.pt")
    assert state["conv1.weight"].shape == (4, 3, 3, 3)
    summary = json.loads((rd / "summary.json").read_text())
    assert summary["dataset"] == "tinyimagenet" and summary["num_tasks"] == 2


@pytest.mark.parametrize("command, name, damage, message", [
    ("eval", "checkpoints/task1.pt", "truncated", "checkpoints/task1.pt: not a valid llt checkpoint"),
    ("eval", "checkpoints/task1.pt", "code", "checkpoints/task1.pt: not a valid llt checkpoint (names posix.system"),
    ("eval", "manifest.json", "schema", "manifest.json: not a valid llt manifest"),
    ("retrain", "masks/task2.pt", "truncated", "masks/task2.pt: not a valid llt checkpoint"),
    ("retrain", "checkpoints/init.pt", "code", "checkpoints/init.pt: not a valid llt checkpoint (names posix.system"),
    ("retrain", "summary.json", "schema", "summary must be a JSON object"),
    ("report", "summary.json", "keys", "not an llt summary (missing dataset, seed, accuracy_matrix"),
    ("report", "summary.json", "json", "summary.json: not valid JSON"),
    ("report", "manifest.json", "schema", "manifest.json: not an llt manifest"),
])
def test_every_loader_refuses_files_that_are_not_what_they_claim(grown, tmp_path, capsys, command, name, damage,
                                                                 message):
    from conftest import Evil

    run = shutil.copytree(grown, tmp_path / "runs" / grown.name)
    path, sentinel = run / name, tmp_path / "code-ran"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:300])
    elif damage == "code":
        torch.save({"state": Evil(sentinel), "meta": "{}"}, path)
    elif damage == "schema":
        path.write_text('["a", "list"]')
    elif damage == "keys":
        path.write_text('{"method": "bu", "num_tasks": 3}')
    else:
        path.write_text('{"method": ')
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    args = {"eval": ["eval", str(run), "--task", "1"], "report": ["report", str(run), "--out", str(tmp_path / "rep")],
            "retrain": ["retrain", str(run), "--out", str(tmp_path / "tr"), "--quiet"]}[command]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("llt: error: ") and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not sentinel.exists()
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "tr").exists() or not list((tmp_path / "tr").iterdir())   # no half-made TR-BU run
