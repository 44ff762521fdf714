"""Class-incremental baselines on the one trainer: each method has the loss terms and batch mix it must
have and only those; EWC's penalty, LwF's and iCaRL's losses and iCaRL's nearest-mean classifier against
hand computations; bad hyper-parameters refused up front; a baseline under a ticket."""

import json

import pytest
import torch
import torch.nn.functional as F

from llt.cli import main
from llt.data.augment import Normalizer
from llt.losses import distillation
from llt.methods.ewc import EWCPenalty
from llt.methods.icarl import class_means, nme_predict
from llt.models import build_model
from llt.pruning import Mask
from llt.storage import load_checkpoint
from llt.trainer import Recipe, Trainer

TINY = ["--set", "model.width=4", "--set", "train.epochs=2", "--set", "train.milestones=[1]",
        "--set", "data.num_tasks=3", "--set", "data.exemplars_per_class=5", "--set", "train.batch_size=32"]


def run(out, method, *extra):
    return main(["run", "--preset", "demo", "--out", str(out), "--quiet", "--set", f"run.method={method}", *TINY, *extra])


def spy_fits(monkeypatch):
    """Record, for every training, what the trainer was given; check that a teacher stays frozen."""
    calls = []
    real = Trainer.fit_task

    def fit_task(self, k, data, s, generator, mask=None, recipe=None, **kw):
        teacher = data.teacher
        before = None if teacher is None else {n: v.clone() for n, v in teacher.state_dict().items()}
        out = real(self, k, data, s, generator, mask=mask, recipe=recipe, **kw)
        calls.append({"k": k, "new": data.new_idx.cpu().clone(), "memory": data.memory_idx.cpu().clone(),
                      "teacher": before, "teacher_frozen": teacher is None or (
                          not teacher.training and not any(p.requires_grad for p in teacher.parameters())
                          and all(torch.equal(v, teacher.state_dict()[n]) for n, v in before.items())),
                      "recipe": recipe, "teaching": data.teaching, "mask": mask})
        return out

    monkeypatch.setattr(Trainer, "fit_task", fit_task)
    return calls


def stream_of(rd):
    return torch.load(rd / "stream.pt", weights_only=True)["state"]


@pytest.mark.parametrize("method", ["finetune", "joint", "replay", "lwf", "ewc", "icarl"])
def test_each_baseline_has_its_terms_and_only_those(tmp_path, monkeypatch, method):
    calls = spy_fits(monkeypatch)
    assert run(tmp_path, method) == 0
    [rd] = list(tmp_path.iterdir())
    summary = json.loads((rd / "summary.json").read_text())
    assert summary["method"] == method and summary["num_tasks"] == 3 and len(calls) == 3
    stream = stream_of(rd)
    train = [stream[f"task{t + 1}.train_idx"] for t in range(3)]
    for t, c in enumerate(calls):
        assert c["k"] == t and c["teaching"] is None and c["mask"] is None and c["teacher_frozen"]
        r = c["recipe"]
        expect_new = torch.cat(train[: t + 1]) if method == "joint" else train[t]
        assert torch.equal(c["new"], expect_new), (method, t)
        if method in ("replay", "icarl") and t > 0:
            assert c["memory"].numel() == 5 * 2 * t                        # every earlier class's exemplars
            assert set(c["memory"].tolist()) <= set(torch.cat(train[:t]).tolist())
        else:
            assert c["memory"].numel() == 0, (method, t)                    # no exemplar seen
        if method in ("lwf", "icarl") and t > 0:                           # the previous model, frozen
            prev, _ = load_checkpoint(rd / f"checkpoints/task{t}.pt")
            assert all(torch.equal(prev[n], v) for n, v in c["teacher"].items())
        else:
            assert c["teacher"] is None, (method, t)
        assert r.loss == ("bce" if method == "icarl" else "ce")
        assert r.distill == (1.0 if method == "lwf" else 0.0)
        assert (r.penalty is not None) == (method == "ewc" and t > 0)
    if method == "ewc":
        fisher, _ = load_checkpoint(rd / "checkpoints/task1-fisher.pt")
        assert all(torch.all(f >= 0) for f in fisher.values()) and any(float(f.sum()) > 0 for f in fisher.values())
    if method == "icarl":
        assert len(summary["network_matrix"]) == 3 and summary["accuracy_matrix"] != summary["network_matrix"]


