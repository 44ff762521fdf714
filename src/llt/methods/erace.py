"""`erace`: ER-ACE (Caccia et al., ICLR 2022), experience replay with asymmetric cross-entropy.

Each step draws a batch of the task's data and, beside it, a rehearsal batch (balanced batching, as replay).
The new batch's cross-entropy runs over the current task's classes only: the old classes' logits are left out,
so new images never push them down. The rehearsal batch's runs over every seen class:

    L = CE(z_new[current task's classes], y_new) + CE(z_memory[seen classes], y_memory)

On task 1 there is no memory and no old class: plain cross-entropy.

The rehearsal batch is drawn from the exemplars of every seen class, the current task's included: the
exemplar memory of the old classes plus data.exemplars_per_class random images of each current class (those
random selection keeps after the task; with herding, the same random draw stands in, as herding chooses after
training). ER-ACE's buffer is a reservoir over the stream, so it holds current-task images too, and their
cross-entropy over every seen class is the only term that sets the new classes against the old ones: with
old classes only in the rehearsal batch, nothing does, and the newest task scored 1-3 % right after it was
learned on the digits demo (docs/baselines.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llt.data.stream import random_exemplars
from llt.methods.incremental import Incremental
from llt.trainer import Recipe, Step


def ace_loss(step: Step) -> torch.Tensor:
    new, z, y = step.part(0), step.logits, step.labels
    first = step.k * step.classes_per_task              # the current task's first class
    loss = F.cross_entropy(z[new, first:first + step.classes_per_task], y[new] - first)
    if len(step.sizes) > 1 and step.sizes[1]:
        mem = step.part(1)
        loss = loss + F.cross_entropy(z[mem], y[mem])
    return loss


class ERACE(Incremental):
    def rehearsal(self, t: int) -> torch.Tensor:
        if t == 0:
            return torch.empty(0, dtype=torch.int64)
        stream = self.eng.ctx.stream
        task = stream.tasks[t]
        current = [random_exemplars(task.train_idx[stream.train_labels[task.train_idx] == lab],
                                    stream.exemplars_per_class, stream.seed, lab) for lab in task.labels]
        return torch.cat([self.eng.memory(t), *current])

    def recipe(self, t: int) -> Recipe:
        return Recipe(loss_fn=ace_loss, terms=("erace",), batching=self.memory_batching, **self.budget())
