"""The fused training step equals the original's separate forward passes; loss terms; batch sources."""

import copy

import pytest
import torch
import torch.nn.functional as F

from llt.data.augment import Normalizer, make_generator
from llt.losses import balanced_coefficients, balanced_sizes, distillation
from llt.models import build_model
from llt.pruning import Mask
from llt.config import batchnorm_setup, load_config
from llt.trainer import Cycler, NonFiniteLoss, Schedule, TaskData, Trainer, bn_segments


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def make(seed=0, k_tasks=3):
    torch.manual_seed(seed)
    model = build_model(k_tasks, 2, width=4, seed=seed)
    # non-trivial BatchNorm state, so that running-statistics updates are visible
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model


def five_pass_loss(model, k, xr, yr, xn, yn, xo, yo, xu, t_main, t_aux, coefs, T=2.0):
    """The original train_KD step: five separate train-mode forward passes."""
    z_r = model(xr, k + 1, "aux")
    z_bn = model(xn, k + 1, "main")
    z_bo = model(xo, k + 1, "main")
    u_r = model(xu, k, "aux")
    u_m = model(xu, k, "main")
    l_rand = F.cross_entropy(z_r, yr)
    l_bal = coefs[0] * F.cross_entropy(z_bn, yn) + coefs[1] * F.cross_entropy(z_bo, yo)
    return (l_rand + distillation(u_r, t_aux, T)) + 0.5 * (l_bal + distillation(u_m, t_main, T))


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def buffers(model):
    return {n: b.clone() for n, b in model.named_buffers()}


def step_inputs(k: int, seed: int = 1):
    """Random sub-batches of a step of task k+1 (b = 16): n_new, n_old, x and y of random, new and old, the
    unlabeled images, the teacher's logits (main, aux) and the balanced coefficients."""
    g = torch.Generator().manual_seed(seed)
    n_new, n_old = balanced_sizes(16, k)
    xr, xn, xo, xu = (torch.randn(n, 3, 16, 16, generator=g) for n in (16, n_new, n_old, 16))
    yr = torch.randint(0, 2 * (k + 1), (16,), generator=g)
    yn = torch.randint(2 * k, 2 * (k + 1), (n_new,), generator=g)
    yo = torch.randint(0, 2 * k, (n_old,), generator=g)
    t_main, t_aux = torch.randn(16, 2 * k, generator=g), torch.randn(16, 2 * k, generator=g)
    return n_new, n_old, xr, yr, xn, yn, xo, yo, xu, t_main, t_aux, balanced_coefficients(16, k)


def test_fused_distillation_step_equals_five_passes():
    k = 2
    ref = make(k_tasks=4)
    fused = copy.deepcopy(ref)
    n_new, n_old, xr, yr, xn, yn, xo, yo, xu, t_main, t_aux, coefs = step_inputs(k)

    loss_ref = five_pass_loss(ref, k, xr, yr, xn, yn, xo, yo, xu, t_main, t_aux, coefs)
    loss_ref.backward()

    trainer = Trainer(fused, Normalizer((0.5,) * 3, (0.25,) * 3, "cpu"))
    sizes = (16, n_new, n_old, 16)
    # the segments fit_task passes under train.batchnorm=original (bn_running auto -> original)
    loss = trainer.distill_loss(k, torch.cat([xr, xn, xo, xu]), sizes, yr, yn, yo, t_main, t_aux, coefs, 2.0,
                                bn_segments(*batchnorm_setup(load_config("demo", ["train.batchnorm=original"]).train)[:2],
                                            sizes))
    loss.backward()

    assert abs(loss.item() - loss_ref.item()) / abs(loss_ref.item()) < 1e-5
    g_ref, g_fused = grads(ref), grads(fused)
    assert g_ref.keys() == g_fused.keys()
    assert "heads_main.2.weight" in g_ref and "heads_main.3.weight" not in g_ref    # future heads get no grad
    for name in g_ref:
        assert rel_err(g_fused[name], g_ref[name]) < 1e-5, name
    b_ref, b_fused = buffers(ref), buffers(fused)
    for name in b_ref:
        if name.endswith("num_batches_tracked"):
            assert int(b_fused[name]) == int(b_ref[name]) == 5, name
        else:
            assert rel_err(b_fused[name], b_ref[name]) < 1e-5, name


def test_fused_first_task_step_equals_two_passes():
    ref = make(3, k_tasks=2)
    fused = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(24, 3, 16, 16, generator=g), torch.randint(0, 2, (24,), generator=g)
    loss_ref = F.cross_entropy(ref(x, 1, "main"), y) + F.cross_entropy(ref(x, 1, "aux"), y)
    loss_ref.backward()
    loss = Trainer(fused, Normalizer((0.5,) * 3, (0.25,) * 3, "cpu")).first_task_loss(x, y)
    loss.backward()
    assert abs(loss.item() - loss_ref.item()) / loss_ref.item() < 1e-5
    g_ref, g_fused = grads(ref), grads(fused)
    assert g_ref.keys() == g_fused.keys() and "heads_main.1.weight" not in g_ref   # task 2's heads get no grad
    for name in g_ref:
        assert rel_err(g_fused[name], g_ref[name]) < 1e-5, name
    for name, b in buffers(ref).items():
        if not name.endswith("num_batches_tracked"):
            assert rel_err(buffers(fused)[name], b) < 1e-5, name


