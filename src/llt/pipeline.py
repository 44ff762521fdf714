"""`llt run`: config -> data -> stream -> run directory (-> training, as the methods land).

This version builds and describes the class-incremental stream (stage "stream"). The training methods
(dense CIL, Top-Down, Bottom-Up) plug in after it; until they exist, asking for one is a clear error
raised before anything is written.
"""

from __future__ import annotations

import time

import torch

from llt.config import RunConfig
from llt.data.sources import load_dataset, load_pool
from llt.data.stream import build_stream, derive_seed
from llt.errors import LLTError
from llt.runs import RunDir, ensure_writable, run_name, save_checkpoint

AVAILABLE_METHODS = ("stream",)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise LLTError(f"run.device: {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LLTError(f"run.device={name}: CUDA is not available on this machine")
    return dev


def format_stream_table(rows: list[dict], pool_info: dict) -> str:
    head = f"{'task':>4}  {'classes':<16} {'names':<28} {'train':>6} {'val':>5} {'test':>5} {'memory':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        names = ", ".join(r["names"])
        lines.append(f"{r['task']:>4}  {', '.join(map(str, r['classes'])):<16} {names[:28]:<28} "
                     f"{r['num_train']:>6} {r['num_val']:>5} {r['num_test']:>5} {r['num_memory']:>6}")
    pool = pool_info.get("num_images")
    lines.append(f"unlabeled pool: {pool_info.get('pool')} ({pool} images)" if pool is not None else "unlabeled pool: none")
    return "\n".join(lines)


def run(cfg: RunConfig, preset: str | None = None) -> int:
    if cfg.run.method not in AVAILABLE_METHODS:
        raise LLTError(f"run.method={cfg.run.method}: this version of llt does not train yet; it builds and "
                       f"describes the task stream (use --set run.method=stream)")
    device = resolve_device(cfg.run.device)
    name = run_name(cfg, preset)
    # Check that the output folder is writable before the (possibly slow) data loading.
    ensure_writable(cfg.run.out_dir)
    t0 = time.perf_counter()
    ds = load_dataset(cfg.data)
    pool, pool_info = load_pool(cfg.data, ds)
    d = cfg.data
    stream = build_stream(ds.name, ds.train_labels, ds.test_labels, ds.num_classes,
                          classes_per_task=d.classes_per_task, num_tasks=d.num_tasks, class_order=d.class_order,
                          val_fraction=d.val_fraction, exemplars_per_class=d.exemplars_per_class,
                          exemplar_selection=d.exemplar_selection, seed=cfg.run.seed)
    load_s = time.perf_counter() - t0
    rows = stream.describe(ds.class_names)
    rd = RunDir.create(cfg.run.out_dir, name)
    print(f"run directory: {rd.path}")
    if ds.provenance.get("checksums_matched") is False:
        print(f"NOTE: {ds.name} differs from the official release (recorded in manifest.json)")
    if rd.stage_done("stream"):
        print("stream: already built (stage marker present), skipping")
    else:
        rd.write_manifest(cfg, preset, device=str(device),
                          seeds={"run": cfg.run.seed, **{p: derive_seed(cfg.run.seed, p)
                                                         for p in ("split", "init", "augment")}},
                          dataset={"name": ds.name, **ds.info()}, pool=pool_info, stream=stream.manifest())
        save_checkpoint(rd.file("stream.pt"), stream.state_dict(), stream.manifest())
        rd.record("stream", tasks=rows, pool=pool_info, load_seconds=round(load_s, 3))
        rd.mark_done("stream")
    print(f"{ds.name}: {ds.info()['num_train']} train / {ds.info()['num_test']} test images of shape "
          f"{list(ds.image_shape)}, {stream.num_tasks} tasks x {stream.classes_per_task} classes, "
          f"class order {list(stream.class_order)}, seed {cfg.run.seed} (loaded in {load_s:.2f} s)")
    print(format_stream_table(rows, pool_info))
    if stream.exemplar_selection == "herding":
        print(f"exemplars: herding, {stream.exemplars_per_class} per class, selected from teacher features once each "
              f"task is learned (the memory column counts only what is known before training)")
    return 0
