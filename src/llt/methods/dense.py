"""Dense class-incremental learning with lottery teaching (`run.method=cil`, the original's main_CIL.py).

Stages, each finished by a marker written last:

    teach{t}   lottery teaching after task t (t = 1..n-1): queried unlabeled images + teacher logits,
               teacher = the best model of task t                 -> teaching/task{t}.pt
    task{t}    training on task t from the best model of task t-1, best epoch by validation accuracy,
               test evaluation on tasks 1..t                       -> checkpoints/task{t}.pt
"""

from __future__ import annotations

from llt.console import task_line
from llt.context import Context
from llt.methods.base import Done, Engine, finish, history_record
from llt.models import remaining_weights


def run_dense(ctx: Context, progress: str = "auto") -> dict:
    cfg, n = ctx.cfg, ctx.stream.num_tasks
    eng = Engine(ctx, n * cfg.train.epochs, progress)
    R, densities = [], []
    for t in range(n):
        def compute(t=t) -> Done:
            teaching = eng.teaching(t)
            result = eng.fit(t, eng.schedule(), f"augment/task{t + 1}", f"task {t + 1}/{n}", teaching=teaching)
            eng.model.load_state_dict(result.best_state)
            ev = eng.accuracy(t)
            eng.herd(t)
            density = remaining_weights(eng.model) / 100
            print(task_line(t, n, ev["row"], f"best epoch {result.best_epoch} (val {result.best_val:.2f})"))
            meta = {"task": t + 1, "row": ev["row"], "per_class": ev["per_class"], "best_epoch": result.best_epoch,
                    "best_val": result.best_val, "density": density, "herded": eng.herded_meta()}
            record = {k: v for k, v in meta.items() if k != "herded"}
            return Done(eng.state(), meta, record={**record, "sa": sum(ev["row"]) / len(ev["row"]),
                                                     "epochs": history_record(result)})

        done = eng.stage(f"task{t + 1}", compute, event="task", epochs=cfg.train.epochs,
                         skip_note=f"task {t + 1}: finished before (stage marker present), skipping")
        eng.load(done.state, f"the model of task {t + 1}")
        eng.restore_herded(done.meta)
        R.append(done.meta["row"])
        densities.append(done.meta["density"])
    return finish(ctx, R, densities)
