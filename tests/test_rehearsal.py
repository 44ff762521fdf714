"""DER++, DER, ER-ACE and joint as the upper bound: each loss against a hand computation, DER's stored logits
kept from storage time, DER++ with alpha = beta = 0 as fine-tuning, ER-ACE's new-batch cross-entropy leaving
the old classes' logits alone, joint visiting every seen image once per epoch, the config rules."""

import json

import pytest
import torch
import torch.nn.functional as F

from llt.cli import main
from llt.config import load_config
from llt.data.augment import Normalizer
from llt.errors import LLTError
from llt.methods.derpp import DERpp, StoredLogits, logit_mse
from llt.methods.erace import ace_loss
from llt.models import build_model
from llt.storage import load_checkpoint
from llt.trainer import Recipe, Schedule, Step, TaskData, Trainer

TINY = ["--set", "model.width=4", "--set", "train.epochs=2", "--set", "train.milestones=[1]",
        "--set", "data.num_tasks=3", "--set", "data.exemplars_per_class=5", "--set", "train.batch_size=32"]


def run(out, method, *extra):
    return main(["run", "--preset", "demo", "--out", str(out), "--quiet", "--set", f"run.method={method}", *TINY, *extra])


def der(alpha, beta, scope="seen", num_images=100):
    """A DERpp whose loss can be called without a run."""
    m = DERpp.__new__(DERpp)
    m.alpha, m.beta, m.scope = alpha, beta, scope
    m.stored = StoredLogits(num_images, "cpu")
    return m


def test_derpp_loss_equals_a_hand_computation_with_seen_and_all_logits():
    torch.manual_seed(0)
    cpt, k = 2, 2                                     # task 3 of 3, 2 classes per task
    sizes = (3, 2, 2)                                 # new batch, logit batch, labelled batch
    z = torch.randn(sum(sizes), 6)
    y = torch.tensor([4, 5, 4, 0, 3, 1, 2])
    idx = torch.tensor([50, 51, 52, 10, 30, 11, 31])
    m = der(0.3, 0.7)
    stored_10, stored_30 = torch.randn(6), torch.randn(6)
    m.stored.add(torch.tensor([10]), stored_10[None], width=2)    # stored after task 1: 2 classes existed
    m.stored.add(torch.tensor([30]), stored_30[None], width=4)    # after task 2: 4
    step = Step(k, z, y, idx, sizes, None, cpt)
    mse_seen = (((z[3, :2] - stored_10[:2]) ** 2).sum() + ((z[4, :4] - stored_30[:4]) ** 2).sum()) / (2 + 4)
    expect = F.cross_entropy(z[:3], y[:3]) + 0.3 * mse_seen + 0.7 * F.cross_entropy(z[5:], y[5:])
    assert torch.allclose(m.loss(step), expect)
    m.scope = "all"                                   # every head of the stored logits
    mse_all = ((z[3:5] - torch.stack([stored_10, stored_30])) ** 2).mean()
    assert torch.allclose(m.loss(step), F.cross_entropy(z[:3], y[:3]) + 0.3 * mse_all
                          + 0.7 * F.cross_entropy(z[5:], y[5:]))
    # DER (beta = 0) draws one memory batch: the logit batch
    m0 = der(0.3, 0.0)
    m0.stored = m.stored
    m0.scope = "seen"
    step1 = Step(k, z[:5], y[:5], idx[:5], (3, 2), None, cpt)
    assert torch.allclose(m0.loss(step1), F.cross_entropy(z[:3], y[:3]) + 0.3 * mse_seen)
    assert torch.allclose(logit_mse(z[3:5], torch.stack([stored_10, stored_30]), torch.tensor([6, 6]), "seen"), mse_all)


