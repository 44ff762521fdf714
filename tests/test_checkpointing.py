"""EpochCheckpoint: background, atomic, latest-wins writes; loads that never trust a file blindly."""

from __future__ import annotations

import errno
import json
import threading

import pytest
import torch

from llt import storage
from llt.checkpointing import EpochCheckpoint, fingerprint_mask
from llt.trainer import Schedule, learning_rate
from conftest import Evil, full_disk

IDENTITY = {"task": 1, "key": "bu-ref1", "epochs": 5, "mask": "dense"}


def state(value: float) -> dict:
    return {"model": {"w": torch.full((3, 3), value)}, "progress": {"epoch": int(value), "history": [{"val": value}]},
            "cyclers": {"new": {"order": torch.arange(4), "pos": 2}}}


def test_round_trip_through_the_background_writer(tmp_path):
    ck = EpochCheckpoint(tmp_path / "epoch/bu-ref1.pt", "bu-ref1", IDENTITY)
    src = state(2.0)
    ck.save(2, src, frozen={"best_state": {"w": torch.ones(2)}})
    src["model"]["w"].fill_(-1.0)               # the caller keeps training: the snapshot must not change
    ck.close(flush=True)
    got = EpochCheckpoint(tmp_path / "epoch/bu-ref1.pt", "bu-ref1", IDENTITY).load()
    assert got["meta"]["epoch"] == 2 and got["meta"]["identity"] == IDENTITY
    assert torch.equal(got["model"]["w"], torch.full((3, 3), 2.0)) and torch.equal(got["best_state"]["w"], torch.ones(2))
    assert got["progress"] == {"epoch": 2, "history": [{"val": 2.0}]} and got["cyclers"]["new"]["pos"] == 2
    assert json.loads((tmp_path / "epoch/bu-ref1.json").read_text()) == {"key": "bu-ref1", "epoch": 2, "epochs": 5}
    assert ck.stats["writes"] == 1 and ck.stats["bytes"] > 0


def test_a_newer_snapshot_replaces_a_waiting_one_and_close_without_flush_drops_it(tmp_path, monkeypatch):
    release, entered, real = threading.Event(), threading.Event(), storage.atomic_torch_save

    def slow(path, obj):
        entered.set()
        release.wait(10)
        real(path, obj)

    monkeypatch.setattr(storage, "atomic_torch_save", slow)
    ck = EpochCheckpoint(tmp_path / "c.pt", "c", IDENTITY)
    ck.save(1, state(1.0))
    assert entered.wait(10)                      # epoch 1 is being written
    ck.save(2, state(2.0))                       # waits
    ck.save(3, state(3.0))                       # replaces epoch 2
    assert not ck.wait(timeout=0.05)             # epoch 1 is still being written
    release.set()
    assert ck.wait(timeout=10) and ck.stats["writes"] == 2     # epochs 1 and 3 are on disk, the writer lives
    ck.close(flush=True)
    assert ck.stats["dropped"] == 1 and ck.stats["writes"] == 2
    assert EpochCheckpoint(tmp_path / "c.pt", "c", IDENTITY).load()["meta"]["epoch"] == 3

    release.clear()
    entered.clear()
    ck = EpochCheckpoint(tmp_path / "c.pt", "c", IDENTITY)
    ck.save(4, state(4.0))
    assert entered.wait(10)
    ck.save(5, state(5.0))
    threading.Timer(0.2, release.set).start()
    ck.close()                                   # waits for epoch 4, drops epoch 5
    assert EpochCheckpoint(tmp_path / "c.pt", "c", IDENTITY).load()["meta"]["epoch"] == 4


def test_a_checkpoint_of_another_training_is_ignored_with_a_note(tmp_path, capsys):
    ck = EpochCheckpoint(tmp_path / "c.pt", "c", IDENTITY)
    ck.save(1, state(1.0))
    ck.close(flush=True)
    other = EpochCheckpoint(tmp_path / "c.pt", "c", {**IDENTITY, "mask": "0123456789abcdef"})
    assert other.load() is None
    assert "belongs to another training" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncated", "code", "not-a-dict", "no-meta"])
def test_a_damaged_or_hostile_epoch_checkpoint_is_never_used(tmp_path, capsys, damage):
    path, sentinel = tmp_path / "c.pt", tmp_path / "ran"
    ck = EpochCheckpoint(path, "c", IDENTITY)
    ck.save(1, state(1.0))
    ck.close(flush=True)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "code":
        torch.save({"model": Evil(sentinel), "meta": "{}"}, path)
    elif damage == "not-a-dict":
        torch.save([1, 2], path)
    else:
        torch.save({"model": {}}, path)
    assert EpochCheckpoint(path, "c", IDENTITY).load() is None
    assert not sentinel.exists()
    assert "[llt] note: " in capsys.readouterr().err


def test_a_temporary_left_by_a_killed_write_is_removed_and_the_last_checkpoint_kept(tmp_path):
    ck = EpochCheckpoint(tmp_path / "c.pt", "c", IDENTITY)
    ck.save(1, state(1.0))
    ck.close(flush=True)
    (tmp_path / ".c.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    assert EpochCheckpoint(tmp_path / "c.pt", "c", IDENTITY).load()["meta"]["epoch"] == 1
    assert not list(tmp_path.glob("*.tmp"))


def test_a_failed_write_is_raised_on_the_training_thread(tmp_path):
    disk = full_disk(lambda path: True)
    try:
        ck = EpochCheckpoint(tmp_path / "c.pt", "c", IDENTITY)
        ck.save(1, state(1.0))
        with pytest.raises(OSError) as e:
            ck.close(flush=True)                 # the writer failed on epoch 1: the error comes out here
    finally:
        disk.undo()
    assert e.value.errno == errno.ENOSPC and not (tmp_path / "c.pt").exists()


def test_due_epochs():
    ck = EpochCheckpoint("x.pt", "x", IDENTITY, every=2)
    assert [e for e in range(1, 8) if ck.due(e, 7)] == [2, 4, 6]        # never the last epoch: the stage ends
    assert not any(EpochCheckpoint("x.pt", "x", IDENTITY, every=0).due(e, 7) for e in range(1, 8))


def test_the_learning_rate_of_each_epoch_equals_multisteplr_stepped_per_epoch():
    """The learning rate is a function of the epoch (no scheduler state to checkpoint); it must give what
    torch's MultiStepLR gives when stepped once per epoch, milestone epochs included."""
    for milestones, epochs in (((60, 80), 100), ((2, 3), 6), ((), 4), ((1,), 3)):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(milestones), gamma=0.1)
        s = Schedule(epochs=epochs, lr=0.01, milestones=milestones, gamma=0.1)
        for epoch in range(1, epochs + 1):
            assert learning_rate(s, epoch) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12), (milestones, epoch)
            opt.step()
            sched.step()
    s = Schedule(epochs=100, lr=0.01, milestones=(60, 80))
    assert [learning_rate(s, e) for e in (1, 60, 61, 80, 81, 100)] == pytest.approx([1e-2, 1e-2, 1e-3, 1e-3, 1e-4, 1e-4])


def test_mask_fingerprints_see_one_bit():
    a = {"conv.weight": torch.ones(4, 3, 3, 3, dtype=torch.bool)}
    b = {"conv.weight": a["conv.weight"].clone()}
    assert fingerprint_mask(a) == fingerprint_mask(b) != fingerprint_mask(None)
    b["conv.weight"][2, 1, 0, 2] = False
    assert fingerprint_mask(a) != fingerprint_mask(b)