def test_distillation_loss_formula_and_gradient():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=g, requires_grad=True), torch.randn(5, 4, generator=g)
    T = 2.0
    expect = -(F.softmax(t / T, 1) * F.log_softmax(s / T, 1)).sum(1).mean() * T * T
    assert torch.allclose(distillation(s, t, T), expect)
    distillation(s, t, T).backward()
    s2 = s.detach().clone().requires_grad_(True)
    (F.kl_div(F.log_softmax(s2 / T, 1), F.softmax(t / T, 1), reduction="batchmean") * T * T).backward()
    assert torch.allclose(s.grad, s2.grad, atol=1e-6)   # same gradient as KL divergence


def test_balanced_sizes_and_coefficients_follow_the_original():
    assert balanced_sizes(64, 1) == (32, 32) and balanced_coefficients(64, 1) == (0.5, 0.5)
    assert balanced_sizes(64, 4) == (12, 51) and balanced_coefficients(64, 4) == (0.1875, 0.796875)


def test_cycler_restarts_and_reshuffles_like_a_dataloader():
    c = Cycler(torch.arange(10), 4, make_generator(0, "cpu"))
    batches = [c.next() for _ in range(6)]
    assert [b.numel() for b in batches] == [4, 4, 2, 4, 4, 2]
    assert sorted(torch.cat(batches[:3]).tolist()) == list(range(10))
    assert sorted(torch.cat(batches[3:]).tolist()) == list(range(10))
    assert not torch.equal(torch.cat(batches[:3]), torch.cat(batches[3:]))


def tiny_task_data(k, n_per_class=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(2 * (k + 1)).repeat_interleave(n_per_class)
    images = torch.randint(0, 256, (labels.numel(), 3, 16, 16), dtype=torch.uint8, generator=g)
    new = torch.nonzero(labels >= 2 * k).flatten()
    memory = torch.nonzero(labels < 2 * k).flatten()[::3]
    return TaskData(images=images, labels=labels, new_idx=new, memory_idx=memory, val_idx=new[:4])


def test_fit_task_keeps_the_best_validation_epoch_and_reports_history():
    model = make(0)
    trainer = Trainer(model, Normalizer((0.5,) * 3, (0.25,) * 3, "cpu"))
    res = trainer.fit_task(0, tiny_task_data(0), Schedule(epochs=3, lr=0.05, milestones=(2,), batch_size=8),
                           make_generator(0, "cpu"))
    assert [h["epoch"] for h in res.history] == [1, 2, 3]
    assert res.best_val == max(h["val"] for h in res.history)
    assert res.history[res.best_epoch - 1]["val"] == res.best_val
    assert res.history[2]["lr"] == pytest.approx(0.005)          # milestone 2, gamma 0.1
    if res.best_epoch != 3:   # the returned best state is that epoch's, not the last one
        assert any(not torch.equal(a, res.last_state[n]) for n, a in res.best_state.items())


def test_mask_keeps_pruned_weights_at_zero():
    model = make(0)
    mask = Mask({**Mask.ones(model).masks,
                 "layer1.0.conv1.weight": torch.rand(model.layer1[0].conv1.weight.shape) > 0.5})
    trainer = Trainer(model, Normalizer((0.5,) * 3, (0.25,) * 3, "cpu"))
    before = model.layer1[0].conv1.weight.detach().clone()
    trainer.fit_task(0, tiny_task_data(0), Schedule(epochs=2, lr=0.1, batch_size=8), make_generator(0, "cpu"),
                     mask=mask)
    w = model.layer1[0].conv1.weight.detach()
    assert torch.all(w[~mask["layer1.0.conv1.weight"]] == 0)
    assert not torch.equal(w[mask["layer1.0.conv1.weight"]], before[mask["layer1.0.conv1.weight"]])


def test_non_finite_loss_names_task_and_epoch(monkeypatch):
    real = Trainer.first_task_loss
    monkeypatch.setattr(Trainer, "first_task_loss", lambda self, x, y, *a: real(self, x, y, *a) * float("nan"))
    model = make(0)
    trainer = Trainer(model, Normalizer((0.5,) * 3, (0.25,) * 3, "cpu"))
    with pytest.raises(NonFiniteLoss, match="the loss became nan in task 1, epoch 1"):
        trainer.fit_task(0, tiny_task_data(0), Schedule(epochs=2, lr=0.1, batch_size=8), make_generator(0, "cpu"))


def test_distillation_epoch_runs_with_and_without_teaching():
    from llt.teaching import TeachingSet

    data = tiny_task_data(1)
    g = torch.Generator().manual_seed(0)
    teach = TeachingSet(torch.randint(0, 256, (20, 3, 16, 16), dtype=torch.uint8, generator=g),
                        torch.randn(20, 2, generator=g), torch.randn(20, 2, generator=g), torch.arange(20))
    for teaching in (teach, None):
        model = make(0)
        data.teaching = teaching
        res = Trainer(model, Normalizer((0.5,) * 3, (0.25,) * 3, "cpu")).fit_task(
            1, data, Schedule(epochs=1, lr=0.01, batch_size=16), make_generator(0, "cpu"))
        assert res.history[0]["loss"] > 0
