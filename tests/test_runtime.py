"""The CPU fast path: precision and memory format resolved from the CPU's bf16 support, recorded in the
manifest, a warning when a run continues under another set-up; the validation cap; one validation per
epoch serving every consumer; the teaching query stays valid in bf16."""

from __future__ import annotations

import json
import os

import pytest
import torch

from llt import runtime
from llt.data.augment import Normalizer, make_generator
from llt.data.stream import split_train_val
from llt.models import build_model
from llt.runtime import available_cpus, resolve_numerics, runtime_changes
from llt.teaching import build_teaching_set

CPU = torch.device("cpu")
TINY = ["--preset", "demo", "--set", "run.method=cil", "--set", "data.num_tasks=2", "--set", "train.epochs=1",
        "--set", "model.width=4", "--set", "data.exemplars_per_class=3", "--quiet"]


@pytest.mark.parametrize("cap", ["amx-bf16", "avx512-bf16"])
def test_auto_is_bf16_channels_last_on_a_cpu_with_native_bf16(cap):
    n = resolve_numerics("auto", CPU, capability=cap)
    assert (n.autocast_dtype, n.channels_last, n.precision, n.capability, n.warning) == \
        (torch.bfloat16, True, "bf16", cap, None)
    fp32 = resolve_numerics("fp32", CPU, capability=cap)           # fp32 stays fp32 NCHW (bit-exact comparisons)
    assert (fp32.autocast_dtype, fp32.channels_last, fp32.precision) == (None, False, "fp32")


def test_auto_is_fp32_without_native_bf16_and_forced_bf16_warns_once():
    n = resolve_numerics("auto", CPU, capability=None)
    assert (n.autocast_dtype, n.channels_last, n.precision, n.warning) == (None, False, "fp32", None)
    forced = resolve_numerics("bf16", CPU, capability=None)
    assert forced.autocast_dtype == torch.bfloat16 and forced.warning is not None
    assert "\n" not in forced.warning and "without native bf16" in forced.warning


