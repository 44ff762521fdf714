"""`llt report`: tables and figures from finished runs' records (no model is run).

Inputs per run directory: summary.json (accuracy matrix, SA, remaining weights), manifest.json (config),
records.jsonl (per-layer densities of tickets) and masks/task{t}.pt (mask overlap). Runs whose configs
differ only by the seed form one group. Every "+-" in report.md is the mean over seeds and the half-width of
its 95 % Student-t interval (n/a for one seed); the CSV files give mean, standard deviation and the bounds.

Outputs in OUT_DIR:
    report.md                 a comparison of the groups after the last task (final SA, learning accuracy,
                              forgetting, remaining weights), then per group: SA, learning accuracy of each
                              task, remaining weights and forgetting per task, the accuracy matrices; the
                              lottery controls, paired differences and the optimisation budget of every group
    summary.csv               the same numbers, one row per (group, task): mean and std over seeds
    comparison.csv            one row per group: final SA, learning accuracy (tasks 2..T and 1..T), forgetting,
                              remaining weights (mean, std, 95 % interval), seeds, the paired differences,
                              steps per epoch per task and SGD steps in all (the optimisation budget)
    sa.png                    SA against the number of learned tasks, one line per group (Figure 4, top)
    remaining_weights.png     remaining weights per task as grouped bars (Figure 4, bottom)
    accuracy_matrix-<run>.png the accuracy matrix of each run as a heatmap
    layer_density-<run>.png   per-layer density of each task's ticket (pruned runs)
    mask_overlap-<run>.png    intersection over union of the task masks (pruned runs)
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from llt.config import legacy_tree
from llt.errors import LLTError
from llt.metrics import mean_interval
from llt.registry import TICKET_METHODS, label, names, search_of
from llt.reporting.paired import paired_columns, paired_table
from llt.runs import check_summary, identity_tree, read_records

RETRAINED = names("retrained")         # re-trainings of a ticket run: TR-BU and the lottery controls


def variant(summary: dict) -> str:
    """How a run's masks were trained: 'as found' for a ticket search, '<mask>, <init> init' for a re-training."""
    if summary["method"] not in RETRAINED:
        return "as found"
    mask = summary.get("mask", "ticket")
    return f"{'ticket' if mask == 'ticket' else mask + ' mask'}, {summary.get('init', 'original')} init"


@dataclass
class Run:
    path: Path
    summary: dict
    config: dict
    layer_density: list[dict] = field(default_factory=list)   # per task: layer -> density (pruned runs)
    iou: list[list[float]] | None = None                       # mask overlap (runs with masks)

    @property
    def name(self) -> str:
        return self.path.name


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise LLTError(f"{path.parent} is not a finished llt run (no {path.name}; {what})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LLTError(f"{path}: not valid JSON ({e})") from None


def load_run(path: str | Path) -> Run:
    """A finished run's summary, config and per-layer densities; clear errors for anything else."""
    path = Path(path)
    if not path.is_dir():
        raise LLTError(f"{path} is not a folder")
    summary = check_summary(_read_json(path / "summary.json", "finish it by running the same command again"),
                            str(path / "summary.json"))
    manifest = _read_json(path / "manifest.json", "not an llt run directory")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), dict):
        raise LLTError(f"{path / 'manifest.json'}: not an llt manifest (no config)")
    layer = {}
    for r in read_records(path / "records.jsonl"):   # a stage repeated after a crash: its last record wins
        if r.get("event") in ("ticket", "level", "retrain") and "per_layer_density" in r and \
                (r["event"] != "level" or r.get("kind") == "ticket"):
            layer[r["task"]] = r["per_layer_density"]
    # the masks are read now, before anything is written: a damaged or hostile mask file stops the report
    # before report.md or any figure exists
    return Run(path, summary, legacy_tree(manifest["config"]), [layer[t] for t in sorted(layer)],
               mask_iou(path, summary["num_tasks"]))


