"""`lwf`: Learning without Forgetting (Li & Hoiem, ECCV 2016), in its class-incremental form.

No memory. On each new-task batch, the loss is cross-entropy over the current task's classes (baseline.ce_scope:
'local' by default, as FACIL and PyCIL; 'global': over the seen heads) plus
baseline.lwf_lambda times the soft cross-entropy of the old heads' logits to those of the previous model
(a frozen copy taken before the task starts), at temperature baseline.lwf_temperature:

    L = CE(z_new, y) + lambda * mean(-sum_c softmax(z_teacher_old / T)_c * log_softmax(z_old / T)_c)

with lambda = 1 and T = 2 as in Li & Hoiem (and the FACIL survey's implementation): unlike lottery
teaching's distillation, the term is not scaled by T^2.
"""

from __future__ import annotations

from llt.methods.incremental import Incremental
from llt.trainer import Recipe


class LwF(Incremental):
    def recipe(self, t: int) -> Recipe:
        b = self.cfg.baseline
        return Recipe(loss="ce", distill=b.lwf_lambda, temperature=b.lwf_temperature, ce_offset=self.ce_offset(t),
                      batching=self.memory_batching, **self.budget())
