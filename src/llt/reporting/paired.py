"""Paired comparisons for `llt report`: the difference between two methods on the same seed, with a Student-t
95 % confidence interval over seeds (llt.metrics.paired_difference).

Two kinds of pair, each matched seed by seed:
    method - dense   every group against the dense CIL group on the same stream and model (the same dataset,
                     tasks, class order, images per class and network), when exactly one such dense group exists
    method - replay  every baseline and dense CIL against the balanced-replay group, under the same rule (the
                     registry's `reference` methods)
    ticket - control every lottery control (a re-training with a random mask or a random initialisation)
                     against the tickets it controls for, twice when the report has both: the re-training of
                     the same ticket run with its own masks from theta_0 (TR-BU / TR-TD, trained exactly as the
                     control is), and the ticket run as found (the search's own result)
The groups come from llt.reporting.report (runs that differ only by seed).
"""

from __future__ import annotations

import json
from pathlib import Path

from llt.metrics import paired_difference
from llt.registry import REGISTRY

METRICS = (("final_sa", "final SA", "points"), ("mean_learning_accuracy_incremental", "learning accuracy, tasks 2..T",
                                                   "points"), ("final_forgetting", "final forgetting", "points"))
STREAM_FIELDS = ("dataset", "num_tasks", "classes_per_task", "class_order", "train_per_class", "val_per_class",
                 "val_fraction")


def stream_key(run) -> str:
    """What makes two runs comparable seed by seed: the same stream and the same network."""
    data = run.config.get("data", {})
    return json.dumps({"data": {k: data.get(k) for k in STREAM_FIELDS}, "model": run.config.get("model", {})},
                      sort_keys=True)


def values(group, key: str) -> dict[int, float]:
    """seed -> the summary's value of `key` (runs without it are left out)."""
    return {r.summary["seed"]: r.summary[key] for r in group.runs if r.summary.get(key) is not None}


def _retrained(group) -> dict | None:
    s = group.runs[0].summary
    return s if REGISTRY.get(s["method"]) is not None and REGISTRY[s["method"]].family == "retrained" else None


def is_control(group) -> bool:
    """A lottery control: a re-training with a random mask or a random initialisation (a re-training from the
    dense reference's weights, init=reference, is a variant of the tickets, not a control)."""
    s = _retrained(group)
    return s is not None and (s.get("mask", "ticket") != "ticket" or s.get("init", "original") == "random")


def is_retrained_ticket(group) -> bool:
    """TR-BU / TR-TD: the ticket's own masks re-trained from theta_0."""
    s = _retrained(group)
    return s is not None and s.get("mask", "ticket") == "ticket" and s.get("init", "original") == "original"


def source_name(run) -> str:
    return Path(str(run.summary.get("source_run", ""))).name


def ticket_references(control, groups) -> list[tuple[str, str, dict[str, dict[int, float]]]]:
    """(kind, what they are, per metric seed -> value) of the tickets `control` is a control of, each the
    report has: "retrained", their re-training from theta_0 (TR-BU / TR-TD, trained exactly as the control);
    "found", the ticket run as found. Empty when the report has neither."""
    sources = {source_name(r) for r in control.runs}
    out = []
    for g in groups:
        if g is not control and is_retrained_ticket(g) and {source_name(r) for r in g.runs} & sources:
            out.append(("retrained", f"{REGISTRY[g.runs[0].summary['method']].label} tickets",
                        {key: values(g, key) for key, _, _ in METRICS}))
            break
    for g in groups:
        if {r.name for r in g.runs} & sources:
            out.append(("found", f"{REGISTRY[g.runs[0].summary['method']].label} tickets as found",
                        {key: values(g, key) for key, _, _ in METRICS}))
            break
    return out


def as_reference(run, name: str) -> bool:
    """Whether `run` is method `name` as a reference is meant: dense (no baseline.mask_from) and with the batching
    its registry entry defaults to (balanced replay, not concat)."""
    b = run.config.get("baseline", {})
    return run.summary["method"] == name and not b.get("mask_from") and \
        b.get("replay_batching", "auto") in ("auto", REGISTRY[name].batching[0])


def references(group, groups) -> list:
    """The reference groups `group` is compared with (the registry's `reference` methods: dense CIL, balanced
    replay), each when exactly one group of that method, as a reference is meant (`as_reference`), shares its
    stream and network, in registry order."""
    key = stream_key(group.runs[0])
    out = []
    for name, m in REGISTRY.items():
        if not m.reference:
            continue
        same = [g for g in groups if as_reference(g.runs[0], name) and stream_key(g.runs[0]) == key]
        if len(same) == 1 and same[0] is not group:
            out.append(same[0])
    return out