def test_ewc_penalty_is_zero_at_the_anchor_and_grows_quadratically_away_from_it():
    model = torch.nn.Linear(2, 1, bias=False)
    anchor = {"weight": torch.tensor([[1.0, -2.0]])}
    fisher = {"weight": torch.tensor([[3.0, 0.5]])}
    pen = EWCPenalty(fisher, anchor, lam=10.0)
    with torch.no_grad():
        model.weight.copy_(anchor["weight"])
    assert float(pen(model).detach()) == 0.0
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[2.0, 0.0]]))           # offsets 1 and 2
    assert float(pen(model).detach()) == pytest.approx(0.5 * 10.0 * (3.0 * 1 + 0.5 * 4))       # 25
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 2.0]]))           # offsets doubled
    assert float(pen(model).detach()) == pytest.approx(4 * 25.0)
    pen(model).backward()                                        # gradient lam * F * (theta - anchor)
    assert torch.allclose(model.weight.grad, torch.tensor([[10.0 * 3.0 * 2, 10.0 * 0.5 * 4]]))


def tiny_batch():
    model = build_model(3, 2, width=4, seed=0)
    trainer = Trainer(model, Normalizer((0.5,) * 3, (0.25,) * 3, "cpu"))
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([2, 3, 2, 3, 0, 1])
    old = torch.randn(6, 2, generator=torch.Generator().manual_seed(1))      # teacher logits of task 1's head
    return model, trainer, x, y, old


def test_lwf_loss_is_cross_entropy_plus_the_unscaled_soft_cross_entropy_of_the_old_heads():
    model, trainer, x, y, old = tiny_batch()
    model.eval()     # BatchNorm in eval mode gives the same logits in both computations below
    with torch.no_grad():
        z = model(x, 2, "main")
    soft = -(F.softmax(old / 2, 1) * F.log_softmax(z[:, :2] / 2, 1)).sum(1).mean()
    got = trainer.recipe_loss(1, x, y, old, Recipe(loss="ce", distill=0.7, temperature=2.0)).detach()
    assert float(got) == pytest.approx(float(F.cross_entropy(z, y) + 0.7 * soft), rel=1e-5)
    assert float(soft) == pytest.approx(float(distillation(z[:, :2], old, 2.0)) / 4, rel=1e-5)
    plain = trainer.recipe_loss(1, x, y, old, Recipe()).detach()                      # finetune/replay: CE only
    assert float(plain) == pytest.approx(float(F.cross_entropy(z, y)), rel=1e-5)


def test_icarl_loss_uses_one_hot_targets_for_new_classes_and_the_teachers_sigmoid_for_old_ones():
    model, trainer, x, y, old = tiny_batch()
    model.eval()
    with torch.no_grad():
        z = model(x, 2, "main")
    target = F.one_hot(y, 4).float()
    target[:, :2] = torch.sigmoid(old)
    expect = -(target * F.logsigmoid(z) + (1 - target) * F.logsigmoid(-z)).sum(1).mean()     # sum over classes
    got = trainer.recipe_loss(1, x, y, old, Recipe(loss="bce", temperature=1.0)).detach()
    assert float(got) == pytest.approx(float(expect), rel=1e-5)


