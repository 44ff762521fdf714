"""Dense class-incremental learning with lottery teaching (`run.method=cil`, the original's main_CIL.py), on
the one class-incremental stage loop (llt.methods.incremental). Stages, each finished by a marker written last:

    teach{t}   lottery teaching after task t (t = 1..n-1): queried unlabeled images + teacher logits,
               teacher = the best model of task t                 -> teaching/task{t}.pt
    task{t}    training on task t from the best model of task t-1 (the original's five-term loss, with the
               exemplar memory), best epoch by validation accuracy, test evaluation on tasks 1..t
                                                                   -> checkpoints/task{t}.pt
"""

from __future__ import annotations

from llt.methods.incremental import Incremental


class DenseCIL(Incremental):
    def seed_tag(self, T: int) -> str:
        return f"augment/task{T}"

    def desc(self, T: int, n: int) -> str:
        return f"task {T}/{n}"

    def teaching(self, t: int):
        return self.eng.teaching(t)

    def recipe(self, t: int):
        return None                 # the original's losses (METHOD 3.1 and 3.2)