def group_key(run: Run) -> str:
    """Runs that differ only by seed (and name/output folder) share a key."""
    cfg = identity_tree(run.config)
    for k in ("seed", "name"):
        cfg.get("run", {}).pop(k, None)
    s = run.summary
    blob = json.dumps({"method": s["method"], "init": s.get("init"), "mask": s.get("mask"), "cfg": cfg}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


@dataclass
class Group:
    label: str
    runs: list[Run]

    @property
    def seeds(self) -> list[int]:
        return [r.summary["seed"] for r in self.runs]

    def per_task(self, key: str) -> list[tuple[float, float]]:
        n = min(r.summary["num_tasks"] for r in self.runs)
        out = []
        for t in range(n):
            vals = [r.summary[key][t] for r in self.runs if r.summary[key][t] is not None]
            out.append(mean_std(vals) if vals else (math.nan, math.nan))
        return out

    def task_values(self, key: str, t: int) -> list[float]:
        """The seeds' values of the per-task list `key` at task t (0-based; -1: the last), None left out."""
        return [r.summary[key][t] for r in self.runs if r.summary[key][t] is not None]

    def scalar_values(self, key: str) -> list[float]:
        """The seeds' values of the scalar summary field `key` (None left out)."""
        return [r.summary[key] for r in self.runs if r.summary.get(key) is not None]


def pm(values: list[float]) -> str:
    """A report cell: the mean over seeds +- the half-width of its 95 % Student-t interval ("+- n/a" for one
    seed; empty for none). The one convention of every "+-" in report.md."""
    if not values:
        return ""
    ci = mean_interval(values)
    return f"{ci['mean']:.2f} +- " + ("n/a" if ci["half"] is None else f"{ci['half']:.2f}")


def _flat(tree: dict) -> dict:
    return {f"{sec}.{k}": json.dumps(v) for sec, vals in tree.items() if isinstance(vals, dict) for k, v in vals.items()}


def make_groups(runs: list[Run]) -> list[Group]:
    """Runs that differ only by seed, as groups. Groups whose labels would be equal (replay with two batching
    recipes, say) are told apart by the config fields in which they differ."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(group_key(r), []).append(r)
    texts = {}
    for key, members in groups.items():
        s = members[0].summary
        text = f"{label(s['method'])} ({s['dataset']}"
        if s["method"] in TICKET_METHODS or s.get("mask_from"):     # the mean over its seeds
            text += f", {mean_std([r.summary['remaining_weights'][-1] for r in members])[0]:.2f} %"
        if s["method"] in RETRAINED:
            text += f", {variant(s)}"
        texts[key] = text
    out = []
    for key, members in groups.items():
        text = texts[key]
        twins = [k for k, t in texts.items() if t == text]
        if len(twins) > 1:
            flat = {k: _flat(identity_tree(groups[k][0].config)) for k in twins}
            differ = sorted(f for f in set().union(*flat.values()) if f not in ("run.seed", "run.name")
                            and len({flat[k].get(f) for k in twins}) > 1)
            text += ", " + ", ".join(f"{f.split('.', 1)[1]}={json.loads(flat[key][f]) if f in flat[key] else '-'}"
                                     for f in differ[:3])
        text += ")"
        if any(g.label == text for g in out):
            text = text[:-1] + f" [{key}])"
        out.append(Group(text, sorted(members, key=lambda r: r.summary["seed"])))
    return out


# ------------------------------------------------------------------------------------------ tables

def unlearned_tasks(groups: list[Group]) -> list[tuple[Run, int, float, float]]:
    """(run, task (1-based), its test accuracy right after it was learned, chance) for every task of every run
    that scored below chance then: 100 / the classes seen after it (a uniform guess over them). A method that
    does not learn its newest task is a defect until shown otherwise; the report says so before any table."""
    out = []
    for g in groups:
        for r in g.runs:
            per_task = int(r.config.get("data", {}).get("classes_per_task") or 1)
            for t, v in enumerate(r.summary["learning_accuracy"]):
                chance = 100.0 / ((t + 1) * per_task)
                if v < chance:
                    out.append((r, t + 1, v, chance))
    return out


def unlearned_table(groups: list[Group]) -> list[str]:
    """Markdown lines naming each task that scored below chance right after it was learned; empty when none."""
    rows = unlearned_tasks(groups)
    if not rows:
        return []
    md = ["## Warning: tasks below chance right after they were learned", "",
          f"{len(rows)} task(s) scored below chance (100 / the classes seen) on their own test images right after "
          "they were learned: the method did not learn them when they arrived. Find the cause before comparing "
          "these runs (docs/training.md has the one found so far: train.batchnorm=original at small batches).", "",
          "| run | task | accuracy right after learning it (%) | chance (%) |", "| --- | --- | --- | --- |"]
    md += [f"| {r.name} | {t} | {v:.2f} | {c:.2f} |" for r, t, v, c in rows]
    return md + [""]


def write_tables(groups: list[Group], out: Path) -> None:
    rows = []
    md = ["# llt report", "", "Every \"a +- b\" below is the mean over seeds and the half-width of its 95 % "
          "confidence interval (Student t, n - 1 degrees of freedom; n/a for one seed). Learning accuracy is the "
          "test accuracy on a task right after it is learned (the accuracy matrix's diagonal; docs/metrics.md).", ""]
    for g in groups:
        sa, rw, fg = g.per_task("sa"), g.per_task("remaining_weights"), g.per_task("forgetting")
        la = g.per_task("learning_accuracy")
        md += [f"## {g.label}", "", f"runs: {', '.join(r.name for r in g.runs)}; seeds: {g.seeds}", "",
               "| after task | SA (%) | learning accuracy of this task (%) | remaining weights (%) | forgetting (points) |",
               "| --- | --- | --- | --- | --- |"]
        for t, ((sm, ss), (lm, ls), (rm, rs), (fm, fs)) in enumerate(zip(sa, la, rw, fg)):
            md.append(f"| {t + 1} | " + " | ".join(pm(g.task_values(k, t)) for k in (
                "sa", "learning_accuracy", "remaining_weights", "forgetting")) + " |")
            rows.append({"group": g.label, "seeds": " ".join(map(str, g.seeds)), "task": t + 1,
                         "sa_mean": round(sm, 4), "sa_std": round(ss, 4),
                         "learning_accuracy_mean": round(lm, 4), "learning_accuracy_std": round(ls, 4),
                         "remaining_mean": round(rm, 4),
                         "remaining_std": round(rs, 4), "forgetting_mean": "" if math.isnan(fm) else round(fm, 4),
                         "forgetting_std": "" if math.isnan(fs) else round(fs, 4)})
        for r in g.runs:
            R = r.summary["accuracy_matrix"]
            md += ["", f"Accuracy matrix of {r.name} (seed {r.summary['seed']}), test accuracy in %:", "",
                   "| after | " + " | ".join(f"T{i + 1}" for i in range(len(R))) + " |",
                   "| --- |" + " --- |" * len(R)]
            for t, row in enumerate(R):
                md.append(f"| T1~{t + 1} | " + " | ".join(f"{v:.2f}" for v in row) + " |" * (len(R) - t - 1) + " |")
        md.append("")
    warning = unlearned_table(groups)
    md = md[:4] + warning + md[4:]
    md += controls_table(groups)
    md += paired_table(groups)
    md += budget_table(groups)
    head, compare = comparison(groups)
    lead = 4 + len(warning)
    (out / "report.md").write_text("\n".join(md[:lead] + head + md[lead:]))
    for name, table in (("summary.csv", rows), ("comparison.csv", compare)):
        with open(out / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(table[0]))
            w.writeheader()
            w.writerows(table)


# The comparison's columns: (heading, comparison.csv prefix, the seeds' values of a group)
FINAL_COLUMNS = (
    ("final SA (%)", "final_sa", lambda g: g.task_values("sa", -1)),
    ("learning accuracy, tasks 2..T (%)", "learning_accuracy_incremental",
     lambda g: g.scalar_values("mean_learning_accuracy_incremental")),
    ("learning accuracy, tasks 1..T (%)", "learning_accuracy", lambda g: g.scalar_values("mean_learning_accuracy")),
    ("final forgetting (points)", "final_forgetting", lambda g: g.task_values("forgetting", -1)),
    ("remaining weights (%)", "remaining", lambda g: g.task_values("remaining_weights", -1)),
)


def comparison(groups: list[Group]) -> tuple[list[str], list[dict]]:
    """One line per group after its last task: final SA, learning accuracy (the mean over tasks 2..T and over
    1..T of each task's accuracy right after learning it), final forgetting and remaining weights, each the
    mean over its seeds +- the half-width of its 95 % Student-t confidence interval (n/a for one seed), and
    the number of seeds (Markdown lines, CSV rows: mean, std, interval bounds, then the paired comparisons)."""
    md = ["## Comparison", "", "After the last task; mean over seeds +- the half-width of its 95 % confidence "
          "interval (Student t, n - 1 degrees of freedom; n/a for one seed). Learning accuracy: the mean test "
          "accuracy of each task right after it is learned, over the tasks learned beside old classes (2..T) "
          "and over all tasks (1..T, the literature's definition).", "",
          "| group | " + " | ".join(h for h, _, _ in FINAL_COLUMNS) + " | seeds |",
          "| --- |" + " --- |" * len(FINAL_COLUMNS) + " --- |"]
    rows = []
    paired = paired_columns(groups)
    for g in groups:
        row = {"group": g.label}
        cells = []
        for _, col, get in FINAL_COLUMNS:
            vals = get(g)
            ci = mean_interval(vals) if vals else None
            sd = mean_std(vals)[1] if vals else None
            row[f"{col}_mean"] = "" if ci is None else round(ci["mean"], 4)
            row[f"{col}_std"] = "" if sd is None else round(sd, 4)
            row[f"{col}_ci_low"] = "" if ci is None or ci["low"] is None else round(ci["low"], 4)
            row[f"{col}_ci_high"] = "" if ci is None or ci["high"] is None else round(ci["high"], 4)
            cells.append(pm(vals))
        row["n_seeds"] = len(g.runs)
        budget = group_budget(g)
        row["steps_per_epoch"] = " ".join(map(str, budget["steps_per_epoch"])) if budget else ""
        row["sgd_steps_mean"] = round(budget["steps"], 1) if budget else ""
        row.update(paired[g.label])
        rows.append(row)
        md.append(f"| {g.label} | " + " | ".join(cells) + f" | {len(g.runs)} |")
    return md + [""], rows


def group_budget(g: Group) -> dict | None:
    """What the group's trainings consumed (summary["budget"], mean over seeds): steps per epoch per task (of
    the first seed; one config gives every seed the same), SGD steps in all, and per step of the last task the
    new, memory and unlabeled images. None for summaries written before budgets were recorded."""
    budgets = [r.summary.get("budget") for r in g.runs]
    if not all(budgets) or not all(any(t.get("trainings") for t in b) for b in budgets):   # none recorded
        return None
    last = [b[-1] for b in budgets]
    per_step = {k: mean_std([x[f"{k}_images"] / max(x["steps"], 1) for x in last])[0]
                for k in ("new", "memory", "unlabeled")}
    return {"steps_per_epoch": [t["steps_per_epoch"] for t in budgets[0]],
            "steps": mean_std([sum(t["steps"] for t in b) for b in budgets])[0], "per_step": per_step}


def budget_table(groups: list[Group]) -> list[str]:
    """Markdown lines: every group's optimisation budget, so that a comparison shows it is a fair one."""
    md = ["## Optimisation budget", "",
          "SGD steps per epoch of each task's trainings (every method of one config takes the lottery loop's: one "
          "pass over the task's data and the memory, batch_size on task 1 and batch_size // 4 after), SGD steps of "
          "all trainings (ticket searches add their pruning rounds), and the images one step of the last task draws "
          "on average (mean over seeds).", "",
          "| group | steps per epoch, tasks 1.. | SGD steps in all | per step: new / memory / unlabeled images |",
          "| --- | --- | --- | --- |"]
    for g in groups:
        b = group_budget(g)
        if b is None:
            md.append(f"| {g.label} | n/a (not recorded) | | |")
            continue
        p = b["per_step"]
        md.append(f"| {g.label} | {' '.join(map(str, b['steps_per_epoch']))} | {b['steps']:.0f} | "
                  f"{p['new']:.1f} / {p['memory']:.1f} / {p['unlabeled']:.1f} |")
    return md + [""]


def controls_table(groups: list[Group]) -> list[str]:
    """Markdown lines: each ticket search beside its re-trainings (TR-BU / TR-TD and the lottery controls:
    random masks, random initialisation), final SA, forgetting and remaining weights; empty without
    re-trainings."""
    ticket = [g for g in groups if g.runs[0].summary["method"] in TICKET_METHODS]
    if not any(g.runs[0].summary["method"] in RETRAINED for g in ticket):
        return []
    def rank(s: dict) -> tuple:      # the search, its tickets re-trained, then the controls
        if s["method"] not in RETRAINED:
            return (0, 0, 0)
        return (1, s.get("mask", "ticket") != "ticket", s.get("init", "original") != "original")

    ticket.sort(key=lambda g: (label(search_of(g.runs[0].summary["method"])), g.runs[0].summary["dataset"],
                               rank(g.runs[0].summary), variant(g.runs[0].summary)))
    md = ["## Lottery controls", "",
          "Each ticket search, and the re-trainings of its masks in isolation (TR-BU / TR-TD with the tickets; the "
          "controls with random masks of the tickets' exact counts, or a random initialisation). Final values "
          "after the last task; mean +- the half-width of the 95 % confidence interval over seeds.", "",
          "| tickets | masks, initialisation | dataset | final SA (%) | learning accuracy, tasks 2..T (%) | "
          "final forgetting (points) | remaining weights (%) | seeds |",
          "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for g in ticket:
        s = g.runs[0].summary
        cells = [pm(g.task_values("sa", -1)), pm(g.scalar_values("mean_learning_accuracy_incremental")),
                 pm(g.task_values("forgetting", -1)), pm(g.task_values("remaining_weights", -1))]
        md.append(f"| {label(search_of(s['method']))} | {variant(s)} | {s['dataset']} | " + " | ".join(cells)
                  + f" | {len(g.runs)} |")
    return md + [""]


# ------------------------------------------------------------------------------------------ figures

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(ax, n: int) -> None:
    """A distinct colour per group: matplotlib's default cycle repeats after 10 (a study has more groups)."""
    if n > 10:
        cmap = _plt().get_cmap("tab20")
        ax.set_prop_cycle(color=[cmap(i % 20) for i in range(n)])


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")        # legends below the axes stay whole, however long the labels
    _plt().close(fig)
    return path


def plot_sa(groups: list[Group], out: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.6), dpi=120)
    _colors(ax, len(groups))
    for g in groups:
        sa = g.per_task("sa")
        x = list(range(1, len(sa) + 1))
        line = ax.errorbar(x, [m for m, _ in sa], yerr=[s for _, s in sa], marker="o", capsize=3, label=g.label)
        if len(g.runs) > 1:           # a band of one standard deviation over seeds
            ax.fill_between(x, [m - s for m, s in sa], [m + s for m, s in sa], alpha=0.15,
                            color=line.lines[0].get_color())
    ax.set_xlabel("number of learned tasks")
    ax.set_ylabel("SA (%)")
    ax.set_xticks(range(1, max(len(g.per_task("sa")) for g in groups) + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    ax.set_title("Standard accuracy as tasks are added")
    return _save(fig, out / "sa.png")


def plot_remaining(groups: list[Group], out: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.6), dpi=120)
    width = 0.8 / len(groups)
    _colors(ax, len(groups))
    for i, g in enumerate(groups):
        rw = g.per_task("remaining_weights")
        x = [t + 1 + (i - (len(groups) - 1) / 2) * width for t in range(len(rw))]
        bars = ax.bar(x, [m for m, _ in rw], width, yerr=[s for _, s in rw], capsize=2, label=g.label)
        ax.bar_label(bars, labels=[f"{m:.2f}" for m, _ in rw], fontsize=6, padding=2, rotation=90)
    ax.set_xlabel("task")
    ax.set_ylabel("remaining weights (%)")
    ax.set_xticks(range(1, max(len(g.per_task("remaining_weights")) for g in groups) + 1))
    ax.set_ylim(0, 118)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    ax.set_title("Remaining weights per task")
    return _save(fig, out / "remaining_weights.png")


def plot_matrix(run: Run, out: Path) -> Path:
    plt = _plt()
    R = run.summary["accuracy_matrix"]
    n = len(R)
    grid = [[row[i] if i < len(row) else math.nan for i in range(n)] for row in R]
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * n, 0.8 + 0.6 * n), dpi=120)
    im = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis")
    for t in range(n):
        for i in range(t + 1):
            ax.text(i, t, f"{R[t][i]:.1f}", ha="center", va="center", fontsize=7,
                    color="white" if R[t][i] < 60 else "black")
    ax.set_xticks(range(n), [f"T{i + 1}" for i in range(n)])
    ax.set_yticks(range(n), [f"after {t + 1}" for t in range(n)])
    ax.set_xlabel("evaluated task")
    fig.colorbar(im, ax=ax, label="test accuracy (%)")
    ax.set_title(f"{label(run.summary['method'])}, seed {run.summary['seed']}",
                 fontsize=9)
    return _save(fig, out / f"accuracy_matrix-{run.name}.png")