def test_icarl_nearest_mean_of_exemplars_matches_a_hand_computation():
    # exemplar features of 3 classes in 2-D; means of the L2-normalised features, normalised again
    feats = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 3.0], [0.0, 1.0], [-1.0, 0.0], [-4.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    means = class_means(feats, labels, 3)
    r = 2 ** -0.5
    m0 = torch.tensor([1 + r, r]) / 2
    assert torch.allclose(means[0], m0 / m0.norm()) and torch.allclose(means[1], torch.tensor([0.0, 1.0]))
    assert torch.allclose(means[2], torch.tensor([-1.0, 0.0]))
    test = torch.tensor([[5.0, 1.0], [0.1, 2.0], [-3.0, -0.5], [1.0, 1.5]])
    # by hand: angle of (1, 1.5) is 56.3 deg, mean 0 at 22.5 deg, mean 1 at 90 deg -> class 1
    assert nme_predict(test, means).tolist() == [0, 1, 2, 1]


@pytest.mark.parametrize("override, message", [
    ("baseline.ewc_lambda=-1", "baseline.ewc_lambda: must be non-negative, got -1"),
    ("baseline.lwf_lambda=-0.5", "baseline.lwf_lambda: must be non-negative"),
    ("baseline.ewc_alpha=1.0", "baseline.ewc_alpha: must be in [0, 1)"),
    ("baseline.lwf_temperature=0", "baseline.lwf_temperature: must be positive"),
])
def test_bad_hyper_parameters_are_refused_up_front(tmp_path, capsys, override, message):
    method = override.split(".")[1].split("_")[0]
    assert run(tmp_path, method, "--set", override) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not list(tmp_path.iterdir())


@pytest.mark.parametrize("method", ["replay", "icarl"])
def test_a_memory_of_zero_is_refused_for_methods_that_replay_it(tmp_path, capsys, method):
    assert run(tmp_path, method, "--set", "data.exemplars_per_class=0") == 2
    err = capsys.readouterr().err
    assert f"run.method={method} replays an exemplar memory: needs at least 1 exemplar per class, got 0" in err
    assert err.count("\n") == 1 and not list(tmp_path.iterdir())


def on_a_ticket(tmp_path, method, *extra):
    """A tiny Top-Down run, then `method` under its tickets (baseline.mask_from): checks that the baseline reports
    the tickets' remaining weights and that its pruned weights stay exactly zero; returns (ticket run, run)."""
    td = tmp_path / "td"
    assert main(["run", "--preset", "demo", "--out", str(td), "--quiet", "--set", "run.method=td", *TINY,
                 "--set", "prune.td_rounds=[1,1,1]", "--set", "prune.finetune_epochs=1"]) == 0
    [src] = list(td.iterdir())
    assert run(tmp_path / "r", method, "--set", f"baseline.mask_from={json.dumps(str(src))}", *extra) == 0
    [rd] = list((tmp_path / "r").iterdir())
    summary = json.loads((rd / "summary.json").read_text())
    assert summary["remaining_weights"] == json.loads((src / "summary.json").read_text())["remaining_weights"]
    net = build_model(3, 2, width=4)
    for t in (1, 2, 3):
        net.load_state_dict(load_checkpoint(rd / f"checkpoints/task{t}.pt")[0])
        assert Mask.load(src / f"masks/task{t}.pt", net).pruned_nonzero(net) == {}
    return src, rd


def test_replay_on_a_ticket(tmp_path, capsys):
    src, rd = on_a_ticket(tmp_path, "replay")
    # mask_from must be a finished ticket run; it applies to baselines only
    assert run(tmp_path / "x", "replay", "--set", f"baseline.mask_from={json.dumps(str(rd))}") == 2
    assert "not a ticket run" in capsys.readouterr().err
    assert run(tmp_path / "y", "cil", "--set", f"baseline.mask_from={json.dumps(str(src))}") == 2
    assert "baseline.mask_from: applies to the baselines" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["derpp", "erace"])
def test_rehearsal_methods_on_a_ticket_with_herding(tmp_path, method):
    """DER++ and ER-ACE under a Top-Down run's tickets, with herded exemplars; DER++ stores the logits of the
    herded exemplars."""
    src, rd = on_a_ticket(tmp_path, method, "--set", "data.exemplar_selection=herding")
    if method == "derpp":
        herded = load_checkpoint(rd / "checkpoints/task3.pt")[1]["herded"]
        stored = load_checkpoint(rd / "checkpoints/task3-der_logits.pt")[0]["idx"]
        assert sorted(stored.tolist()) == sorted(i for v in herded.values() for i in v)


def test_ewc_warns_when_lambda_makes_sgd_diverge(capsys):
    from llt.methods.ewc import check_stability

    fisher = {"w": torch.tensor([0.1, 0.5])}
    # bound 2 (1 + 0.9) / 0.01 = 380: lambda 100 * 0.5 = 50 is fine, 5000 * 0.5 = 2500 is not
    assert check_stability(fisher, 100.0, 0.01, 0.9, 0) and capsys.readouterr().err == ""
    assert not check_stability(fisher, 5000.0, 0.01, 0.9, 0)
    err = capsys.readouterr().err
    assert "ewc after task 1" in err and "2.5e+03 exceeds" in err and "below 760" in err


