"""`llt report` and `llt list` on generated runs (no training): files, values, grouping, bad inputs."""

import csv
import dataclasses
import json
import statistics

import pytest
from conftest import REPO

from llt.cli import main
from llt.config import RunConfig, to_tree
from llt.models import build_model
from llt.pruning import Mask, global_magnitude_prune
from llt.runs import RunDir, build_summary

PNG = b"\x89PNG\r\n\x1a\n"


def make_run(root, name, method, seed, R, remaining, masks=None):
    rd = RunDir.create(root, name)
    cfg = RunConfig()
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, method=method if method != "trbu" else "bu", seed=seed))
    rd.write_json("manifest.json", {"config": to_tree(cfg)})
    for t, mask in enumerate(masks or [], 1):
        mask.save(rd.file(f"masks/task{t}.pt"))
        rd.record("ticket", task=t, per_layer_density=mask.per_layer_density())
    rd.write_json("summary.json", build_summary(method, "cifar10", seed, R, [r / 100 for r in remaining]))
    return rd.path


@pytest.fixture
def runs(tmp_path):
    m = build_model(2, 2, width=4, seed=0)
    w = dict(m.named_parameters())
    m1 = global_magnitude_prune(w, Mask.ones(m), 0.8)
    m2 = m1 | global_magnitude_prune(w, Mask.ones(m), 0.7)
    bu0 = make_run(tmp_path, "bu-s0", "bu", 0, [[90.0], [80.0, 70.0]], [100 * m1.density(), 100 * m2.density()], [m1, m2])
    bu1 = make_run(tmp_path, "bu-s1", "bu", 1, [[94.0], [84.0, 76.0]], [100 * m1.density(), 100 * m2.density()], [m1, m2])
    cil = make_run(tmp_path, "cil-s0", "cil", 0, [[95.0], [85.0, 81.0]], [100.0, 100.0])
    return tmp_path, [bu0, bu1, cil], (m1, m2)


