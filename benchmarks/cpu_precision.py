"""fp32 against train.precision=auto on this CPU, side by side in one process: the bare training step,
llt's task-1 epoch, llt's distillation epoch and the lottery-teaching query, for each width.

    python benchmarks/cpu_precision.py [--widths 16 64] [--data-dir DIR] [--threads N]

`auto` is what llt resolves on this machine (bf16 autocast + channels-last on a CPU with native bf16,
fp32 NCHW elsewhere; the resolution is printed). Per width, with the task-1 batch B (128 at width 16, 64 at
width 64, or --batch):
  bare step     forward, two cross-entropies (both branches), backward, SGD on one fixed batch of B
  task-1 epoch  Trainer.fit_task on task 1 (crop/flip, normalise, the fused two-branch step, masks off):
                training images/s from the epoch's train_seconds (its validation pass is timed apart)
  distill epoch Trainer.fit_task on task 2 (sub-batches of B // 4: random, balanced new/old, unlabeled
                with teacher logits): backbone images/s (3 sub-batches of B // 4 per step)
  query         build_teaching_set: features of the pool and the exemplars, greedy kNN, teacher logits
Images are CIFAR-10 (JPEG copy) training images when --data-dir holds CIFAR-10, random uint8 otherwise.
The allocator is tuned as `llt` tunes it (llt.runtime.tune_allocator). Prints JSON.
"""

import argparse
import json
import statistics
import time

import _common  # noqa: F401
import torch
import torch.nn.functional as F
from _common import machine

from llt.data.augment import Normalizer, make_generator
from llt.models import build_model
from llt.runtime import available_cpus, cpu_bf16_capability, resolve_numerics, tune_allocator
from llt.teaching import TeachingSet, build_teaching_set
from llt.trainer import Schedule, TaskData, Trainer

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def images_for(n: int, data_dir: str | None, g: torch.Generator) -> tuple[torch.Tensor, str]:
    if data_dir:
        from llt.config import load_config
        from llt.data.sources import load_dataset

        cfg = load_config(None, ["data.dataset=cifar10", f"data.data_dir={data_dir}"])
        ds = load_dataset(cfg.data)
        return ds.train_images[:n].clone(), "CIFAR-10 (JPEG copy)"
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), "random uint8"


def model_for(width: int, numerics):
    m = build_model(5, 2, width=width, seed=0)
    return m.to(memory_format=torch.channels_last) if numerics.channels_last else m