def test_replay_with_herding_replays_as_many_exemplars_as_with_random_selection(tmp_path, monkeypatch):
    """Issue 18, item 1: the baselines' loop herds after each task, so that replay with
    data.exemplar_selection=herding trains with a memory (it had none)."""
    sizes = {}
    for selection in ("random", "herding"):
        calls = spy_fits(monkeypatch)
        assert run(tmp_path / selection, "replay", "--set", f"data.exemplar_selection={selection}") == 0
        sizes[selection] = [c["memory"].numel() for c in calls]
        monkeypatch.undo()
    assert sizes["herding"] == sizes["random"] == [0, 10, 20]


def test_memoryless_baselines_choose_their_best_epoch_without_old_class_validation_images(tmp_path, monkeypatch):
    """Issue 18, item 5: finetune, LwF and EWC never see an old class's validation image (instrumented at the
    trainer's selection); replay and joint select on every seen class's."""
    from llt.trainer import Trainer

    seen = []
    real = Trainer.validate

    def validate(self, data, num_heads):
        seen.append(data.val_idx.cpu().clone())
        return real(self, data, num_heads)

    monkeypatch.setattr(Trainer, "validate", validate)
    for method in ("finetune", "lwf", "ewc", "replay", "joint"):
        seen.clear()
        assert run(tmp_path / method, method) == 0
        [rd] = list((tmp_path / method).iterdir())
        stream = stream_of(rd)
        val = [set(stream[f"task{t + 1}.val_idx"].tolist()) for t in range(3)]
        per_task = [seen[2 * t: 2 * t + 2] for t in range(3)]          # 2 epochs per task
        for t, used in enumerate(per_task):
            for idx in used:
                ids = set(idx.tolist())
                if method in ("finetune", "lwf", "ewc"):
                    assert ids == val[t], (method, t)                   # the current task's only
                else:
                    assert ids == set().union(*val[: t + 1]), (method, t)


def test_icarl_class_means_average_the_exemplars_and_their_flips():
    """Issue 18, item 6: the class mean is the normalised mean of the normalised features of the exemplars
    and of their horizontal flips (hand computation)."""
    import torch.nn.functional as F

    from llt.data.augment import Normalizer
    from llt.methods.icarl import exemplar_means
    from llt.models import build_model

    model = build_model(2, 2, width=4, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=g)
    labels = torch.tensor([0, 0, 1, 1, 1, 0])
    norm = Normalizer((0.5,) * 3, (0.25,) * 3, "cpu")
    means = exemplar_means(model, images, labels, 2, norm)
    with torch.no_grad():
        for c in range(2):
            x = images[labels == c]
            f = F.normalize(model.features(norm(x)), dim=1)
            f_flip = F.normalize(model.features(norm(x.flip(3))), dim=1)
            expect = F.normalize(torch.cat([f, f_flip]).mean(0), dim=0)
            assert torch.allclose(means[c], expect, atol=1e-6)
            no_flip = F.normalize(f.mean(0), dim=0)
            assert not torch.allclose(means[c], no_flip, atol=1e-4)        # the flips do count


def test_local_cross_entropy_gives_old_class_logits_no_gradient():
    """Issue 18, item 3: with ce_scope=local the cross-entropy covers the current task's classes only, so the
    old heads get exactly zero gradient from it; the global form moves them."""
    from llt.data.augment import Normalizer
    from llt.models import build_model
    from llt.trainer import Recipe, Trainer

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(2, 4, (8,), generator=g)   # task 2's labels
    grads = {}
    for scope, offset in (("local", 2), ("global", 0)):
        model = build_model(3, 2, width=4, seed=0)
        loss = Trainer(model, Normalizer((0.5,) * 3, (0.25,) * 3, "cpu")).recipe_loss(1, x, y, None, Recipe(ce_offset=offset))
        loss.backward()
        grads[scope] = model.heads_main[0].weight.grad
        assert model.heads_main[1].weight.grad.abs().sum() > 0
    assert grads["local"] is None or torch.count_nonzero(grads["local"]) == 0
    assert grads["global"] is not None and torch.count_nonzero(grads["global"]) > 0


def test_ce_scope_defaults_to_local_for_lwf_and_ewc_and_is_refused_where_batches_hold_old_classes(tmp_path, monkeypatch):
    for method, expect in (("lwf", [0, 2, 4]), ("ewc", [0, 2, 4]), ("finetune", [0, 0, 0])):
        calls = spy_fits(monkeypatch)
        assert run(tmp_path / method, method) == 0
        assert [c["recipe"].ce_offset for c in calls] == expect, method
        monkeypatch.undo()
    from llt.config import load_config
    from llt.errors import LLTError

    assert load_config("demo", ["run.method=finetune", "baseline.ce_scope=local"]).baseline.ce_scope == "local"
    for method in ("replay", "icarl", "joint"):
        with pytest.raises(LLTError, match="baseline.ce_scope"):
            load_config("demo", [f"run.method={method}", "baseline.ce_scope=local"])


