"""`llt list [DIR]`: the runs in a folder with method, dataset, seed, state and final SA."""

from __future__ import annotations

import json
from pathlib import Path

from llt.errors import LLTError
from llt.runs import RunLock, lock_held


def run_state(path: Path) -> dict:
    """What a run directory holds: identity from the manifest, state from the summary and stage markers."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        cfg = manifest["config"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return {"run": path.name, "method": "?", "dataset": "?", "seed": "?", "state": "unreadable manifest", "final_sa": None}
    row = {"run": path.name, "method": cfg["run"]["method"], "dataset": cfg["data"]["dataset"], "seed": cfg["run"]["seed"]}
    summary = path / "summary.json"
    if summary.is_file():
        try:
            s = json.loads(summary.read_text())
            method = s.get("method", row["method"])
            return {**row, "method": method, "state": "finished", "final_sa": s.get("final_sa"),
                    "remaining": s.get("remaining_weights", [None])[-1]}
        except json.JSONDecodeError:
            return {**row, "state": "unreadable summary", "final_sa": None}
    if lock_held(path):
        owner = RunLock(path).owner()
        return {**row, "state": f"running (process {owner.get('pid', '?')} on {owner.get('host', '?')})",
                "final_sa": None}
    markers = sorted((path / "stages").glob("*.done"), key=lambda p: p.stat().st_mtime) if (path / "stages").is_dir() else []
    state = f"interrupted after {markers[-1].stem}" if markers else "not started"
    training = _training_in_progress(path)
    if training:
        state = f"interrupted in {training}"
    return {**row, "state": state, "final_sa": None}


def _training_in_progress(path: Path) -> str | None:
    """'<training> epoch e/E' from the note beside the newest epoch checkpoint, if there is one."""
    notes = sorted((path / "checkpoints" / "epoch").glob("*.json"), key=lambda p: p.stat().st_mtime)
    for note in reversed(notes):
        try:
            info = json.loads(note.read_text())
            return f"{info['key']} epoch {int(info['epoch'])}/{int(info['epochs'])}"
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return None


def list_runs(folder: str | Path) -> list[dict]:
    folder = Path(folder)
    if not folder.is_dir():
        raise LLTError(f"{folder} is not a folder")
    return [run_state(p) for p in sorted(folder.iterdir()) if (p / "manifest.json").is_file()]


def format_runs(rows: list[dict]) -> str:
    if not rows:
        return "no runs"
    head = f"{'run':<48} {'method':<6} {'dataset':<12} {'seed':>4}  {'state':<34} {'final SA':>8} {'weights%':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        sa = "" if r.get("final_sa") is None else f"{r['final_sa']:.2f}"
        rw = "" if r.get("remaining") is None else f"{r['remaining']:.2f}"
        lines.append(f"{r['run'][:48]:<48} {r['method']:<6} {r['dataset']:<12} {r['seed']!s:>4}  {r['state'][:34]:<34} "
                     f"{sa:>8} {rw:>8}")
    return "\n".join(lines)
