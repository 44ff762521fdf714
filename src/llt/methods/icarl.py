"""`icarl`: iCaRL (Rebuffi et al., CVPR 2017).

- Memory: the exemplars of every earlier class are replayed with the task's data (use
  data.exemplar_selection=herding, as the paper does; the presets do).
- Loss: sigmoid binary cross-entropy over the seen heads. The targets of the new classes are one-hot;
  those of the old classes are the previous model's sigmoid outputs (a frozen copy taken before the task
  starts; temperature baseline.icarl_temperature, 1 in the paper), which is iCaRL's distillation.
- Classifier: nearest mean of exemplars (NME). After task t, herding picks the exemplars of task t's
  classes (the last task's too), every seen class's mean is taken over its exemplars' L2-normalised
  features, and a test image goes to the class whose normalised mean is nearest to its normalised
  feature. The accuracy matrix of the summary is NME's; `network_matrix` holds the network's own
  output (balanced branch over the seen heads) for comparison.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llt.methods.incremental import Incremental
from llt.teaching import extract_features
from llt.trainer import Recipe


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, D): per class, the mean of its L2-normalised features, normalised again (iCaRL)."""
    f = F.normalize(features.float(), dim=1)
    means = torch.zeros(num_classes, f.shape[1])
    for c in range(num_classes):
        sel = f[labels == c]
        if sel.numel():
            means[c] = F.normalize(sel.mean(0), dim=0)
    return means


def exemplar_means(model, images: torch.Tensor, labels: torch.Tensor, num_classes: int, normalizer,
                   batch_size: int = 256, autocast_dtype=None) -> torch.Tensor:
    """iCaRL's class means: per class, the mean of the L2-normalised features of its exemplars and of their
    horizontal flips (as the original iCaRL and FACIL compute them), normalised again."""
    f = extract_features(model, images, normalizer, batch_size, autocast_dtype).cpu()
    f_flip = extract_features(model, images.flip(3), normalizer, batch_size, autocast_dtype).cpu()
    return class_means(torch.cat([f, f_flip]), torch.cat([labels, labels]).cpu(), num_classes)


def nme_predict(features: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """The index of the nearest class mean to each L2-normalised feature (Euclidean distance)."""
    return torch.cdist(F.normalize(features.float(), dim=1), means).argmin(1)


class ICaRL(Incremental):
    def recipe(self, t: int) -> Recipe:
        b = self.cfg.baseline
        return Recipe(loss="bce" if b.icarl_bce == "sum" else "bce-mean", temperature=b.icarl_temperature,
                      batching=self.memory_batching,
                      **self.budget())

    def exemplars(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices and labels of the exemplars of every class seen after task t."""
        idx = self.eng.memory(t + 1)          # (with herding, task t's classes are herded already)
        return idx, self.eng.ctx.stream.train_labels[idx]

    def evaluate(self, t: int) -> tuple[dict, dict]:
        ctx, eng = self.eng.ctx, self.eng
        bs = ctx.eval_batch
        idx, labels = self.exemplars(t)
        means = exemplar_means(eng.model, ctx.train_images[idx.to(ctx.device)], labels,
                               (t + 1) * ctx.stream.classes_per_task, ctx.normalizer, bs, ctx.autocast_dtype)
        row = []
        for task in ctx.stream.tasks[: t + 1]:
            f = extract_features(eng.model, ctx.test_images[task.test_idx.to(ctx.device)], ctx.normalizer, bs,
                                 ctx.autocast_dtype).cpu()
            pred = nme_predict(f, means)
            row.append(100.0 * float((pred == ctx.stream.test_labels[task.test_idx]).float().mean()))
        return {"row": row}, {"network_row": eng.accuracy(t)["row"]}