def test_stored_logits_are_never_rewritten():
    s = StoredLogits(10, "cpu")
    s.add(torch.tensor([1, 2]), torch.ones(2, 4), width=2)
    s.add(torch.tensor([2, 3]), torch.full((2, 4), 5.0), width=4)    # 2 is stored already: kept as it was
    logits, width = s.targets(torch.tensor([1, 2, 3]))
    assert torch.equal(logits, torch.tensor([[1.0] * 4, [1.0] * 4, [5.0] * 4])) and width.tolist() == [2, 2, 4]
    t = StoredLogits(10, "cpu")
    t.load(s.state())
    assert torch.equal(t.targets(torch.tensor([3, 1]))[0], s.targets(torch.tensor([3, 1]))[0])
    with pytest.raises(RuntimeError, match="no stored logits"):
        s.targets(torch.tensor([7]))


def test_a_derpp_run_keeps_the_logits_of_each_exemplar_from_when_it_was_stored(tmp_path):
    assert run(tmp_path, "derpp", "--set", "train.precision=fp32") == 0
    [rd] = list(tmp_path.iterdir())
    tables = [load_checkpoint(rd / f"checkpoints/task{t}-der_logits.pt")[0] for t in (1, 2, 3)]
    assert [int(x["idx"].numel()) for x in tables] == [10, 20, 30]            # 5 exemplars x 2 classes per task
    assert tables[0]["width"].unique().tolist() == [2] and tables[2]["width"].tolist()[-10:] == [6] * 10
    for later in tables[1:]:                     # task 1's exemplars keep the logits of task 1's model
        assert torch.equal(later["idx"][:10], tables[0]["idx"]) and torch.equal(later["logits"][:10], tables[0]["logits"])
    # ... which are task 1's kept model's logits on the clean exemplar images
    from llt.context import open_run, prepare
    cfg, rdir = open_run(str(rd))
    ctx = prepare(cfg, None, rd=rdir, need_pool=False)
    model = ctx.new_model()
    model.load_state_dict(load_checkpoint(rd / "checkpoints/task1.pt")[0])
    model.eval()
    with torch.no_grad():
        z = model(ctx.normalizer(ctx.train_images[tables[0]["idx"]]), model.num_tasks, "main")
    assert torch.allclose(z, tables[0]["logits"], atol=1e-5)
    summary = json.loads((rd / "summary.json").read_text())
    assert summary["method"] == "derpp" and len(summary["accuracy_matrix"]) == 3


