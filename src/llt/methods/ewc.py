"""`ewc`: Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017), class-incremental, no memory, with the
FACIL survey's recipe (Masana et al., TPAMI 2022: cross-entropy on the current task's classes, Fisher
accumulation, lambda = 5000 at its scale; docs/baselines.md).

After task t, the diagonal Fisher information of the task's training images is computed at the
kept model theta*_t, in eval mode (BatchNorm statistics fixed), over the backbone's parameters (FACIL's
scope; baseline.ewc_heads=true adds the heads):

    F_t,i = (1 / N) sum_n (d log p(y_n | x_n; theta) / d theta_i)^2        (over the seen heads)

(y_n: the model's own prediction over the seen classes, FACIL's default `max_pred`; baseline.ewc_labels=true:
the true labels), the mean over images of per-image squared gradients, computed image by image in one vectorised pass
(torch.func: vmap of grad), so it does not depend on any batch size. FACIL squares the gradient of a
batch's mean loss instead (times the batch size), a quantity that shrinks as the batch grows; llt's is
the definition it approximates. Accumulated over tasks as FACIL does, from F = 0:

    F <- alpha * F + (1 - alpha) * F_t          (baseline.ewc_alpha, default 0.5: F = F_1 / 2 after task 1)

Learning task t+1 adds the penalty (lambda = baseline.ewc_lambda)

    (lambda / 2) * sum_i F_i * (theta_i - theta*_t,i)^2

to the cross-entropy on the new task's data. SGD follows that quadratic only while
lambda * max F < 2 (1 + momentum) / lr; a larger lambda makes the loss diverge, and llt warns after each
task when it would. The Fisher and the anchor are kept with each task's stage (checkpoints/task{t}-fisher.pt),
so a resumed run continues with them.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from llt.data.augment import Normalizer
from llt.methods.incremental import Incremental
from llt.trainer import Recipe


class EWCPenalty:
    """(lam / 2) * sum_i F_i (theta_i - anchor_i)^2 over the parameters named in `fisher`."""

    def __init__(self, fisher: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], lam: float):
        self.names = sorted(fisher)
        self.fisher = [fisher[n] for n in self.names]
        self.anchor = [anchor[n] for n in self.names]
        self.lam = lam

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        if getattr(self, "_model", None) is not model:     # resolved once per training, not on every step
            named = dict(model.named_parameters())
            self._model, self._params = model, [named[n] for n in self.names]
        total = torch.zeros((), device=self.fisher[0].device if self.fisher else None)
        for p, f, a in zip(self._params, self.fisher, self.anchor):
            total = total + (f * (p.float() - a) ** 2).sum()
        return 0.5 * self.lam * total


def empirical_fisher(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, num_heads: int,
                     normalizer: Normalizer, names: list[str] | None = None,
                     chunk_bytes: int = 1 << 28, predicted: bool = False) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of the parameters `names` (default: every trainable one): the mean over images of the
    squared per-image gradient of CE(model(x), y) over heads 1..num_heads, in eval mode, in float32; with
    `predicted`, y is the model's own prediction (argmax over those heads) instead of the true label.
    Per-image gradients come from torch.func (vmap of grad) in chunks of about `chunk_bytes`."""
    from torch.func import functional_call, grad, vmap

    was = model.training
    model.eval()
    params = {n: p.detach().float() for n, p in model.named_parameters()
              if p.requires_grad and (names is None or n in names)}
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in params}
    buffers = dict(model.named_buffers())
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    per_image = 4 * sum(p.numel() for p in params.values())
    chunk = max(1, chunk_bytes // max(per_image, 1))

    def loss(p, x, y):
        z = functional_call(model, (p, frozen, buffers), (x[None], num_heads, "main")).float()
        return F.cross_entropy(z, z.argmax(1).detach() if predicted else y[None])

    per_image_grad = vmap(grad(loss), in_dims=(None, 0, 0))
    try:
        with torch.no_grad():
            for i in range(0, images.shape[0], chunk):
                x = normalizer(images[i:i + chunk]).float().contiguous()
                g = per_image_grad(params, x, labels[i:i + chunk])
                for n in fisher:
                    fisher[n] += g[n].pow(2).sum(0)
    finally:
        model.train(was)
    return {n: f / max(images.shape[0], 1) for n, f in fisher.items()}


def penalised_names(model: torch.nn.Module, heads: bool) -> list[str]:
    """The parameters EWC protects: the backbone's (FACIL), with `heads` the heads' too."""
    return [n for n, p in model.named_parameters() if p.requires_grad and (heads or not n.startswith("heads_"))]


def check_stability(fisher: dict[str, torch.Tensor], lam: float, lr: float, momentum: float, t: int) -> bool:
    """Warn when the penalty's curvature lam * max F exceeds what SGD with heavy-ball momentum can follow,
    2 (1 + momentum) / lr (the step diverges on such a quadratic). Returns whether it is stable."""
    top = max((float(f.max()) for f in fisher.values() if f.numel()), default=0.0)
    bound = 2 * (1 + momentum) / lr
    if lam * top > bound:
        print(f"[llt] warning: ewc after task {t + 1}: baseline.ewc_lambda * max Fisher = {lam:g} * {top:.3g} = "
              f"{lam * top:.3g} exceeds 2(1 + momentum) / lr = {bound:.3g}; SGD will diverge on the penalty. Lower "
              f"baseline.ewc_lambda below {bound / max(top, 1e-12):.3g}", file=sys.stderr)
        return False
    return True


class EWC(Incremental):
    extra_states = ("fisher", "anchor")

    def __init__(self, eng):
        super().__init__(eng)
        self.fisher: dict | None = None
        self.anchor: dict | None = None

    def recipe(self, t: int) -> Recipe:
        if t == 0 or self.fisher is None:
            return Recipe(ce_offset=self.ce_offset(t), **self.budget())
        dev = self.eng.ctx.device
        penalty = EWCPenalty({k: v.to(dev) for k, v in self.fisher.items()},
                             {k: v.to(dev) for k, v in self.anchor.items()}, self.cfg.baseline.ewc_lambda)
        return Recipe(penalty=penalty, ce_offset=self.ce_offset(t), **self.budget())

    def after_task(self, t: int) -> dict[str, dict]:
        ctx, b, model = self.eng.ctx, self.cfg.baseline, self.eng.model
        idx = ctx.stream.tasks[t].train_idx.to(ctx.device)
        names = penalised_names(model, b.ewc_heads)
        new = empirical_fisher(model, ctx.train_images[idx], ctx.train_labels[idx], t + 1, ctx.normalizer, names,
                               predicted=b.ewc_labels == "predicted")
        new = {k: v.cpu() for k, v in new.items()}
        old = self.fisher or {k: torch.zeros_like(v) for k, v in new.items()}     # FACIL starts from F = 0
        self.fisher = {k: b.ewc_alpha * old[k] + (1 - b.ewc_alpha) * v for k, v in new.items()}
        params = dict(model.named_parameters())
        self.anchor = {n: params[n].detach().float().cpu().clone() for n in names}
        check_stability(self.fisher, b.ewc_lambda, self.cfg.train.lr, self.cfg.train.momentum, t)
        return {"fisher": self.fisher, "anchor": self.anchor}

    def restore(self, t: int, extra: dict[str, dict]) -> None:
        self.fisher, self.anchor = extra["fisher"], extra["anchor"]
