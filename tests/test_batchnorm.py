"""How the fused step normalises (train.batchnorm, bn_running, bn_recalibrate), the refusal of empty
sub-batches, and a 10-task stream at the smallest accepted batch (issue 26)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import make_cifar100_folder, trust_generated
from test_trainer import buffers, grads, make, rel_err, step_inputs

from llt.cli import main
from llt.config import batchnorm_setup, load_config
from llt.data.augment import Normalizer
from llt.errors import LLTError
from llt.losses import balanced_sizes, distillation
from llt.models.preact_resnet import SegmentBatchNorm2d
from llt.subbatches import empty_sub_batch
from llt.trainer import TaskData, Trainer, bn_segments


def test_segments_of_each_mode():
    sizes = (8, 2, 6, 8)                 # random, new, old, unlabeled
    assert bn_segments("original", "original", sizes) == ((8, 1), (2, 1), (6, 1), (8, 2))
    assert bn_segments("balanced", "labelled", sizes) == ((8, 1), (8, 1), (8, 0))
    assert bn_segments("balanced", "original", sizes) == ((8, 1), (8, 2), (8, 2))
    assert bn_segments("labelled", "once", sizes) == ((16, 1), (8, 1))
    assert bn_segments("joint", "once", sizes) == ((24, 1),)
    assert bn_segments("balanced", "labelled", (8, 2, 0, 0)) == ((8, 1), (2, 1))     # no memory, no pool


def test_joined_segment_statistics_equal_a_hand_computation():
    """A segment is normalised with the biased statistics of exactly its images, and the running statistics
    move by momentum towards their unbiased variance, once per update; a segment with 0 updates moves nothing."""
    torch.manual_seed(0)
    bn = SegmentBatchNorm2d(3).train()
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(10, 3, 4, 4) * 2 + 1
    out = bn(x, segments=((4, 1), (6, 0)))     # [random] [new + old, as the balanced mode joins them]
    for lo, hi in ((0, 4), (4, 10)):
        part = x[lo:hi]
        mean = part.mean(dim=(0, 2, 3), keepdim=True)
        var = part.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        expect = (part - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
        assert torch.allclose(out[lo:hi], expect, atol=1e-5)
    first = x[:4]
    assert torch.allclose(bn.running_mean, 0.1 * first.mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.allclose(bn.running_var, 0.9 + 0.1 * first.var(dim=(0, 2, 3), unbiased=True), atol=1e-6)
    assert int(bn.num_batches_tracked) == 1


def test_balanced_mode_step_equals_passes_over_the_joined_balanced_batch():
    """batchnorm=balanced with bn_running=labelled: loss, gradients and running statistics equal separate
    train-mode passes over [random], [new + old] (one batch) and the unlabeled images, the last one leaving
    the running statistics as they were."""
    k = 2
    ref = make(k_tasks=4)
    fused = copy.deepcopy(ref)
    n_new, n_old, xr, yr, xn, yn, xo, yo, xu, t_main, t_aux, coefs = step_inputs(k)

    z_r = ref(xr, k + 1, "aux")
    z_b = ref(torch.cat([xn, xo]), k + 1, "main")
    kept = buffers(ref)
    momenta = {m: m.momentum for m in ref.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    for m in momenta:
        m.momentum = 0.0           # the pool's pass normalises with its own statistics and updates nothing
    f_u = ref.features(xu)
    for m, mom in momenta.items():
        m.momentum = mom
    u_r, u_m = ref.head_logits(f_u, k, "aux"), ref.head_logits(f_u, k, "main")
    loss_ref = (F.cross_entropy(z_r, yr) + distillation(u_r, t_aux)) + 0.5 * (
        coefs[0] * F.cross_entropy(z_b[:n_new], yn) + coefs[1] * F.cross_entropy(z_b[n_new:], yo)
        + distillation(u_m, t_main))
    loss_ref.backward()

    sizes = (16, n_new, n_old, 16)
    trainer = Trainer(fused, Normalizer((0.5,) * 3, (0.25,) * 3, "cpu"))
    loss = trainer.distill_loss(k, torch.cat([xr, xn, xo, xu]), sizes, yr, yn, yo, t_main, t_aux, coefs, 2.0,
                                bn_segments("balanced", "labelled", sizes))
    loss.backward()
    assert abs(loss.item() - loss_ref.item()) / abs(loss_ref.item()) < 1e-5
    g_ref, g_fused = grads(ref), grads(fused)
    assert g_ref.keys() == g_fused.keys()
    for name in g_ref:
        assert rel_err(g_fused[name], g_ref[name]) < 1e-5, name
    b_ref, b_fused = buffers(ref), buffers(fused)
    for name in b_ref:
        if name.endswith("num_batches_tracked"):
            assert int(b_fused[name]) == int(kept[name]), name     # two updates: random, balanced
        else:
            assert rel_err(b_fused[name], kept[name]) < 1e-5, name


def test_original_mode_resolves_to_the_original_numerics():
    # tests/test_trainer.py::test_fused_distillation_step_equals_five_passes runs the segments this resolves to
    assert batchnorm_setup(load_config("demo", ["train.batchnorm=original"]).train) == ("original", "original", False)


def test_the_paper_presets_and_the_demo_use_the_measured_default():
    for preset in ("demo", "paper-cifar10-cil", "paper-cifar10-td", "paper-cifar10-bu", "paper-cifar100-bu"):
        t = load_config(preset).train
        assert batchnorm_setup(t) == ("balanced", "labelled", False), preset


def test_recalibration_sets_the_running_statistics_of_clean_seen_images():
    model = make(0)
    norm = Normalizer((0.5,) * 3, (0.25,) * 3, "cpu")
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8, generator=g)
    data = TaskData(images=images, labels=torch.zeros(40, dtype=torch.int64), new_idx=torch.arange(0, 30),
                    memory_idx=torch.arange(30, 36), val_idx=torch.arange(36, 40))
    trainer = Trainer(model, norm, eval_batch_size=256)        # one batch: the exact statistics
    tracked = int(model.layer1[0].bn1.num_batches_tracked)
    trainer.recalibrate(data, 1)
    with torch.no_grad():
        h = model.conv1(norm(images[:36]))                    # the input of the first BatchNorm
    bn = model.layer1[0].bn1
    assert torch.allclose(bn.running_mean, h.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, h.var(dim=(0, 2, 3), unbiased=True), atol=1e-4)
    assert bn.momentum == 0.1 and int(bn.num_batches_tracked) == tracked and model.training


@pytest.mark.parametrize("batch, tasks, memory, expect", [
    (32, 10, True, "at task 9 of 10"), (8, 5, True, "at task 3 of 5"), (4, 2, True, "at task 2 of 2"),
    (40, 10, True, None), (20, 5, True, None), (4, 1, True, None)])
def test_empty_sub_batches_are_found(batch, tasks, memory, expect):
    why = empty_sub_batch(batch, tasks, memory)
    if expect is None:
        assert why is None
        for k in range(1, tasks):
            n_new, n_old = balanced_sizes(batch // 4, k)
            assert n_new >= 1 and n_old >= 1
    else:
        assert expect in why and f"smallest train.batch_size for {tasks} tasks is {4 * max(tasks, 2)}" in why


def test_cifar100_ten_tasks_at_batch_32_is_refused_up_front_in_one_line(tmp_path, capsys):
    with pytest.raises(LLTError, match=r"at task 9 of 10 .* 0 new and 7 old .*smallest train.batch_size for 10 tasks is 40"):
        load_config("paper-cifar100-bu", ["train.batch_size=32"])
    assert main(["run", "--preset", "paper-cifar100-bu", "--set", "train.batch_size=32", "--out", str(tmp_path / "runs"),
                 "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "task 9" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())   # nothing was created


def test_ten_task_cifar100_stream_at_the_smallest_accepted_batch_has_no_nan(tmp_path, monkeypatch, capsys):
    import json

    folder = make_cifar100_folder(tmp_path / "data", n_train=1000, n_test=200)
    trust_generated(monkeypatch, folder, name="cifar100")
    args = ["run", "--preset", "paper-cifar100-bu", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "runs"),
            "--quiet", "--set", "run.method=cil", "--set", "model.width=2", "--set", "train.epochs=1",
            "--set", "train.milestones=[1]", "--set", "train.batch_size=40", "--set", "data.exemplars_per_class=2",
            "--set", "teaching.enabled=false", "--set", "run.checkpoint_every=0"]
    assert main(args) == 0, capsys.readouterr().err
    [summary] = list((tmp_path / "runs").glob("*/summary.json"))
    s = json.loads(summary.read_text())
    assert s["num_tasks"] == 10 and all(v == v for row in s["accuracy_matrix"] for v in row)
    records = [json.loads(line) for line in open(summary.parent / "records.jsonl")]
    losses = [e["loss"] for r in records if r.get("event") == "task" for e in r["epochs"]]
    assert len(losses) == 10 and all(torch.isfinite(torch.tensor(losses)))
    assert len(s["learning_accuracy"]) == 10


def test_a_run_written_before_train_batchnorm_existed_continues_with_the_original_numerics(tmp_path):
    """`llt resume` and `llt retrain` read a run's config from its manifest: one without train.batchnorm was
    trained with the original's BatchNorm, and must go on with it, not with today's default."""
    import json

    from llt.config import RunConfig, to_tree
    from llt.context import open_run

    tree = to_tree(RunConfig())
    for key in ("batchnorm", "bn_running", "bn_recalibrate"):
        del tree["train"][key]
    (tmp_path / "manifest.json").write_text(json.dumps({"config": tree}))
    cfg, _ = open_run(str(tmp_path))
    assert batchnorm_setup(cfg.train) == ("original", "original", False)
    tree["run"]["method"] = "replay"                         # a baseline never used it: the default, accepted
    (tmp_path / "manifest.json").write_text(json.dumps({"config": tree}))
    cfg, _ = open_run(str(tmp_path))
    assert cfg.train.batchnorm == "balanced"
    from llt.config import validate

    validate(cfg)
    tree["run"]["method"] = "bu"
    tree["train"]["batchnorm"] = "balanced"                  # a run of this version keeps its own setting
    (tmp_path / "manifest.json").write_text(json.dumps({"config": tree}))
    assert batchnorm_setup(open_run(str(tmp_path))[0].train) == ("balanced", "labelled", False)


def test_with_recalibration_the_kept_state_holds_the_recalibrated_statistics():
    from test_trainer import tiny_task_data

    from llt.data.augment import make_generator
    from llt.trainer import Schedule

    model = make(0)
    trainer = Trainer(model, Normalizer((0.5,) * 3, (0.25,) * 3, "cpu"))
    data = tiny_task_data(1)
    res = trainer.fit_task(1, data, Schedule(epochs=2, lr=0.05, batch_size=16, select="last", bn_recalibrate=True),
                           make_generator(0, "cpu"))
    model.load_state_dict(res.last_state)
    trainer.recalibrate(data, 1)                     # the same weights, images and order: the same statistics
    for name, b in model.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            assert torch.allclose(b, res.last_state[name], atol=1e-6), name
    without = Trainer(make(0), Normalizer((0.5,) * 3, (0.25,) * 3, "cpu")).fit_task(
        1, data, Schedule(epochs=2, lr=0.05, batch_size=16, select="last"), make_generator(0, "cpu"))
    name = "layer1.0.bn1.running_mean"
    assert not torch.allclose(without.last_state[name], res.last_state[name])   # it did change something


@pytest.mark.parametrize("override, expect", [([], ("balanced", "labelled", False)),
                                               (["train.batchnorm=original"], ("original", "original", False)),
                                               (["train.batchnorm=joint", "train.bn_recalibrate=true"],
                                                ("joint", "once", True))])
def test_every_training_of_a_run_gets_the_configured_batchnorm(tmp_path, monkeypatch, override, expect):
    seen = []
    real = Trainer.fit_task

    def spy(self, k, data, s, *a, **kw):
        seen.append((s.batchnorm, s.bn_running, s.bn_recalibrate))
        return real(self, k, data, s, *a, **kw)

    monkeypatch.setattr(Trainer, "fit_task", spy)
    args = ["run", "--preset", "demo", "--out", str(tmp_path), "--quiet", "--set", "run.method=cil",
            "--set", "model.width=2", "--set", "train.epochs=1", "--set", "train.milestones=[1]",
            "--set", "data.num_tasks=2", "--set", "run.checkpoint_every=0"]
    assert main(args + sum((["--set", o] for o in override), [])) == 0
    assert seen == [expect, expect]


def test_joint_with_labelled_running_statistics_is_refused_only_when_the_pool_is_in_the_batch():
    with pytest.raises(LLTError, match="train.bn_running: labelled updates no group that holds pool images"):
        load_config("demo", ["train.batchnorm=joint", "train.bn_running=labelled"])
    load_config("demo", ["train.batchnorm=joint", "train.bn_running=labelled", "teaching.enabled=false"])
