"""`ewc`: Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017), class-incremental, no memory.

After task t, the diagonal empirical Fisher information of the task's training data is computed at the
best model theta*_t (eval mode, mean over the task's images of the squared gradient of the
cross-entropy over the seen heads), and accumulated over tasks as in the FACIL survey:

    F <- alpha * F + (1 - alpha) * F_t          (baseline.ewc_alpha, default 0.5; F = F_1 after task 1)

Learning task t+1 adds the penalty (lambda = baseline.ewc_lambda, default 5000)

    (lambda / 2) * sum_i F_i * (theta_i - theta*_t,i)^2

over every parameter, to the cross-entropy on the new task's data. SGD follows that quadratic only while
lambda * max F < 2 (1 + momentum) / lr; a larger lambda makes the loss diverge, and llt warns after each
task when it would (the Fisher's scale depends on the data and the network, so lambda needs tuning). The Fisher and the anchor are kept
with each task's stage (checkpoints/task{t}-fisher.pt), so a resumed run continues with them.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from llt.data.augment import Normalizer
from llt.methods.incremental import Baseline
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
                     normalizer: Normalizer, batch_size: int) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher: the mean over images of the squared gradient of CE(model(x), y) over
    heads 1..num_heads (batch gradients squared and weighted by batch size, as FACIL computes it), in eval
    mode so BatchNorm statistics do not move."""
    was = model.training
    model.eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    try:
        for i in range(0, images.shape[0], batch_size):
            x, y = normalizer(images[i:i + batch_size]), labels[i:i + batch_size]
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x, num_heads, "main").float(), y).backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach().float() ** 2 * x.shape[0]
        model.zero_grad(set_to_none=True)
    finally:
        model.train(was)
    return {n: f / max(images.shape[0], 1) for n, f in fisher.items()}


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


class EWC(Baseline):
    name = "ewc"
    extra_states = ("fisher", "anchor")

    def __init__(self, eng):
        super().__init__(eng)
        self.fisher: dict | None = None
        self.anchor: dict | None = None

    def recipe(self, t: int) -> Recipe:
        if t == 0 or self.fisher is None:
            return Recipe(ce_offset=self.ce_offset(t))
        dev = self.eng.ctx.device
        penalty = EWCPenalty({k: v.to(dev) for k, v in self.fisher.items()},
                             {k: v.to(dev) for k, v in self.anchor.items()}, self.cfg.baseline.ewc_lambda)
        return Recipe(penalty=penalty, ce_offset=self.ce_offset(t))

    def after_task(self, t: int) -> dict[str, dict]:
        ctx, b = self.eng.ctx, self.cfg.baseline
        idx = ctx.stream.tasks[t].train_idx.to(ctx.device)
        new = empirical_fisher(self.eng.model, ctx.train_images[idx], ctx.train_labels[idx], t + 1, ctx.normalizer,
                               self.cfg.train.batch_size)
        new = {k: v.cpu() for k, v in new.items()}
        self.fisher = new if self.fisher is None else {k: b.ewc_alpha * self.fisher[k] + (1 - b.ewc_alpha) * v
                                                      for k, v in new.items()}
        self.anchor = {n: p.detach().float().cpu().clone() for n, p in self.eng.model.named_parameters()}
        check_stability(self.fisher, b.ewc_lambda, self.cfg.train.lr, self.cfg.train.momentum, t)
        return {"fisher": self.fisher, "anchor": self.anchor}

    def restore(self, t: int, extra: dict[str, dict]) -> None:
        self.fisher, self.anchor = extra["fisher"], extra["anchor"]