def plot_layer_density(run: Run, out: Path) -> Path | None:
    if not run.layer_density:
        return None
    plt = _plt()
    layers = list(run.layer_density[0])
    fig, ax = plt.subplots(figsize=(8, 4), dpi=120)
    for t, dens in enumerate(run.layer_density):
        ax.plot(range(len(layers)), [100 * dens[k] for k in layers], marker=".", label=f"task {t + 1}")
    ax.set_xticks(range(len(layers)), [k.removesuffix(".weight") for k in layers], rotation=70, fontsize=6)
    ax.set_ylabel("density (%)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"Per-layer density of the tickets: {run.name}", fontsize=9)
    return _save(fig, out / f"layer_density-{run.name}.png")


def mask_iou(path: Path, n: int) -> list[list[float]] | None:
    """Intersection over union of the task masks of the run at `path` (None when it has no masks)."""
    import torch

    from llt.pruning.mask import Mask

    paths = [path / f"masks/task{t}.pt" for t in range(1, n + 1)]
    if not all(p.is_file() for p in paths):
        return None
    masks = [Mask.load(p) for p in paths]
    flat = [torch.cat([m[k].flatten() for k in m.names()]) for m in masks]
    return [[float((a & b).sum()) / max(float((a | b).sum()), 1.0) for b in flat] for a in flat]


def plot_overlap(run: Run, out: Path) -> Path | None:
    iou = run.iou
    if iou is None:
        return None
    plt = _plt()
    n = len(iou)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * n, 0.8 + 0.6 * n), dpi=120)
    im = ax.imshow(iou, vmin=0, vmax=1, cmap="magma")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{iou[i][j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if iou[i][j] < 0.5 else "black")
    ticks = [f"T{t + 1}" for t in range(n)]
    ax.set_xticks(range(n), ticks)
    ax.set_yticks(range(n), ticks)
    fig.colorbar(im, ax=ax, label="intersection over union")
    ax.set_title(f"Mask overlap: {run.name}", fontsize=9)
    return _save(fig, out / f"mask_overlap-{run.name}.png")


def expand(run_dirs: list[str]) -> list[str]:
    """Run directories, with a study folder (one holding study.json) replaced by its finished runs. A study's
    run paths are relative to its folder (absolute ones, from older studies, are taken as they are); the runs
    it lists but that are missing or unfinished are named on stderr, not dropped silently."""
    out = []
    for p in run_dirs:
        study = Path(p) / "study.json"
        if study.is_file():
            try:
                jobs = json.loads(study.read_text())["jobs"]
                dirs = [Path(p) / j["directory"] for j in jobs]      # an absolute path stays absolute
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise LLTError(f"{study}: not a study record ({e})") from None
            missing = [d for d in dirs if not d.is_dir()]
            unfinished = [d for d in dirs if d.is_dir() and not (d / "summary.json").is_file()]
            for what, items in (("missing", missing), ("not finished", unfinished)):
                if items:
                    print(f"llt report: {study}: {len(items)} of {len(dirs)} runs {what}: "
                          + ", ".join(d.name for d in items), file=sys.stderr)
            out += [str(d) for d in dirs if (d / "summary.json").is_file()]
        else:
            out.append(p)
    return out


def report(run_dirs: list[str], out_dir: str) -> list[Path]:
    runs = [load_run(p) for p in expand(run_dirs)]
    if not runs:
        raise LLTError("llt report needs at least one run directory")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LLTError(f"cannot write to the output folder {out}: {e.strerror or e}") from None
    groups = make_groups(runs)
    write_tables(groups, out)
    bad = unlearned_tasks(groups)
    if bad:
        print(f"llt report: WARNING: {len(bad)} task(s) scored below chance right after they were learned (first: "
              f"{bad[0][0].name}, task {bad[0][1]} at {bad[0][2]:.2f} %); see report.md", file=sys.stderr)
    written = [out / "report.md", out / "summary.csv", plot_sa(groups, out), plot_remaining(groups, out)]
    for r in runs:
        written.append(plot_matrix(r, out))
        written += [p for p in (plot_layer_density(r, out), plot_overlap(r, out)) if p]
    return written