def bare_step(width, batch, numerics, x_u8, steps):
    """Images/s of the bare step on one fixed normalised batch (no augmentation, no masks), median of 3
    windows of `steps` steps."""
    model = model_for(width, numerics)
    norm = Normalizer(MEAN, STD, "cpu", channels_last=numerics.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x, y = norm(x_u8[:batch]), torch.randint(0, 2, (batch,))
    ac = numerics.autocast_dtype

    def step():
        with torch.autocast("cpu", dtype=ac, enabled=ac is not None):
            f = model.features(x)
            loss = (F.cross_entropy(model.head_logits(f, 1, "main").float(), y)
                    + F.cross_entropy(model.head_logits(f, 1, "aux").float(), y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    rates = []
    for _ in range(3):                                 # median of three windows (shared machines are noisy)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(batch * steps / (time.perf_counter() - t0))
    return statistics.median(rates)


def epochs(width, batch, numerics, images, k, n_new, repeats):
    """(training images/s, validation images/s) of llt's epoch of task k+1, median over `repeats` epochs."""
    model = model_for(width, numerics)
    norm = Normalizer(MEAN, STD, "cpu", channels_last=numerics.channels_last)
    trainer = Trainer(model, norm, numerics.autocast_dtype, eval_batch_size=256)
    g = make_generator(0, "cpu")
    n_old = 40 * k
    labels = torch.cat([torch.randint(2 * k, 2 * k + 2, (n_new,), generator=g), torch.randint(0, max(2 * k, 1), (n_old,), generator=g)])
    new_idx, mem_idx = torch.arange(n_new), torch.arange(n_new, n_new + n_old)
    val_idx = torch.arange(min(n_new, 500))
    teach = None
    if k:
        n_unl = 10 * n_old
        teach = TeachingSet(images[-n_unl:].clone(), torch.randn(n_unl, 2 * k, generator=g),
                            torch.randn(n_unl, 2 * k, generator=g), torch.arange(n_unl))
    data = TaskData(images[: n_new + n_old], labels, new_idx, mem_idx, val_idx, teach)
    sched = Schedule(epochs=1, lr=0.01, batch_size=batch)
    train, val, per_step = [], [], (batch if k == 0 else 3 * (batch // 4))
    steps = 0
    for r in range(repeats + 1):                       # the first epoch warms up
        res = trainer.fit_task(k, data, sched, make_generator(r, "cpu"))
        h = res.history[-1]
        steps = h["steps"]
        if r:
            train.append(steps * per_step / h["train_seconds"])
            val.append(val_idx.numel() / h["val_seconds"])
    return statistics.median(train), statistics.median(val), steps


def query(width, numerics, images, n_pool, n_ex, k):
    model = model_for(width, numerics).eval()
    norm = Normalizer(MEAN, STD, "cpu", channels_last=numerics.channels_last)
    pool, memory = images[:n_pool], images[n_pool:n_pool + n_ex]
    build_teaching_set(model, pool[:512], memory[:8], 1, 2, norm, make_generator(0, "cpu"), 256, numerics.autocast_dtype)
    t0 = time.perf_counter()
    ts = build_teaching_set(model, pool, memory, 1, k, norm, make_generator(0, "cpu"), 256, numerics.autocast_dtype)
    seconds = time.perf_counter() - t0
    return (n_pool + n_ex + ts.pool_idx.numel()) / seconds, seconds, ts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--batch", type=int, default=0, help="task-1 batch (0: 128 at width <= 32, else 64)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--new-images", type=int, default=0, help="task images per epoch (0: 2,000 at width <= 32, else 512)")
    ap.add_argument("--repeats", type=int, default=3, help="timed epochs per measurement (median)")
    ap.add_argument("--pool", type=int, default=5000)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tuned = tune_allocator()
    g = torch.Generator().manual_seed(0)
    images, source = images_for(12000, args.data_dir, g)
    auto = resolve_numerics("auto", torch.device("cpu"))
    fp32 = resolve_numerics("fp32", torch.device("cpu"))
    out = {"benchmark": "cpu_precision", "images": source, "auto_resolves_to": auto.precision,
           "auto_memory_format": auto.memory_format, "cpu_bf16": cpu_bf16_capability(), "allocator_tuned": tuned,
           "available_cpus": available_cpus(), "results": {}}
    for width in args.widths:
        batch = args.batch or (128 if width <= 32 else 64)
        n_new = args.new_images or (2000 if width <= 32 else 512)
        steps = 12 if width <= 32 else 4
        rows = {}
        for name, num in (("fp32", fp32), ("auto", auto)):
            t1, v1, s1 = epochs(width, batch, num, images, 0, n_new, args.repeats)
            td, _, sd = epochs(width, batch, num, images, 1, n_new, args.repeats)
            q, qs, ts = query(width, num, images, args.pool, 100, 10)
            rows[name] = {"bare_step": round(bare_step(width, batch, num, images, steps)), "task1_epoch": round(t1),
                          "task1_validation": round(v1), "distill_epoch": round(td), "query": round(q),
                          "query_seconds": round(qs, 2), "query_selected": int(ts.pool_idx.numel()),
                          "task1_steps": s1, "distill_steps": sd}
            print(json.dumps({"width": width, "precision": name, **rows[name]}), flush=True)
        ratio = {k: round(rows["auto"][k] / rows["fp32"][k], 2)
                 for k in ("bare_step", "task1_epoch", "task1_validation", "distill_epoch", "query")}
        loop_share = {name: round(rows[name]["task1_epoch"] / rows[name]["bare_step"], 2) for name in rows}
        out["results"][str(width)] = {"batch": batch, "new_images": n_new, "images_per_second": rows,
                                      "auto_over_fp32": ratio, "task1_epoch_over_bare_step": loop_share}
    out.update(machine())
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