def toy_data(n=48, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % classes
    return images, labels


def fit(recipe, memory_idx, seed=0):
    torch.manual_seed(0)
    model = build_model(2, 2, width=4)
    images, labels = toy_data()
    trainer = Trainer(model, Normalizer((0.5,) * 3, (0.25,) * 3, "cpu"))
    new = torch.nonzero(labels >= 2).flatten()
    data = TaskData(images=images, labels=labels, new_idx=new, memory_idx=memory_idx, val_idx=new[:4],
                    steps_per_epoch=5, first_label=2)
    res = trainer.fit_task(1, data, Schedule(epochs=2, lr=0.05, batch_size=16, select="last"),
                           torch.Generator().manual_seed(seed), recipe=recipe)
    return res.last_state


def derpp_recipe(scope: str, alpha: float, beta: float, t: int = 1) -> Recipe:
    """DERpp(eng).recipe(t) for a config with these settings (the method class builds it, as in a run)."""
    from types import SimpleNamespace

    cfg = load_config("demo", ["run.method=derpp", f"baseline.der_logits={scope}", f"baseline.der_alpha={alpha}",
                               f"baseline.der_beta={beta}"])
    images, _ = toy_data()
    eng = SimpleNamespace(cfg=cfg, model=build_model(2, 2, width=4),
                          ctx=SimpleNamespace(train_images=images, device=torch.device("cpu")))
    return DERpp(eng).recipe(t)


@pytest.mark.parametrize("scope", ["seen", "all"])
def test_derpp_with_alpha_and_beta_zero_takes_the_same_steps_as_finetuning(scope):
    images, labels = toy_data()
    memory = torch.nonzero(labels < 2).flatten()[:6]
    derpp = derpp_recipe(scope, 0.0, 0.0)
    assert derpp.memory_batches == 0 and derpp.heads == (2 if scope == "all" else 0)
    assert derpp_recipe(scope, 0.2, 0.5).memory_batches == 2 and derpp_recipe(scope, 0.2, 0.0).memory_batches == 1
    plain = fit(Recipe(batching="balanced"), torch.empty(0, dtype=torch.int64))      # fine-tuning: no memory
    mine = fit(derpp, memory)
    assert all(torch.equal(plain[k], mine[k]) for k in plain)
    other = fit(Recipe(loss_fn=der(0.5, 0.0).loss, memory_batches=1, batching="balanced"), torch.empty(0, dtype=torch.int64))
    assert all(torch.equal(plain[k], other[k]) for k in plain)          # no memory yet: the terms are inactive


def test_erace_new_batch_cross_entropy_gives_old_class_logits_no_gradient():
    torch.manual_seed(0)
    z = torch.randn(7, 6, requires_grad=True)            # task 3: classes 0-3 old, 4-5 new
    y = torch.tensor([4, 5, 4, 5, 0, 3, 5])
    loss = ace_loss(Step(2, z, y, torch.arange(7), (4, 3), None, 2))
    loss.backward()
    assert torch.count_nonzero(z.grad[:4, :4]) == 0                 # new batch: old-class logits untouched
    assert torch.all(z.grad[:4, 4:] != 0)
    assert torch.all(z.grad[4:] != 0)                               # rehearsal batch: every seen class
    expect = F.cross_entropy(z[:4, 4:], y[:4] - 4) + F.cross_entropy(z[4:], y[4:])
    assert torch.allclose(loss, expect)
    first = ace_loss(Step(0, z[:4, :2], torch.tensor([0, 1, 1, 0]), torch.arange(4), (4,), None, 2))
    assert torch.allclose(first, F.cross_entropy(z[:4, :2], torch.tensor([0, 1, 1, 0])))


def test_erace_rehearses_the_exemplars_of_every_seen_class(tmp_path, monkeypatch):
    seen = []
    real = Trainer.fit_task

    def spy(self, k, data, s, generator, **kw):
        seen.append((k, data.memory_idx.cpu().clone(), data.labels[data.memory_idx].cpu().clone()))
        return real(self, k, data, s, generator, **kw)

    monkeypatch.setattr(Trainer, "fit_task", spy)
    assert run(tmp_path, "erace") == 0
    for k, idx, labels in seen:
        expect = [] if k == 0 else list(range(2 * (k + 1)))
        assert sorted(labels.unique().tolist()) == expect
        assert all(int((labels == c).sum()) == 5 for c in expect)          # 5 exemplars per seen class
    summary = json.loads((next(tmp_path.iterdir()) / "summary.json").read_text())
    assert summary["method"] == "erace"


def test_joint_visits_every_seen_image_once_per_epoch(monkeypatch, tmp_path):
    images, labels = toy_data(n=50)
    model = build_model(2, 2, width=4)
    trainer = Trainer(model, Normalizer((0.5,) * 3, (0.25,) * 3, "cpu"))
    drawn = []

    def recipe_loss(self, k, x, y, old, r):
        return self.model(x, k + 1, "main").float().sum() * 0.0

    real_crop = __import__("llt.trainer", fromlist=["crop_flip"]).crop_flip

    def crop_flip(batch, gen):
        drawn.append(batch.clone())
        return real_crop(batch, gen)

    monkeypatch.setattr(Trainer, "recipe_loss", recipe_loss)
    monkeypatch.setattr("llt.trainer.crop_flip", crop_flip)
    seen = torch.arange(50)
    data = TaskData(images=images, labels=labels, new_idx=seen, memory_idx=torch.empty(0, dtype=torch.int64),
                    val_idx=seen[:4], steps_per_epoch=0, first_label=2)
    trainer.fit_task(1, data, Schedule(epochs=2, lr=0.05, batch_size=16), torch.Generator().manual_seed(0),
                     recipe=Recipe(batch_size=16, step_matched=False))
    assert len(drawn) == 2 * 4                                      # ceil(50 / 16) steps per epoch
    for epoch in (drawn[:4], drawn[4:]):
        got = torch.cat(epoch)
        assert got.shape[0] == 50
        # each image exactly once: compare as a multiset of the images' bytes
        key = lambda t: sorted(bytes(im.numpy().tobytes()) for im in t)   # noqa: E731
        assert key(got) == key(images)
    # a joint run: task t's budget is one pass over tasks 1..t in batches of train.batch_size
    assert run(tmp_path, "joint", "--set", "train.epochs=1") == 0
    [rd] = list(tmp_path.iterdir())
    stream = torch.load(rd / "stream.pt", weights_only=True)["state"]
    budget = json.loads((rd / "summary.json").read_text())["budget"]
    seen_n = 0
    for t, b in enumerate(budget):
        seen_n += stream[f"task{t + 1}.train_idx"].numel()
        assert b["steps"] == -(-seen_n // 32) and b["new_images"] + b["memory_images"] == seen_n


@pytest.mark.parametrize("sets, message", [
    (["run.method=derpp", "baseline.replay_batching=concat"], "only balanced"),
    (["run.method=der", "baseline.der_beta=0.3"], "DER\\+\\+ with beta = 0"),
    (["run.method=replay", "baseline.der_alpha=0.3"], "apply to derpp, der"),
    (["run.method=erace", "data.exemplars_per_class=0"], "needs at least 1 exemplar"),
])
def test_rehearsal_config_rules(sets, message):
    with pytest.raises(LLTError, match=message):
        load_config("demo", sets)
    assert load_config("demo", ["run.method=derpp", "baseline.der_logits=seen"]).baseline.der_logits == "seen"
    assert load_config("demo", ["run.method=derpp"]).baseline.der_logits == "all"          # chosen on validation


REHEARSAL_PRESETS = sorted(p for p in __import__("llt.presets", fromlist=["x"]).available_presets()
                           if p.startswith("seq-cifar10-") or p.split("-")[-1] in ("derpp", "der", "erace"))


def test_the_rehearsal_presets_are_there():
    assert {"seq-cifar10-er-200", "seq-cifar10-er-500", "seq-cifar10-derpp-200", "seq-cifar10-derpp-500",
            "seq-cifar10-icarl-200", "seq-cifar10-icarl-500", "seq-cifar10-erace-200", "seq-cifar10-joint",
            "seq-cifar10-sgd", "paper-cifar10-derpp", "paper-cifar10-der", "paper-cifar10-erace",
            "paper-cifar100-derpp"} <= set(REHEARSAL_PRESETS)
    cfg = load_config("seq-cifar10-derpp-200", [])
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.lr, cfg.train.momentum, cfg.train.weight_decay) == \
        (50, 32, 0.03, 0.0, 0.0)
    assert (cfg.baseline.der_alpha, cfg.baseline.der_beta, cfg.data.exemplars_per_class * 10) == (0.1, 0.5, 200)
    assert cfg.baseline.steps == "pass" and cfg.train.select == "last" and not cfg.teaching.enabled


@pytest.mark.parametrize("preset", REHEARSAL_PRESETS)
def test_every_rehearsal_preset_runs_on_the_digits(tmp_path, preset):
    """Smoke test: the preset's method, memory, optimiser and budget, on the embedded digits, 2 tasks x 1 epoch."""
    assert main(["run", "--preset", preset, "--out", str(tmp_path), "--quiet", "--set", "data.dataset=digits",
                 "--set", "data.num_tasks=2", "--set", "data.classes_per_task=2", "--set", "train.epochs=1",
                 "--set", "train.milestones=[]", "--set", "model.width=4", "--set", "data.pool=builtin"]) == 0
    [rd] = list(tmp_path.iterdir())
    summary = json.loads((rd / "summary.json").read_text())
    assert summary["method"] == load_config(preset, []).run.method and len(summary["accuracy_matrix"]) == 2

