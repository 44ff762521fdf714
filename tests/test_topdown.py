"""Top-Down tickets: schedules, rewinding, and a tiny end-to-end run (masks only shrink, exact densities,
records per level, zeros that stay zero, resume)."""

import json

import pytest
import torch

from llt.cli import main
from llt.config import PruneSection
from llt.errors import LLTError
from llt.models import build_model
from llt.pruning import Mask, global_magnitude_prune, prune_count
from llt.methods.topdown import rewind_state, schedule_fractions
from llt.storage import load_checkpoint
from llt.trainer import Trainer

FAST = ["--set", "run.method=td", "--set", "model.width=4", "--set", "train.epochs=2", "--set", "train.milestones=[1]",
        "--set", "data.num_tasks=3", "--set", "data.exemplars_per_class=5", "--set", "train.batch_size=32",
        "--set", "prune.td_rounds=[1,0,2]", "--set", "prune.finetune_epochs=1", "--set", "prune.rate=0.2"]


def test_schedule_from_rounds_and_from_densities():
    assert schedule_fractions(PruneSection(td_rounds=(1, 1, 3, 4, 5)), 5) == [[0.2], [0.2], [0.2] * 3, [0.2] * 4, [0.2] * 5]
    dens = (0.8, 0.64, 0.512, 0.4096, 0.32768, 0.262144, 0.2097152, 0.16777216, 0.134217728, 0.0966)
    fr = schedule_fractions(PruneSection(td_densities=dens), 10)
    assert [len(f) for f in fr] == [1] * 9 + [2]
    # 13.42 % -> 10.74 % -> 9.66 %: a 20 % round, then the (about 10 %) round that lands on the target
    assert fr[-1] == pytest.approx([0.2, 1 - 0.0966 / (0.134217728 * 0.8)])
    # 1 -> 0.8 -> 0.64 -> 0.512, then a 2.3 % round to 0.5; an unchanged target needs no round
    assert schedule_fractions(PruneSection(td_densities=(0.5, 0.5)), 2) == [[0.2, 0.2, 0.2, pytest.approx(1 - 0.5 / 0.512)], []]


@pytest.mark.parametrize("section, message", [
    (PruneSection(), "Top-Down needs a schedule"),
    (PruneSection(td_rounds=(1, 1)), "prune.td_rounds has 2 entries but the stream has 3 tasks"),
    (PruneSection(td_rounds=(1, -1, 1)), "round counts must be non-negative"),
    (PruneSection(td_densities=(0.5, 0.6, 0.4)), "must not increase"),
])
def test_bad_schedules(section, message):
    with pytest.raises(LLTError, match=message):
        schedule_fractions(section, 3)


def test_rewinding_modes():
    init, trained, other = (build_model(2, 2, width=4, seed=s).state_dict() for s in (0, 1, 2))
    m = build_model(2, 2, width=4, seed=1)
    mask = global_magnitude_prune(dict(m.named_parameters()), Mask.ones(m), 0.5)
    zero = rewind_state(trained, mask, "zero", init, other, other, full=False)
    w = "layer1.0.conv1.weight"
    assert torch.equal(zero[w], init[w] * mask[w])                             # conv weights back to theta_0, masked
    assert torch.equal(zero["layer1.0.bn1.weight"], trained["layer1.0.bn1.weight"])   # BatchNorm kept
    assert torch.equal(zero["heads_main.0.weight"], trained["heads_main.0.weight"])   # heads kept
    fullr = rewind_state(trained, mask, "zero", init, other, other, full=True)
    assert torch.equal(fullr["layer1.0.bn1.weight"], init["layer1.0.bn1.weight"])
    assert torch.equal(rewind_state(trained, mask, "best", init, other, other, False)[w], other[w] * mask[w])
    assert torch.equal(rewind_state(trained, mask, "finetune", init, other, other, False)[w], trained[w] * mask[w])


def run_td(out, *extra):
    return main(["run", "--preset", "demo", "--out", str(out), "--quiet", *FAST, *extra])


@pytest.fixture(scope="module")
def td_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("td")
    assert run_td(out) == 0
    [rd] = list(out.iterdir())
    return rd


def test_masks_only_shrink_and_densities_are_exact(td_run):
    rd = td_run
    model = build_model(3, 2, width=4)
    masks = [Mask.load(rd / f"masks/task{t}.pt", model) for t in (1, 2, 3)]
    assert masks[1].issubset(masks[0]) and masks[2].issubset(masks[1])
    assert masks[1] == masks[0]                                     # 0 rounds on task 2: unchanged
    total = masks[0].num_total()
    kept = total - prune_count(0.2, total)
    assert masks[0].num_kept() == kept
    for _ in range(2):
        kept -= prune_count(0.2, kept)
    assert masks[2].num_kept() == kept
    summary = json.loads((rd / "summary.json").read_text())
    assert summary["method"] == "td" and summary["schedule"] == [1, 0, 2]
    assert summary["remaining_weights"] == pytest.approx([100 * m.density() for m in masks])