def test_report_writes_tables_and_figures_with_seed_statistics(runs, capsys):
    root, dirs, (m1, m2) = runs
    out = root / "report"
    assert main(["report", *map(str, dirs), "--out", str(out)]) == 0
    for name in ("sa.png", "remaining_weights.png", "accuracy_matrix-bu-s0.png", "accuracy_matrix-cil-s0.png",
                 "layer_density-bu-s0.png", "mask_overlap-bu-s1.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name
    assert not (out / "mask_overlap-cil-s0.png").exists()          # a dense run has no masks
    rows = list(csv.DictReader(open(out / "summary.csv")))
    bu = [r for r in rows if r["group"].startswith("Bottom-Up")]
    assert [r["seeds"] for r in bu] == ["0 1", "0 1"]               # the two seeds form one group
    sa2 = [statistics.mean([75.0, 80.0]), statistics.stdev([75.0, 80.0])]
    assert float(bu[1]["sa_mean"]) == pytest.approx(sa2[0]) and float(bu[1]["sa_std"]) == pytest.approx(sa2[1], abs=1e-4)
    assert float(bu[0]["remaining_mean"]) == pytest.approx(100 * m1.density(), abs=1e-4)
    assert float(bu[1]["forgetting_mean"]) == pytest.approx(10.0)   # both seeds forgot 10 points of task 1
    dense = [r for r in rows if r["group"].startswith("Dense")]
    assert dense[1]["sa_std"] == "0.0" and float(dense[1]["sa_mean"]) == 83.0
    md = (out / "report.md").read_text()
    half = 12.706204736174698 * statistics.stdev([75.0, 80.0]) / 2 ** 0.5     # the 95 % t interval, n = 2
    # every +- is the interval's half-width, the per-task tables' too (learning accuracy of task 2: 70 and 76)
    la_half = 12.706204736174698 * statistics.stdev([70.0, 76.0]) / 2 ** 0.5
    assert f"| 2 | 77.50 +- {half:.2f} | 73.00 +- {la_half:.2f} |" in md and "| T1~2 | 80.00 | 70.00 |" in md
    assert "| 1 | 95.00 +- n/a | 95.00 +- n/a | 100.00 +- n/a |" in md        # one seed: n/a, never +- 0
    # the comparison: one row per group after the last task, each value mean +- std, and the seed count
    [bu_c] = [r for r in csv.DictReader(open(out / "comparison.csv")) if r["group"].startswith("Bottom-Up")]
    assert float(bu_c["final_sa_mean"]) == pytest.approx(77.5) and float(bu_c["final_sa_std"]) == pytest.approx(3.5355, abs=1e-4)
    assert float(bu_c["final_forgetting_mean"]) == 10.0 and float(bu_c["final_forgetting_std"]) == 0.0
    assert bu_c["n_seeds"] == "2"
    assert md.index("## Comparison") < md.index("## Bottom-Up")
    la_all = 12.706204736174698 * statistics.stdev([80.0, 85.0]) / 2 ** 0.5   # (90 + 70) / 2, (94 + 76) / 2
    assert (f"| 77.50 +- {half:.2f} | 73.00 +- {la_half:.2f} | 82.50 +- {la_all:.2f} | 10.00 +- 0.00 | "
            f"{100 * m2.density():.2f} +- 0.00 | 2 |") in md
    assert float(bu_c["learning_accuracy_incremental_mean"]) == 73.0 and float(bu_c["learning_accuracy_mean"]) == 82.5


def test_mask_overlap_is_intersection_over_union(runs):
    from llt.reporting.report import load_run

    _, dirs, (m1, m2) = runs
    iou = load_run(dirs[0]).iou
    assert iou[0][0] == 1.0 and iou[0][1] == pytest.approx(m1.num_kept() / m2.num_kept())   # m1 is inside m2


def test_report_refuses_what_is_not_a_finished_run(runs, tmp_path, capsys):
    root, dirs, _ = runs
    (dirs[0] / "summary.json").unlink()
    assert main(["report", str(dirs[0]), "--out", str(tmp_path / "r")]) == 2
    assert "is not a finished llt run (no summary.json" in capsys.readouterr().err
    (dirs[1] / "summary.json").write_text(json.dumps({"method": "bu"}))
    assert main(["report", str(dirs[1]), "--out", str(tmp_path / "r")]) == 2
    assert "not an llt summary (missing dataset" in capsys.readouterr().err
    (dirs[2] / "summary.json").write_text("{ truncated")
    assert main(["report", str(dirs[2]), "--out", str(tmp_path / "r")]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_list_shows_state_and_final_sa(runs, capsys):
    root, dirs, _ = runs
    unfinished = RunDir.create(root, "zz-unfinished")
    unfinished.write_json("manifest.json", {"config": to_tree(RunConfig())})
    unfinished.mark_done("task1")
    unfinished.mark_done("teach1")
    assert main(["list", str(root), "--json"]) == 0
    rows = {r["run"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["bu-s0"]["state"] == "finished" and rows["bu-s0"]["final_sa"] == 75.0
    assert rows["cil-s0"]["method"] == "cil" and rows["bu-s1"]["seed"] == 1
    assert rows["zz-unfinished"]["state"] == "interrupted after teach1" and rows["zz-unfinished"]["final_sa"] is None
    assert main(["list", str(root)]) == 0
    assert "finished" in capsys.readouterr().out


def test_report_shows_each_groups_optimisation_budget(tmp_path):
    """Issue 18: the steps per epoch and the images per step are in report.md and comparison.csv (mean over
    seeds); a summary written before budgets were recorded says so instead of inventing one."""
    def budget(steps, new, memory):
        return [{"trainings": 1, "epochs": 2, "steps": steps[t], "steps_per_epoch": steps[t] // 2,
                 "new_images": new[t], "memory_images": memory[t], "unlabeled_images": 0} for t in range(2)]

    dirs = []
    for seed, new in ((0, 40), (1, 60)):
        rd = RunDir.create(tmp_path, f"replay-s{seed}")
        cfg = RunConfig()
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, method="replay", seed=seed))
        rd.write_json("manifest.json", {"config": to_tree(cfg)})
        rd.write_json("summary.json", build_summary("replay", "cifar10", seed, [[90.0], [60.0, 70.0]], [1.0, 1.0],
                                                    budget=budget([8, 20], [64, new], [0, 80])))
        dirs.append(rd.path)
    old = make_run(tmp_path, "cil-s0", "cil", 0, [[95.0], [85.0, 81.0]], [100.0, 100.0])
    zero = RunDir.create(tmp_path, "ewc-s0")              # a run whose records hold no training: not "0 steps"
    cfg = RunConfig()
    zero.write_json("manifest.json", {"config": to_tree(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, method="ewc")))})
    zero.write_json("summary.json", build_summary("ewc", "cifar10", 0, [[90.0], [60.0, 70.0]], [1.0, 1.0],
                                                  budget=[dict(budget([0, 0], [0, 0], [0, 0])[t], trainings=0)
                                                          for t in range(2)]))
    out = tmp_path / "report"
    assert main(["report", *map(str, dirs), str(old), str(zero.path), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "## Optimisation budget" in md
    assert "| 4 10 | 28 | 2.5 / 4.0 / 0.0 |" in md          # (40/20 + 60/20) / 2 new, 80/20 memory per step
    assert md.count("n/a (not recorded)") == 2          # the dense run without a budget, the EWC run with none recorded
    rows = {r["group"].split(" ")[0]: r for r in csv.DictReader(open(out / "comparison.csv"))}
    assert rows["Replay"]["steps_per_epoch"] == "4 10" and float(rows["Replay"]["sgd_steps_mean"]) == 28.0
    assert rows["Dense"]["steps_per_epoch"] == ""


def synthetic(root, name, method, seed, final, source=None, init="original", mask="ticket"):
    """A finished run with two tasks whose final SA is `final` (task 1 at 90 % after task 1)."""
    rd = RunDir.create(root, name)
    cfg = RunConfig()
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, method=method if method != "trbu" else "bu",
                                                           seed=seed))
    rd.write_json("manifest.json", {"config": to_tree(cfg)})
    extra = {} if source is None else {"source_run": str(root / source), "init": init, "mask": mask}
    dens = [1.0, 1.0] if method == "cil" else [0.1 + 0.01 * seed, 0.2 + 0.01 * seed]
    rd.write_json("summary.json", build_summary(method, "cifar10", seed, [[90.0], [final, final]], dens, **extra))
    return rd.path


