"""Lottery controls: random masks with the tickets' exact counts (overall or per layer), nested like the
tickets, re-trained from any initialisation on finished Bottom-Up and Top-Down runs; `llt report` shows
them beside their tickets."""

import json
import shutil

import pytest
import torch

from llt.cli import main
from llt.errors import LLTError
from llt.models import build_model
from llt.pruning import Mask, global_magnitude_prune, random_controls
from llt.storage import load_checkpoint

TINY = ["--set", "model.width=4", "--set", "train.epochs=2", "--set", "train.milestones=[1]",
        "--set", "data.num_tasks=3", "--set", "data.exemplars_per_class=5", "--set", "train.batch_size=32",
        "--set", "prune.rate=0.2", "--set", "prune.finetune_epochs=1"]
BU = [*TINY, "--set", "run.method=bu", "--set", "prune.max_rounds=2", "--set", "prune.retrain_after=false"]
TD = [*TINY, "--set", "run.method=td", "--set", "prune.td_rounds=[2,1,1]"]


def model():
    return build_model(3, 2, width=4)


def nested_tickets(grow: bool) -> list[Mask]:
    """Three magnitude-pruned masks of a tiny model, growing (Bottom-Up-like) or shrinking (Top-Down-like)."""
    m = model()
    w = dict(m.named_parameters())
    masks = [Mask.ones(m)]
    for _ in range(3):
        masks.append(global_magnitude_prune(w, masks[-1], 0.4))
    masks = masks[1:]
    return masks[::-1] if grow else masks


@pytest.mark.parametrize("grow", [True, False])
def test_random_controls_keep_exact_counts_and_the_tickets_nesting(grow):
    tickets = nested_tickets(grow)
    overall = random_controls(tickets, "random", torch.Generator().manual_seed(0))
    layerwise = random_controls(tickets, "layerwise-random", torch.Generator().manual_seed(0))
    for ticket, r, lw in zip(tickets, overall, layerwise):
        assert r.num_kept() == ticket.num_kept() and r != ticket
        assert lw != ticket and lw != r
        for name in ticket.names():
            assert int(lw[name].sum()) == int(ticket[name].sum()), name
        # the global control spreads its weights uniformly, not by the ticket's per-layer budget
        assert any(int(r[n].sum()) != int(ticket[n].sum()) for n in ticket.names())
    for controls in (overall, layerwise):
        for a, b in zip(controls, controls[1:]):
            assert a.issubset(b) if grow else b.issubset(a)
    again = random_controls(tickets, "random", torch.Generator().manual_seed(0))
    assert all(a == b for a, b in zip(again, overall))                      # the generator decides
    assert random_controls(tickets, "random", torch.Generator().manual_seed(1))[0] != overall[0]


def test_random_controls_refuse_unknown_kinds_and_mismatched_layers():
    tickets = nested_tickets(True)
    with pytest.raises(LLTError, match="unknown random mask kind 'shuffled'"):
        random_controls(tickets, "shuffled", torch.Generator())
    other = Mask({k: v for k, v in tickets[1].masks.items() if k != "conv1.weight"})
    with pytest.raises(LLTError, match="the mask of task 2 covers other layers"):
        random_controls([tickets[0], other], "random", torch.Generator())


def run(out, args):
    return main(["run", "--preset", "demo", "--out", str(out), "--quiet", *args])


@pytest.fixture
def bu_run(grown):
    """The shared tiny Bottom-Up run whose masks grow at every task (conftest.grown)."""
    return grown


@pytest.fixture(scope="module")
def td_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("td")
    assert run(out, TD) == 0
    [rd] = list(out.iterdir())
    return rd


def masks(rd) -> list[Mask]:
    return [Mask.load(rd / f"masks/task{t}.pt", model()) for t in (1, 2, 3)]


@pytest.mark.parametrize("source, kind, init", [("bu", "random", "original"), ("bu", "layerwise-random", "random"),
                                                ("td", "layerwise-random", "original")])