def budget_of(rd) -> list[dict]:
    return json.loads((rd / "summary.json").read_text())["budget"]


def test_every_method_takes_the_same_sgd_steps_per_epoch_for_one_config(tmp_path):
    """Issue 18, item 2: the lottery loop's budget (one pass over the task's data and the memory, batch_size on task
    1, batch_size // 4 after) is every method's: dense CIL, Top-Down, every baseline but the upper bound (joint:
    tests/test_rehearsal.py) and both replay recipes."""
    steps = {}
    short = ("--set", "train.epochs=1", "--set", "data.num_tasks=2", "--set", "teaching.enabled=false")
    for name, extra in (("cil", ()), ("td", ("--set", "prune.td_rounds=[1,1]", "--set", "prune.finetune_epochs=1")),
                        ("finetune", ()), ("derpp", ()), ("der", ()), ("erace", ()),
                        ("replay-balanced", ("--set", "baseline.replay_batching=balanced")),
                        ("replay-concat", ("--set", "baseline.replay_batching=concat")),
                        ("lwf", ()), ("ewc", ()), ("icarl", ())):
        out = tmp_path / name
        assert run(out, name.split("-")[0], *extra, *short) == 0
        [rd] = list(out.iterdir())
        budget = budget_of(rd)
        steps[name] = [b["steps_per_epoch"] for b in budget]
        if name != "td":                # Top-Down also trains its pruning levels (the same steps per epoch)
            assert [b["trainings"] for b in budget] == [1, 1] and all(b["steps"] == b["steps_per_epoch"] for b in budget)
        stream = stream_of(rd)
    sizes = [stream[f"task{t + 1}.train_idx"].numel() for t in range(2)]
    expect = [-(-sizes[0] // 32), -(-(sizes[1] + 10) // 8)]
    assert all(v == expect for v in steps.values()), (expect, steps)


def test_balanced_replay_puts_a_memory_batch_beside_every_new_batch_and_counts_it(tmp_path, monkeypatch):
    """Issue 18, item 8: with replay_batching=balanced each step of tasks >= 2 holds batch_size // 4 new images
    and beside them memory images (old classes only); concat draws one pass over data + memory per epoch."""
    batches = []
    real = Trainer.recipe_loss

    def recipe_loss(self, k, x, y, old, r):
        batches.append((k, y.clone()))
        return real(self, k, x, y, old, r)

    monkeypatch.setattr(Trainer, "recipe_loss", recipe_loss)
    assert run(tmp_path / "b", "replay", "--set", "baseline.replay_batching=balanced") == 0
    [rd] = list((tmp_path / "b").iterdir())
    budget = budget_of(rd)
    for t in (1, 2):
        ys = [y for k, y in batches if k == t]
        assert len(ys) == budget[t]["steps"] and all(int((y < 2 * t).sum()) == 8 for y in ys)   # 8 memory images
        assert all(0 < int((y >= 2 * t).sum()) <= 8 for y in ys)                                 # beside <= 8 new
        assert budget[t]["memory_images"] == 8 * len(ys)
        assert budget[t]["new_images"] == sum(int((y >= 2 * t).sum()) for y in ys)
    batches.clear()
    assert run(tmp_path / "c", "replay", "--set", "baseline.replay_batching=concat") == 0
    [rd] = list((tmp_path / "c").iterdir())
    for t, b in enumerate(budget_of(rd)):
        assert b["memory_images"] == 10 * t * b["epochs"]      # the memory once per epoch (5 per class)


def test_train_select_last_keeps_the_last_epoch(tmp_path):
    assert run(tmp_path, "finetune", "--set", "train.select=last", "--set", "train.epochs=3") == 0
    [rd] = list(tmp_path.iterdir())
    records = [json.loads(line) for line in (rd / "records.jsonl").read_text().splitlines()]
    tasks = [r for r in records if r.get("event") == "task"]
    assert len(tasks) == 3 and all(r["best_epoch"] == 3 for r in tasks)
    assert all(abs(r["best_val"] - r["epochs"][-1]["val"]) < 1e-4 for r in tasks)     # the kept model is the last epoch's
    from llt.config import load_config
    from llt.errors import LLTError

    with pytest.raises(LLTError, match="train.select: last applies to dense CIL and the baselines"):
        load_config("demo", ["run.method=bu", "train.select=last"])


def per_image_fisher_loop(model, images, labels, heads, norm, names, predicted=False):
    """The definition, one image at a time with autograd."""
    model.eval()
    params = dict(model.named_parameters())
    out = {n: torch.zeros_like(params[n]) for n in names}
    for i in range(images.shape[0]):
        model.zero_grad(set_to_none=True)
        z = model(norm(images[i:i + 1]), heads, "main")
        F.cross_entropy(z, z.argmax(1) if predicted else labels[i:i + 1]).backward()
        for n in names:
            out[n] += params[n].grad ** 2
    return {n: v / images.shape[0] for n, v in out.items()}


def test_ewc_fisher_is_the_mean_of_per_image_squared_gradients_whatever_the_batch():
    """Issue 18, item 4: equal to a per-image loop to 1e-5 relative, and the same computed 1, 32 or 256 images at
    a time (of 260); backbone only by default; with the true labels or the model's predictions (FACIL's
    max_pred). (tests: the EWC run's Fisher, recomputed below, covers a bf16 channels-last model.)"""
    from llt.methods.ewc import empirical_fisher, penalised_names

    model = build_model(2, 2, width=4, seed=0)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (260, 3, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 4, (260,), generator=g)
    norm = Normalizer((0.5,) * 3, (0.25,) * 3, "cpu")
    names = penalised_names(model, heads=False)
    assert names and not any(n.startswith("heads_") for n in names)
    assert set(penalised_names(model, heads=True)) - set(names) == {n for n, _ in model.named_parameters()
                                                                     if n.startswith("heads_")}
    per_image_bytes = 4 * sum(p.numel() for n, p in model.named_parameters() if n in names)
    for predicted in (False, True):
        expect = per_image_fisher_loop(model, images, labels, 2, norm, names, predicted)
        for batch in (1, 32, 256):
            got = empirical_fisher(model, images, labels, 2, norm, names, chunk_bytes=batch * per_image_bytes,
                                   predicted=predicted)
            assert set(got) == set(names)
            for n in names:
                scale = float(expect[n].abs().max()) or 1.0
                assert float((got[n] - expect[n]).abs().max()) <= 1e-5 * scale, (predicted, batch, n)
        assert any(float(v.sum()) > 0 for v in expect.values())


def test_ewc_accumulates_its_fisher_as_facil_from_zero(tmp_path):
    """F after task 1 = (1 - alpha) F_1, after task 2 = alpha F + (1 - alpha) F_2 (FACIL); the anchor and the
    Fisher cover the backbone only."""
    assert run(tmp_path, "ewc", "--set", "baseline.ewc_alpha=0.25") == 0
    [rd] = list(tmp_path.iterdir())
    f1, _ = load_checkpoint(rd / "checkpoints/task1-fisher.pt")
    f2, _ = load_checkpoint(rd / "checkpoints/task2-fisher.pt")
    anchor, _ = load_checkpoint(rd / "checkpoints/task1-anchor.pt")
    assert set(f1) == set(anchor) and not any(n.startswith("heads_") for n in f1)
    from llt.context import load_model_state, open_run, prepare
    from llt.methods.ewc import empirical_fisher

    cfg, rdir = open_run(str(rd))
    ctx = prepare(cfg, None, rd=rdir, need_pool=False)
    model = ctx.new_model()
    for t, fisher in ((1, f1), (2, f2)):
        load_model_state(model, load_checkpoint(rd / f"checkpoints/task{t}.pt")[0], f"task {t}")
        idx = ctx.stream.tasks[t - 1].train_idx
        ft = empirical_fisher(model, ctx.train_images[idx], ctx.train_labels[idx], t, ctx.normalizer, list(f1),
                              predicted=True)                      # baseline.ewc_labels=predicted, the default
        for n in f1:
            expect = 0.75 * ft[n] + (0.25 * f1[n] if t == 2 else 0)
            assert torch.allclose(fisher[n], expect, rtol=1e-4, atol=1e-7), (t, n)