def test_paired_differences_and_intervals_match_a_hand_computation(tmp_path):
    """Issue 21: method - dense and ticket - control on the same seed, the mean difference with its Student-t
    95 % interval (t_{0.975, n-1} s / sqrt n), n and the positive count; n = 1 prints n/a, never +- 0; a
    control whose tickets are not in the report says so; the group label's remaining weights are the mean."""
    dense = {0: 50.0, 1: 60.0, 2: 70.0}
    bu = {0: 55.0, 1: 58.0, 2: 76.0}                 # differences +5, -2, +6
    tr = {0: 57.0, 1: 61.0, 2: 70.0}
    rand = {0: 50.0, 1: 52.0}                        # seed 2 missing: TR - random = +7, +9 over n = 2
    for s in range(3):
        synthetic(tmp_path, f"cil-s{s}", "cil", s, dense[s])
        synthetic(tmp_path, f"bu-s{s}", "bu", s, bu[s])
        synthetic(tmp_path, f"bu-s{s}-retrain-original", "trbu", s, tr[s], source=f"bu-s{s}")
    for s in (0, 1):
        synthetic(tmp_path, f"bu-s{s}-retrain-original-random", "trbu", s, rand[s], source=f"bu-s{s}", mask="random")
    synthetic(tmp_path, "bu-s0-retrain-random", "trbu", 0, 40.0, source="bu-s0", init="random")      # n = 1
    synthetic(tmp_path, "other-retrain-random", "trbu", 5, 30.0, source="elsewhere", init="random",
              mask="layerwise-random")                                                               # no tickets
    synthetic(tmp_path, "bu-s1-retrain-reference", "trbu", 1, 99.0, source="bu-s1", init="reference")  # not a control
    out = tmp_path / "report"
    assert main(["report", *map(str, sorted(tmp_path.iterdir())), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    table = md[md.index("## Paired differences"):md.index("## Optimisation budget")]
    rows = {line.split(" | ")[0] + " | " + line.split(" | ")[1]: line for line in table.splitlines()
            if line.startswith("| ") and "---" not in line and "group" not in line}
    half = 4.302652729911275 * statistics.stdev([5.0, -2.0, 6.0]) / 3 ** 0.5            # t_{0.975, 2} = 4.3027
    [bu_row] = [v for k, v in rows.items() if k.startswith("| Bottom-Up (cifar10, 21.00 %)") and "dense" in k]
    assert f"+3.00 [{3 - half:+.2f}, {3 + half:+.2f}]" in bu_row and "| 3 | 2 of 3 / 2 of 3 / 1 of 3 |" in bu_row
    [rand_row] = [v for k, v in rows.items() if "random mask, original init" in k and "(TR-BU tickets)" in k]
    half2 = 12.706204736174698 * statistics.stdev([7.0, 9.0]) / 2 ** 0.5
    assert f"+8.00 [{8 - half2:+.2f}, {8 + half2:+.2f}]" in rand_row and "| 2 | 2 of 2 / 2 of 2 / 0 of 2 |" in rand_row
    [found_row] = [v for k, v in rows.items() if "random mask, original init" in k and "tickets as found" in k]
    half3 = 12.706204736174698 * statistics.stdev([5.0, 6.0]) / 2 ** 0.5      # Bottom-Up as found: 55-50, 58-52
    assert f"+5.50 [{5.5 - half3:+.2f}, {5.5 + half3:+.2f}]" in found_row and "| 2 | 2 of 2 / 2 of 2 / 0 of 2 |" in found_row
    [one] = [v for k, v in rows.items() if "ticket, random init" in k and "(TR-BU tickets)" in k]
    assert "+17.00 n/a" in one and "| 1 | 1 of 1 / 1 of 1 / 0 of 1 |" in one and "+- 0" not in one
    [one_found] = [v for k, v in rows.items() if "ticket, random init" in k and "tickets as found" in k]
    assert "+15.00 n/a" in one_found and "| 1 | 1 of 1 / 1 of 1 / 0 of 1 |" in one_found
    [lost] = [v for k, v in rows.items() if "layerwise-random" in k and "ticket - control" in v]
    assert "not in this report" in lost and "| n/a | n/a | n/a | 0 |" in lost and "no shared seed" not in lost
    assert "ticket, reference init" in md and not [k for k in rows if "reference init" in k and "ticket - control" in k]
    # the comparison: mean +- the interval's half-width; n/a for one seed
    comp = md[md.index("## Comparison"):md.index("## Dense")]
    dense_half = 4.302652729911275 * statistics.stdev(dense.values()) / 3 ** 0.5
    assert f"| 60.00 +- {dense_half:.2f} |" in comp
    assert "| 40.00 +- n/a |" in comp
    rows_csv = {r["group"]: r for r in csv.DictReader(open(out / "comparison.csv"))}
    [b] = [r for g, r in rows_csv.items() if g.startswith("Bottom-Up (cifar10, 21.00 %)")]
    assert float(b["minus_dense_final_sa_mean"]) == 3.0 and b["minus_dense_final_sa_n"] == "3"
    assert float(b["minus_dense_final_sa_ci_low"]) == pytest.approx(3 - half, abs=1e-3)
    assert b["minus_dense_final_sa_positive"] == "2" and b["ticket_minus_final_sa_mean"] == ""
    [r1] = [r for g, r in rows_csv.items() if "ticket, random init" in g]
    assert float(r1["ticket_minus_final_sa_mean"]) == 17.0 and r1["ticket_minus_final_sa_ci_low"] == ""
    assert float(r1["found_minus_final_sa_mean"]) == 15.0 and r1["found_minus_final_sa_n"] == "1"


@pytest.mark.parametrize("study", ["cifar10-medium", "cifar10-medium-original", "cifar10-medium-rehearsal"])
def test_the_committed_medium_study_report_is_what_its_committed_summaries_give(tmp_path, study):
    """results/cifar10-medium (train.batchnorm=balanced) and results/cifar10-medium-original (the original's
    BatchNorm numerics, before issue 26) hold the studies' summaries and the reports docs/results.md quotes;
    results/cifar10-medium-rehearsal's report covers it together with results/cifar10-medium (DER++, ER-ACE and
    joint beside the study's rows): the tables must be exactly what today's `llt report` makes of those
    summaries (figures are not rebuilt)."""
    from llt.reporting.report import expand, load_run, make_groups, write_tables

    folder = REPO / "results" / study
    if not (folder / "study.json").is_file():
        pytest.skip(f"results/{study} is not in this checkout")
    folders = [REPO / "results" / "cifar10-medium", folder] if study.endswith("rehearsal") else [folder]
    runs = [load_run(p) for p in expand([str(f) for f in folders])]
    assert len(runs) == {"cifar10-medium-original": 33, "cifar10-medium": 33,
                         "cifar10-medium-rehearsal": 42}[study] and runs
    write_tables(make_groups(runs), tmp_path)
    for name in ("report.md", "comparison.csv", "summary.csv"):
        assert (tmp_path / name).read_text() == (folder / "report" / name).read_text(), name


def test_a_task_below_chance_right_after_it_was_learned_is_named_before_any_table(runs, tmp_path, capsys):
    root, dirs, _ = runs
    out = root / "report"
    assert main(["report", *map(str, dirs), "--out", str(out)]) == 0
    assert "Warning" not in (out / "report.md").read_text() and "WARNING" not in capsys.readouterr().err
    # task 2 learned to 20 % over 4 classes (chance 25 %): named; 30 % would not be
    bad = make_run(tmp_path / "more", "cil-s1", "cil", 1, [[95.0], [85.0, 20.0]], [100.0, 100.0])
    ok = make_run(tmp_path / "more", "cil-s2", "cil", 2, [[95.0], [85.0, 30.0]], [100.0, 100.0])
    assert main(["report", str(bad), str(ok), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert md.index("## Warning: tasks below chance") < md.index("## Comparison")
    assert "| cil-s1 | 2 | 20.00 | 25.00 |" in md and "| cil-s2 |" not in md
    assert "WARNING: 1 task(s) scored below chance" in capsys.readouterr().err


def test_baselines_and_dense_are_also_paired_against_balanced_replay(tmp_path):
    """Issue 27: the registry's second reference, balanced replay: every baseline and dense CIL minus it on the same
    seed (comparison.csv's minus_replay_*); the tickets are compared with dense only; a replay run with concat
    batching or under a ticket is not the reference (it is compared with it)."""
    def run_with(name, method, seed, final, **baseline):
        path = synthetic(tmp_path, name, method, seed, final)
        if baseline:
            cfg = RunConfig()
            cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, method=method, seed=seed),
                                      baseline=dataclasses.replace(cfg.baseline, **baseline))
            RunDir(path).write_json("manifest.json", {"config": to_tree(cfg)})
        return path

    for s, (dense, replay, derpp, concat) in enumerate(((50.0, 48.0, 55.0, 40.0), (52.0, 49.0, 58.0, 41.0))):
        run_with(f"cil-s{s}", "cil", s, dense)
        run_with(f"replay-s{s}", "replay", s, replay)
        run_with(f"derpp-s{s}", "derpp", s, derpp)
        run_with(f"concat-s{s}", "replay", s, concat, replay_batching="concat")
        run_with(f"bu-s{s}", "bu", s, 45.0)
    run_with("ticket-replay-s0", "replay", 0, 30.0, mask_from="somewhere")
    out = tmp_path / "report"
    assert main(["report", *map(str, sorted(tmp_path.iterdir())), "--out", str(out)]) == 0
    rows = {r["group"].split(" (")[0] + ("/concat" if "concat" in r["group"] else "")
            + ("/ticket" if "mask_from=somewhere" in r["group"] else ""): r
            for r in csv.DictReader(open(out / "comparison.csv"))}
    assert float(rows["DER++"]["minus_replay_final_sa_mean"]) == 8.0          # 55-48, 58-49
    assert float(rows["DER++"]["minus_dense_final_sa_mean"]) == 5.5
    assert float(rows["Dense"]["minus_replay_final_sa_mean"]) == 2.5          # dense - replay: 2, 3
    assert float(rows["Replay/concat"]["minus_replay_final_sa_mean"]) == -8.0
    assert rows["Bottom-Up"]["minus_replay_final_sa_mean"] == "" and rows["Replay"]["minus_replay_final_sa_mean"] == ""
    assert float(rows["Replay/ticket"]["minus_replay_final_sa_mean"]) == -18.0       # one seed: 30 - 48
    md = (out / "report.md").read_text()
    assert "| method - replay (Replay" in md