def test_controls_end_to_end(bu_run, td_run, tmp_path, capsys, monkeypatch, source, kind, init):
    src = bu_run if source == "bu" else td_run
    assert main(["retrain", str(src), "--mask", kind, "--init", init, "--out", str(tmp_path), "--quiet"]) == 0
    rd = tmp_path / f"{src.name}-retrain-{init}-{kind}"
    summary = json.loads((rd / "summary.json").read_text())
    ticket_summary = json.loads((src / "summary.json").read_text())
    assert summary["method"] == {"bu": "trbu", "td": "trtd"}[source]
    assert (summary["mask"], summary["init"], summary["source_method"]) == (kind, init, source)
    assert summary["remaining_weights"] == ticket_summary["remaining_weights"]          # exactly equal
    tickets, controls = masks(src), masks(rd)
    net = model()
    for t, (ticket, control) in enumerate(zip(tickets, controls), 1):
        assert control.num_kept() == ticket.num_kept() and control != ticket
        if kind == "layerwise-random":
            assert control.per_layer_density() == ticket.per_layer_density()
        state, meta = load_checkpoint(rd / f"checkpoints/task{t}.pt")
        assert meta["num_kept"] == meta["ticket_num_kept"] == ticket.num_kept()
        net.load_state_dict(state)
        assert control.pruned_nonzero(net) == {}                      # pruned weights exactly zero after training
        assert Mask.from_nonzero(net).num_kept() > 0.9 * control.num_kept()   # the kept ones did train
    for a, b in zip(controls, controls[1:]):
        assert a.issubset(b) if source == "bu" else b.issubset(a)
    # a rerun skips everything; resume reads the mask kind back from retrain.json
    assert json.loads((rd / "retrain.json").read_text())["mask"] == kind
    capsys.readouterr()
    assert main(["resume", str(rd), "--quiet"]) == 0
    assert capsys.readouterr().out.count("re-trained before") == 3
    assert json.loads((rd / "summary.json").read_text()) == summary
    if source == "bu" and kind == "random":
        # a re-training made with relative paths, moved with its source and resumed from another working
        # directory: the source is found by its path relative to the re-training
        shutil.copytree(src, tmp_path / "first" / src.name)
        monkeypatch.chdir(tmp_path)
        assert main(["retrain", f"first/{src.name}", "--mask", kind, "--init", init, "--out", "first", "--quiet"]) == 0
        (tmp_path / "first").rename(tmp_path / "moved")
        (tmp_path / "elsewhere").mkdir()
        monkeypatch.chdir(tmp_path / "elsewhere")
        capsys.readouterr()
        assert main(["resume", str(tmp_path / "moved" / rd.name), "--quiet"]) == 0
        assert capsys.readouterr().out.count("re-trained before") == 3


def test_report_puts_tickets_and_controls_side_by_side(td_run, tmp_path):
    for kind in ("ticket", "random"):
        assert main(["retrain", str(td_run), "--mask", kind, "--out", str(tmp_path / "runs"), "--quiet"]) == 0
    dirs = [str(td_run), *sorted(str(p) for p in (tmp_path / "runs").iterdir())]
    assert main(["report", *dirs, "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report/report.md").read_text()
    assert "## Lottery controls" in md
    table = md[md.index("## Lottery controls"):md.index("## Paired differences")]
    assert "Top-Down" in table and "ticket, original init" in table and "random mask, original init" in table
    rows = [line for line in table.splitlines() if line.startswith("| ")][2:]
    assert len(rows) == 3          # the ticket run, its re-training, the random-mask control


def test_controls_refuse_runs_that_are_not_finished_ticket_runs(bu_run, tmp_path, capsys):
    dense = tmp_path / "dense"
    assert run(dense, [*TINY, "--set", "run.method=cil", "--set", "data.num_tasks=2"]) == 0
    [rd] = list(dense.iterdir())
    before = sorted(p.name for p in dense.iterdir())
    assert main(["retrain", str(rd), "--mask", "random"]) == 2
    assert "is a finished run of method 'cil', not a ticket run" in capsys.readouterr().err
    assert sorted(p.name for p in dense.iterdir()) == before
    assert main(["retrain", str(bu_run), "--mask", "half"]) == 2       # unknown kinds: one line, nothing made
    assert "--mask must be one of ticket, random, layerwise-random for a run directory, got 'half'" in \
        capsys.readouterr().err
    assert not list(bu_run.parent.glob("*-retrain-*half*"))
