"""Run directories: atomic writes, checkpoints that cannot run code, records, summaries, naming."""

import dataclasses
import json
import os

import pytest
import torch

from conftest import Evil
from llt.config import RunConfig
from llt.errors import LLTError
from llt.runs import RunDir, build_summary, check_summary, config_hash, run_name
from llt.storage import atomic_write_json, load_checkpoint, save_checkpoint


def test_atomic_write_failure_keeps_the_old_file_and_no_temporaries(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    atomic_write_json(target, {"v": 1})

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_json(target, {"v": 2})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_checkpoint_write_that_fails_halfway_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    import llt.storage

    save_checkpoint(tmp_path / "c.pt", {"w": torch.ones(10)}, {"v": 1})
    real = torch.save

    def half_then_fail(obj, f):
        real(obj, f)
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(llt.storage.torch, "save", half_then_fail)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "c.pt", {"w": torch.zeros(10)}, {"v": 2})
    monkeypatch.setattr(llt.storage.torch, "save", real)
    state, meta = load_checkpoint(tmp_path / "c.pt")
    assert meta == {"v": 1} and torch.equal(state["w"], torch.ones(10))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    state = {"w": torch.randn(3, 3), "steps": torch.tensor(5)}
    save_checkpoint(tmp_path / "c.pt", state, {"task": 2, "note": "ok"})
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert set(raw) == {"state", "meta"}
    got, meta = load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(got["w"], state["w"]) and meta == {"task": 2, "note": "ok"}


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    sentinel = tmp_path / "pwned"
    torch.save({"state": {}, "meta": "{}", "x": Evil(sentinel)}, tmp_path / "evil.pt")
    with pytest.raises(LLTError, match="evil.pt: not a valid llt checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not sentinel.exists()


def test_truncated_checkpoint_is_refused(tmp_path):
    save_checkpoint(tmp_path / "c.pt", {"w": torch.randn(100)})
    data = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "c.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(LLTError, match="c.pt: not a valid llt checkpoint"):
        load_checkpoint(tmp_path / "c.pt")


def test_records_survive_a_torn_last_line(tmp_path):
    rd = RunDir.create(tmp_path, "r")
    rd.record("a", x=1)
    rd.record("b", x=2)
    with open(rd.file("records.jsonl"), "a") as f:
        f.write('{"event": "c", "x"')
    assert [r["event"] for r in rd.records()] == ["a", "b"]
    # the run is resumed and records again: the torn line is closed, the new record is readable
    rd.record("d", x=4)
    assert [r["event"] for r in rd.records()] == ["a", "b", "d"]
    assert rd.file("records.jsonl").read_text().count("\n") == 4


def test_a_stage_marker_removes_the_epoch_checkpoints_of_its_training(tmp_path):
    rd = RunDir.create(tmp_path, "r")
    save_checkpoint(rd.file("checkpoints/epoch/task1.pt"), {"w": torch.zeros(1)})
    save_checkpoint(rd.file("checkpoints/task0.pt"), {"w": torch.zeros(1)})
    rd.mark_done("task1")
    assert not rd.file("checkpoints/epoch").exists() and rd.file("checkpoints/task0.pt").is_file()


def test_stage_markers(tmp_path):
    rd = RunDir.create(tmp_path, "r")
    assert not rd.stage_done("task1")
    rd.mark_done("task1", seconds=3.5)
    assert rd.stage_done("task1") and json.loads(rd.file("stages/task1.done").read_text())["seconds"] == 3.5


def test_unwritable_output_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(LLTError, match="cannot write to the output folder .*file/runs"):
        RunDir.create(blocker / "runs", "r")


def test_summary_from_a_hand_made_matrix():
    s = build_summary("bu", "cifar10", 3, [[90], [80, 70]], [0.0281, 0.0311], extra_field=1)
    assert s["sa"] == [90.0, 75.0] and s["forgetting"] == [None, 10.0] and s["final_sa"] == 75.0
    assert s["density"] == [0.0281, 0.0311] and s["remaining_weights"] == pytest.approx([2.81, 3.11])
    assert s["num_tasks"] == 2 and s["extra_field"] == 1
    assert check_summary(json.loads(json.dumps(s)), "summary.json")["seed"] == 3
    with pytest.raises(LLTError, match="missing accuracy_matrix"):
        check_summary({k: v for k, v in s.items() if k != "accuracy_matrix"}, "summary.json")
    with pytest.raises(LLTError, match="row t holding t\\+1 values"):
        check_summary({**s, "accuracy_matrix": [[90], [80]]}, "summary.json")


def test_run_name_hashes_the_full_config_including_defaults():
    a = RunConfig()
    b = dataclasses.replace(a, train=dataclasses.replace(a.train, momentum=0.8))
    assert config_hash(a) != config_hash(b)
    moved = dataclasses.replace(a, run=dataclasses.replace(a.run, out_dir="elsewhere"))
    assert config_hash(moved) == config_hash(a)          # the output folder is not part of a run's identity
    data_moved = dataclasses.replace(a, data=dataclasses.replace(a.data, data_dir="/mnt/x", cache_dir="/tmp/c"))
    assert config_hash(data_moved) == config_hash(a)     # nor where its data are read from
    subset = dataclasses.replace(a, data=dataclasses.replace(a.data, train_per_class=10))
    assert config_hash(subset) != config_hash(a)         # but which data it trains on is
    assert run_name(a, "paper-cifar10-bu").startswith("paper-cifar10-bu-bu-cifar10-s0-")