def test_the_capability_check_is_what_torch_reports(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert runtime.cpu_bf16_capability() is None
    assert resolve_numerics("auto", CPU).precision == "fp32"        # the default asks torch
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert runtime.cpu_bf16_capability() == "avx512-bf16" and resolve_numerics("auto", CPU).precision == "bf16"


def test_a_run_on_a_cpu_without_bf16_runs_fp32_and_forced_bf16_prints_the_warning(tmp_path, monkeypatch, capsys):
    from llt.cli import main

    monkeypatch.setattr(runtime, "cpu_bf16_capability", lambda: None)
    assert main(["run", *TINY, "--out", str(tmp_path / "a")]) == 0
    [rd] = (tmp_path / "a").iterdir()
    facts = json.loads((rd / "manifest.json").read_text())["runtime"]
    assert facts["precision"] == "fp32" and facts["memory_format"] == "contiguous" and facts["capability"] is None
    assert "WARNING" not in capsys.readouterr().out
    assert main(["run", *TINY, "--set", "train.precision=bf16", "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert out.count("without native bf16") == 1
    [rd] = (tmp_path / "b").iterdir()
    assert json.loads((rd / "manifest.json").read_text())["runtime"]["precision"] == "bf16"


def test_manifest_records_the_runtime_and_resume_under_other_threads_warns_and_finishes(tmp_path, capsys):
    from llt.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["run", *TINY, "--out", str(tmp_path)]) == 0
        [rd] = tmp_path.iterdir()
        facts = json.loads((rd / "manifest.json").read_text())["runtime"]
        assert facts["threads"] == 1 and facts["torch"] == torch.__version__ and facts["device"] == "cpu"
        assert set(facts) == {"device", "precision", "memory_format", "torch", "capability", "threads"}
        summary = json.loads((rd / "summary.json").read_text())
        # an unfinished last task: resumed with 2 threads
        (rd / "summary.json").unlink()
        (rd / "stages" / "task2.done").unlink()
        capsys.readouterr()
        torch.set_num_threads(2)
        assert main(["resume", str(rd), "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if "continues under another set-up" in line]
    assert len(warnings) == 1 and "threads 1 -> 2" in warnings[0] and "bit-equal" in warnings[0]
    assert json.loads((rd / "summary.json").read_text())["accuracy_matrix"][0] == summary["accuracy_matrix"][0]


def test_runtime_changes_name_each_changed_fact():
    now = {"precision": "bf16", "threads": 2, "torch": "2.13.0"}
    assert runtime_changes(None, now) == []               # runs written before the field existed: nothing to say
    assert runtime_changes(dict(now), now) == []
    assert runtime_changes({**now, "precision": "fp32", "threads": 1}, now) == ["precision fp32 -> bf16", "threads 1 -> 2"]


def test_available_cpus_follow_the_affinity_mask(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    assert available_cpus() == 3


def test_val_per_class_caps_validation_and_leaves_training_unchanged():
    labels = torch.arange(10).repeat_interleave(50)
    train, val = split_train_val(labels, 0.2, seed=3)
    train_c, val_c = split_train_val(labels, 0.2, seed=3, val_per_class=4)
    assert torch.equal(train, train_c)
    assert all(int((labels[val_c] == c).sum()) == 4 for c in range(10))
    assert set(val_c.tolist()) <= set(val.tolist())
    _, val_big = split_train_val(labels, 0.2, seed=3, val_per_class=1000)   # a cap above the split: all of it
    assert torch.equal(val_big, val)


def test_a_bad_val_per_class_is_refused():
    from llt.config import load_config
    from llt.errors import LLTError

    with pytest.raises(LLTError, match="data.val_per_class"):
        load_config("demo", ["data.val_per_class=-1"])


def test_one_validation_per_epoch_gives_the_best_epochs_row_and_the_decision_reuses_it(tmp_path):
    """The trainer's per-epoch validation returns the per-task row; the best epoch's row equals a fresh
    evaluation of the best state on the same sets (so Bottom-Up decisions need not evaluate again)."""
    from llt.evaluation import accuracy
    from llt.trainer import Schedule, TaskData, Trainer

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (120, 3, 16, 16), dtype=torch.uint8, generator=g)
    labels = torch.arange(4).repeat(30)
    model = build_model(2, 2, width=4, seed=0)
    norm = Normalizer((0.5,) * 3, (0.25,) * 3, "cpu")
    val_sets = [torch.arange(80, 100)[labels[80:100] < 2], torch.arange(100, 120)[labels[100:120] >= 2]]
    new = torch.arange(0, 80)[labels[:80] >= 2]
    data = TaskData(images, labels, new, torch.arange(0, 80)[labels[:80] < 2][:8], torch.cat(val_sets),
                    val_sizes=tuple(s.numel() for s in val_sets))
    trainer = Trainer(model, norm, eval_batch_size=7)
    res = trainer.fit_task(1, data, Schedule(epochs=3, lr=0.05, batch_size=16), make_generator(0, "cpu"))
    assert all(len(h["val_row"]) == 2 and h["steps"] > 0 and h["val_seconds"] >= 0 for h in res.history)
    model.load_state_dict(res.best_state)
    again = accuracy(model, images, labels, val_sets, norm, 64, num_heads=2)
    assert again["row"] == res.best_row and again["overall"] == res.best_val


def test_teaching_query_in_bf16_selects_distinct_pool_images_of_the_configured_number():
    teacher = build_model(3, 2, width=8, seed=0).to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    pool = torch.randint(0, 256, (400, 3, 16, 16), dtype=torch.uint8, generator=g)
    memory = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8, generator=g)
    norm = Normalizer((0.5,) * 3, (0.25,) * 3, "cpu", channels_last=True)
    ts = build_teaching_set(teacher, pool, memory, num_heads=2, k=9, normalizer=norm,
                            generator=make_generator(0, "cpu"), batch_size=64, autocast_dtype=torch.bfloat16)
    picked = ts.pool_idx.tolist()
    assert len(picked) == 12 * 9 == len(set(picked)) and all(0 <= i < 400 for i in picked)
    assert ts.logits_main.dtype == torch.float32 and ts.logits_main.shape == (108, 4)
    assert torch.isfinite(ts.logits_main).all() and torch.isfinite(ts.logits_aux).all()


def test_tune_allocator_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("LLT_NO_MALLOPT", "1")
    assert runtime.tune_allocator() is False
    monkeypatch.delenv("LLT_NO_MALLOPT")
    import platform

    assert runtime.tune_allocator() is (platform.libc_ver()[0] == "glibc")   # skipped quietly without glibc


def test_eval_batch_zero_means_the_measured_default():
    from llt.config import load_config
    from llt.runtime import default_eval_batch

    assert load_config().train.eval_batch_size == 0 and load_config("demo").train.eval_batch_size == 0
    assert default_eval_batch(CPU) == 256 and default_eval_batch(torch.device("cuda")) == 1024


def test_the_projection_shortcut_is_the_strided_1x1_conv_and_trains_channels_last_in_bf16():
    """On channels-last CPU tensors the shortcut convolves every second pixel with stride 1: equal to the
    original's strided 1x1 conv in fp32, and free of oneDNN's heap corruption in the channels-last backward of the strided form (width 8,
    odd batches crashed the process: checked in a child process)."""
    import subprocess
    import sys

    import torch.nn.functional as F

    model = build_model(5, 2, width=8, seed=0)
    block = model.layer2[0]
    x = torch.randn(3, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    w = block.shortcut[0].weight
    assert torch.equal(block.projection(x.contiguous(memory_format=torch.channels_last)), F.conv2d(x, w, stride=2))
    assert torch.equal(block.projection(x), F.conv2d(x, w, stride=2))
    code = ("import torch, torch.nn.functional as F\n"
            "from llt.models import build_model\n"
            "m = build_model(5, 2, width=8, seed=0).to(memory_format=torch.channels_last)\n"
            "for b in (3, 5, 7):\n"
            "    x = torch.randn(b, 3, 32, 32).contiguous(memory_format=torch.channels_last)\n"
            "    for _ in range(3):\n"
            "        with torch.autocast('cpu', dtype=torch.bfloat16):\n"
            "            loss = F.cross_entropy(m(x, 1).float(), torch.zeros(b, dtype=torch.long))\n"
            "        loss.backward()\n"
            "print('ok')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-500:]