def paired_comparisons(groups) -> list[dict]:
    """One entry per (group, comparison): {"group", "comparison", "kind" (dense, retrained, found or missing),
    "against", metric: paired_difference or None}."""
    out = []
    for g in groups:
        for d in references(g, groups):
            kind = REGISTRY[d.runs[0].summary["method"]].family
            own = REGISTRY.get(g.runs[0].summary["method"])
            if kind == "baseline" and (own is None or own.family not in ("baseline", "dense")):
                continue        # a baseline reference (replay) is compared with the baselines and dense CIL
            kind = "dense" if kind == "dense" else d.runs[0].summary["method"]
            ref = REGISTRY[d.runs[0].summary["method"]]
            out.append({"group": g, "comparison": f"method - {ref.label.lower()}", "kind": kind,
                        "against": d.label,
                        **{key: paired_difference(values(g, key), values(d, key)) for key, _, _ in METRICS}})
        if is_control(g):
            refs = ticket_references(g, groups)
            for kind, what, ref in refs:
                out.append({"group": g, "comparison": "ticket - control", "kind": kind, "against": what,
                            **{key: paired_difference(ref[key], values(g, key)) for key, _, _ in METRICS}})
            if not refs:
                out.append({"group": g, "comparison": "ticket - control", "kind": "missing",
                            "against": "its tickets: not in this report", **{key: None for key, _, _ in METRICS}})
    return out


def fmt(d: dict | None, missing: bool = False) -> tuple[str, str, str]:
    """(mean [low, high], n, positive) cells; n = 1 gives n/a for the interval, never +- 0; `missing`: there is
    nothing to compare with (else None means the two groups share no seed)."""
    if d is None:
        return ("n/a" if missing else "n/a (no shared seed)"), "0", ""
    ci = "n/a" if d["half"] is None else f"[{d['low']:+.2f}, {d['high']:+.2f}]"
    return f"{d['mean']:+.2f} {ci}", str(d["n"]), f"{d['positive']} of {d['n']}"


def paired_table(groups) -> list[str]:
    """Markdown lines of every paired comparison; empty when the report has none."""
    rows = paired_comparisons(groups)
    if not rows:
        return []
    md = ["## Paired differences (same seed)", "",
          "Differences on the same seed, after the last task: each method minus the dense run, each baseline and "
          "the dense run minus replay, and each lottery "
          "control's tickets minus the control, against each of the two the report has: the tickets re-trained "
          "from theta_0 (TR-BU / TR-TD, trained exactly as the control is) and the ticket run as found. "
          "Mean difference with its 95 % confidence interval (Student t over the seeds' differences, n - 1 "
          "degrees of freedom; n/a for one seed), n seeds, and on how many seeds the difference was positive "
          "(final SA / learning accuracy / final forgetting: a positive forgetting difference means the first "
          "forgets more). Learning accuracy: the mean over tasks 2..T of each task's accuracy right after "
          "learning it.", "",
          "| group | comparison | final SA difference (points) [95 % CI] | learning accuracy difference, tasks 2..T "
          "(points) [95 % CI] | final forgetting difference (points) [95 % CI] | n | positive (SA / LA / forgetting) |",
          "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        missing = r["kind"] == "missing"
        sa, n, pos = fmt(r["final_sa"], missing)
        la, _, lpos = fmt(r["mean_learning_accuracy_incremental"], missing)
        fg, _, fpos = fmt(r["final_forgetting"], missing)
        both = f"{pos} / {lpos} / {fpos}" if pos else ""
        md.append(f"| {r['group'].label} | {r['comparison']} ({r['against']}) | {sa} | {la} | {fg} | {n} | {both} |")
    return md + [""]


def paired_columns(groups) -> dict[str, dict]:
    """group label -> comparison.csv columns: for "minus_dense" (the group minus dense), "minus_replay" (a baseline
    or dense CIL minus balanced replay), "ticket_minus" (its
    tickets re-trained from theta_0, TR-BU / TR-TD, minus this control) and "found_minus" (the ticket run as found
    minus this control), per metric: mean, ci_low, ci_high, n, positive (empty where none)."""
    cols: dict[str, dict] = {g.label: {} for g in groups}
    names = {"dense": "minus_dense", **{n: f"minus_{n}" for n, m in REGISTRY.items() if m.reference and m.family != "dense"},
             "retrained": "ticket_minus", "found": "found_minus"}
    for g in groups:
        for prefix in names.values():
            for key, _, _ in METRICS:
                for f in ("mean", "ci_low", "ci_high", "n", "positive"):
                    cols[g.label][f"{prefix}_{key}_{f}"] = ""
    for r in paired_comparisons(groups):
        if r["kind"] == "missing":
            continue
        prefix = names[r["kind"]]
        for key, _, _ in METRICS:
            d = r[key]
            if d is None:
                continue
            row = cols[r["group"].label]
            row[f"{prefix}_{key}_mean"] = round(d["mean"], 4)
            row[f"{prefix}_{key}_ci_low"] = "" if d["low"] is None else round(d["low"], 4)
            row[f"{prefix}_{key}_ci_high"] = "" if d["high"] is None else round(d["high"], 4)
            row[f"{prefix}_{key}_n"] = d["n"]
            row[f"{prefix}_{key}_positive"] = d["positive"]
    return cols