def test_tickets_keep_pruned_weights_at_zero(td_run):
    model = build_model(3, 2, width=4)
    for t in (1, 2, 3):
        state, meta = load_checkpoint(td_run / f"checkpoints/task{t}.pt")
        model.load_state_dict(state)
        mask = Mask.load(td_run / f"masks/task{t}.pt", model)
        assert mask.pruned_nonzero(model) == {}
        assert meta["density"] == pytest.approx(mask.density())


def test_a_record_for_every_task_and_level(td_run):
    levels = [json.loads(line) for line in (td_run / "records.jsonl").read_text().splitlines()]
    levels = [(r["task"], r["level"], r["kind"]) for r in levels if r["event"] == "level"]
    assert levels == [(1, 0, "train"), (1, 1, "prune"), (1, 1, "ticket"),
                      (2, 0, "train"), (2, 0, "ticket"),
                      (3, 0, "train"), (3, 1, "prune+finetune"), (3, 2, "prune"), (3, 2, "ticket")]
    rec = [json.loads(line) for line in (td_run / "records.jsonl").read_text().splitlines()][1]
    assert set(rec) >= {"density", "per_layer_density", "val", "test_row", "seconds"}
    assert len(rec["per_layer_density"]) == 20


def test_interrupted_top_down_run_resumes_to_the_same_tickets(td_run, tmp_path, monkeypatch, capsys):
    real = Trainer.distill_loss
    calls = {"n": 0}

    def failing(self, k, *a, **kw):     # fail inside task 3's fine-tuning (after its level-0 training)
        calls["n"] += 1
        loss = real(self, k, *a, **kw)
        return loss * float("nan") if k == 2 and calls["n"] > 40 else loss

    monkeypatch.setattr(Trainer, "distill_loss", failing)
    assert run_td(tmp_path) == 2
    assert "the loss became nan in task 3" in capsys.readouterr().err
    [rd] = list(tmp_path.iterdir())
    assert (rd / "stages/task2.done").is_file() and not (rd / "stages/task3.done").exists()
    monkeypatch.setattr(Trainer, "distill_loss", real)
    assert run_td(tmp_path) == 0
    out = capsys.readouterr().out
    assert "task 1: ticket finished before" in out and "task 2: ticket finished before" in out
    a = json.loads((rd / "summary.json").read_text())
    b = json.loads((td_run / "summary.json").read_text())
    assert a["accuracy_matrix"] == b["accuracy_matrix"] and a["remaining_weights"] == b["remaining_weights"]
    model = build_model(3, 2, width=4)
    assert Mask.load(rd / "masks/task3.pt", model) == Mask.load(td_run / "masks/task3.pt", model)


def test_schedule_of_the_wrong_length_is_refused_before_any_work(tmp_path, capsys):
    assert run_td(tmp_path, "--set", "prune.td_rounds=[1,1]") == 2
    assert "prune.td_rounds has 2 entries but the stream has 3 tasks" in capsys.readouterr().err
    assert not tmp_path.joinpath("x").exists() and not any(tmp_path.rglob("*.done"))


@pytest.mark.parametrize("teacher", ["ticket", "original"])
def test_the_teacher_chain(tmp_path, monkeypatch, teacher):
    """prune.td_teacher: with 'ticket' task t+1 is taught by the re-trained ticket T1~t; with 'original' (the
    original's main_TD.py) by the model trained on task t under the previous mask, the dense task-1 model
    for task 2."""
    from llt.methods import base

    teachers = []
    real = base.build_teaching_set

    def spy(model, *a, **kw):
        teachers.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real(model, *a, **kw)

    monkeypatch.setattr(base, "build_teaching_set", spy)
    assert run_td(tmp_path, "--set", f"prune.td_teacher={teacher}") == 0
    [rd] = list(tmp_path.iterdir())
    assert len(teachers) == 2                                   # for tasks 2 and 3
    net = build_model(3, 2, width=4)
    densities = []
    for t, state in enumerate(teachers, 1):
        name = f"checkpoints/task{t}.pt" if teacher == "ticket" else f"checkpoints/task{t}-train.pt"
        expected, _ = load_checkpoint(rd / name)
        assert all(torch.equal(state[k], expected[k]) for k in expected), (t, name)
        net.load_state_dict(state)
        densities.append(round(Mask.from_nonzero(net).density(), 4))
    # schedule [1, 0, 2]: T1 = 80 %, T2 = 80 %; level 0 of task 1 is dense, level 0 of task 2 carries T1's mask
    assert densities == ([0.8, 0.8] if teacher == "ticket" else [1.0, 0.8])
    assert json.loads((rd / "summary.json").read_text())["teacher"] == teacher
