"""`derpp`: DER++ (Buzzega et al., NeurIPS 2020), and `der`, its beta = 0 case (DER).

The memory keeps, beside each exemplar, the logits the model gave it when it entered the memory: after task t,
once task t's model is kept (and, with herding, its exemplars chosen), the main branch's logits of every
exemplar of task t's classes, on the clean image, in eval mode, over every head. They are never rewritten.
Each later step draws a batch of the task's data and two memory batches beside it (balanced batching):

    L = CE(z_new, y_new) + alpha * MSE(z_m1, stored logits of m1) + beta * CE(z_m2, y_m2)

with alpha = baseline.der_alpha and beta = baseline.der_beta (0 for `der`); cross-entropy over the seen heads.
baseline.der_logits says which stored logits the MSE covers (docs/baselines.md): 'seen', the heads that existed
when the exemplar was stored (the later heads are free on memory images); 'all', every head, the future tasks'
too, as Mammoth's single head over all classes pins them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llt.methods.incremental import Incremental
from llt.trainer import Recipe, Step


class StoredLogits:
    """Per-exemplar targets keyed by dataset index: logits (n, C_all) and the width (classes that existed) of each."""

    def __init__(self, num_images: int, device):
        self.lookup = torch.full((num_images,), -1, dtype=torch.int64, device=device)
        self.idx = torch.empty(0, dtype=torch.int64)
        self.logits = torch.empty(0, 0)
        self.width = torch.empty(0, dtype=torch.int64)
        self._dev = None                  # (logits, width) on the training device, made on first use

    def add(self, idx: torch.Tensor, logits: torch.Tensor, width: int) -> None:
        """Store new exemplars; an index already stored keeps its first logits (never rewritten)."""
        keep = self.lookup[idx.to(self.lookup.device)].cpu() < 0
        idx, logits = idx[keep].cpu(), logits[keep].float().cpu()
        start = self.idx.numel()
        self.idx = torch.cat([self.idx, idx])
        self.logits = logits if start == 0 else torch.cat([self.logits, logits])
        self.width = torch.cat([self.width, torch.full((idx.numel(),), width, dtype=torch.int64)])
        self.lookup[idx.to(self.lookup.device)] = torch.arange(start, start + idx.numel(), device=self.lookup.device)
        self._dev = None

    def state(self) -> dict:
        return {"idx": self.idx, "logits": self.logits, "width": self.width}

    def load(self, state: dict) -> None:
        self.lookup.fill_(-1)
        self.idx, self.logits, self.width = state["idx"], state["logits"].float(), state["width"]
        self.lookup[self.idx.to(self.lookup.device)] = torch.arange(self.idx.numel(), device=self.lookup.device)
        self._dev = None

    def targets(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(stored logits, width) of dataset indices `idx` (all must be stored)."""
        if self._dev is None or self._dev[0].device != idx.device:
            self._dev = (self.logits.to(idx.device), self.width.to(idx.device))
        rows = self.lookup[idx]
        if rows.device.type == "cpu":
            if bool((rows < 0).any()):
                raise RuntimeError("DER: a memory image has no stored logits")
        else:                             # checked on the device, without a host sync every step
            torch._assert_async((rows >= 0).all(), "DER: a memory image has no stored logits")
        return self._dev[0][rows], self._dev[1][rows]


def logit_mse(z: torch.Tensor, stored: torch.Tensor, width: torch.Tensor, scope: str) -> torch.Tensor:
    """Mean squared error between logits z and their stored targets. scope 'all': over every column of
    `stored` (z must have as many); 'seen': each row over its first `width` columns only (the mean over those
    entries)."""
    if scope == "all":
        return F.mse_loss(z, stored)
    c = min(z.shape[1], stored.shape[1])
    valid = (torch.arange(c, device=z.device)[None, :] < width[:, None]).to(z.dtype)
    return ((z[:, :c] - stored[:, :c]) ** 2 * valid).sum() / valid.sum().clamp_min(1)


class DERpp(Incremental):
    extra_states = ("der_logits",)

    def __init__(self, eng):
        super().__init__(eng)
        ctx = eng.ctx
        self.stored = StoredLogits(ctx.train_images.shape[0], ctx.device)
        self.alpha, self.beta = self.cfg.baseline.der_alpha, self.beta_of(self.cfg)
        self.scope = self.cfg.baseline.der_logits

    @staticmethod
    def beta_of(cfg) -> float:
        return cfg.baseline.der_beta

    def loss(self, step: Step) -> torch.Tensor:
        """CE of the new batch, then the terms whose weight is not 0, each on its own memory batch (in that
        order: the logit batch, then the labelled one)."""
        z, y = step.logits, step.labels
        seen = (step.k + 1) * step.classes_per_task      # the forward covers every head under der_logits=all
        new = step.part(0)
        loss = F.cross_entropy(z[new, :seen], y[new])
        part = 1
        if self.alpha:
            if len(step.sizes) > part and step.sizes[part]:
                m1 = step.part(part)
                stored, width = self.stored.targets(step.idx[m1])
                loss = loss + self.alpha * logit_mse(z[m1], stored, width, self.scope)
            part += 1
        if self.beta and len(step.sizes) > part and step.sizes[part]:
            m2 = step.part(part)
            loss = loss + self.beta * F.cross_entropy(z[m2, :seen], y[m2])
        return loss

    def recipe(self, t: int) -> Recipe:
        heads = self.eng.model.num_tasks if self.scope == "all" else 0
        return Recipe(loss_fn=self.loss, terms=("der", self.alpha, self.beta, self.scope), heads=heads,
                      memory_batches=int(self.alpha != 0) + int(self.beta != 0), batching=self.memory_batching,
                      **self.budget())

    @torch.no_grad()
    def after_task(self, t: int) -> dict[str, dict]:
        """Store the logits of task t's exemplars, from task t's kept model (loaded)."""
        ctx, model = self.eng.ctx, self.eng.model
        idx = self.eng.memory(t + 1, first=t)         # the exemplars of task t's classes (herded already)
        if idx.numel():
            was = model.training
            model.eval()
            out = []
            for part in idx.split(ctx.eval_batch):
                x = ctx.normalizer(ctx.train_images[part.to(ctx.device)])
                with self.eng.trainer._autocast():
                    out.append(model(x, model.num_tasks, "main").float())
            model.train(was)
            self.stored.add(idx, torch.cat(out), (t + 1) * ctx.stream.classes_per_task)
        return {"der_logits": self.stored.state()}

    def restore(self, t: int, extra: dict[str, dict]) -> None:
        self.stored.load(extra["der_logits"])


class DER(DERpp):
    """DER: DER++ without its labelled replay term (beta = 0)."""

    @staticmethod
    def beta_of(cfg) -> float:
        return 0.0

