"""Setting a run up: device and precision, data, pool and stream on the device, the run directory and its
manifest (checked against the data on every later use), and reading an existing run's config.

`prepare` is the one place that turns a RunConfig into a `Context`, what every method reads.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch

from llt.config import RunConfig, from_tree, legacy_tree
from llt.registry import REGISTRY
from llt.data.augment import Normalizer
from llt.data.dataset import ImageDataset
from llt.data.sources import load_dataset, load_pool
from llt.data.stream import Stream, build_stream, derive_seed
from llt.errors import LLTError
from llt.models import build_model
from llt.runs import FORMAT_VERSION, RunDir, run_name
from llt.runtime import Numerics, default_eval_batch, resolve_numerics, runtime_changes, runtime_facts
from llt.storage import save_checkpoint


@dataclass
class Context:
    """What every stage of a run reads: config, data on the device, the stream, the pool."""

    cfg: RunConfig
    rd: RunDir
    ds: ImageDataset
    stream: Stream
    pool: torch.Tensor | None
    device: torch.device
    normalizer: Normalizer
    numerics: Numerics           # precision and memory format (llt.runtime)
    train_images: torch.Tensor   # uint8, on the device
    train_labels: torch.Tensor   # remapped, on the device
    test_images: torch.Tensor    # uint8, on the device
    load_seconds: float = 0.0    # how long loading took (the driver sets it)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return self.numerics.autocast_dtype

    @property
    def eval_batch(self) -> int:
        """train.eval_batch_size, or the measured default for the device when it is 0."""
        return self.cfg.train.eval_batch_size or default_eval_batch(self.device)

    def new_model(self, seed_tag: str = "init"):
        c = self.cfg
        model = build_model(self.stream.num_tasks, self.stream.classes_per_task, c.model.width, c.model.stem_stride,
                            self.ds.image_shape[1], seed=derive_seed(c.run.seed, seed_tag)).to(self.device)
        if self.numerics.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model


def load_model_state(model: torch.nn.Module, state: dict, source: str) -> None:
    """Load a state_dict, refusing (with a clear message) one whose names or shapes do not fit the model."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise LLTError(f"{source}: the checkpoint does not fit the model built from the config "
                       f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise LLTError(f"{source}: {k} has shape {tuple(state[k].shape)} in the checkpoint, the model built from "
                           f"the config expects {tuple(v.shape)} (was the run made with another config?)")
    model.load_state_dict(state)


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


def check_format(rd: RunDir) -> None:
    """Refuse run directories written by another format version (instead of mixing their files)."""
    try:
        version = json.loads(rd.file("manifest.json").read_text()).get("format_version")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise LLTError(f"{rd.file('manifest.json')}: not a readable manifest ({e})") from None
    if version != FORMAT_VERSION:
        raise LLTError(f"{rd.path} was written by run-directory format {version}; this llt writes format "
                       f"{FORMAT_VERSION}. Start a new run (another --out or run.name) instead of mixing them")


def check_same_stream(rd: RunDir, got: dict) -> None:
    """Refuse to continue or evaluate a run whose data no longer give the stream it was made with."""
    try:
        expected = json.loads(rd.file("manifest.json").read_text()).get("stream", {})
    except (OSError, json.JSONDecodeError) as e:
        raise LLTError(f"{rd.file('manifest.json')}: not a readable manifest ({e})") from None
    changed = [k for k in ("class_order", "sha256_train_idx", "sha256_val_idx", "sha256_test_idx", "sha256_exemplars")
               if expected.get(k) != got.get(k)]
    if changed:
        raise LLTError(f"{rd.path}: the data no longer give this run's task stream ({', '.join(changed)} differ); "
                       f"point --data-dir at the data the run was made with, or start a new run")


def warn_runtime_change(rd: RunDir, facts: dict) -> None:
    """One line when a run continues under another precision, memory format, torch, CPU capability or thread
    count than it started with: it still finishes, but is no longer bit-equal to an uninterrupted run."""
    try:
        recorded = json.loads(rd.file("manifest.json").read_text()).get("runtime")
    except (OSError, json.JSONDecodeError):
        return
    changes = runtime_changes(recorded, facts)
    if changes:
        print(f"WARNING: {rd.path} continues under another set-up than it started with ({'; '.join(changes)}): "
              f"its results will not be bit-equal to an uninterrupted run")


def stream_for(cfg: RunConfig, ds: ImageDataset) -> Stream:
    """The class-incremental stream the config cuts from a dataset (class order, splits, memory, seed)."""
    d = cfg.data
    return build_stream(ds.name, ds.train_labels, ds.test_labels, ds.num_classes,
                        classes_per_task=d.classes_per_task, num_tasks=d.num_tasks, class_order=d.class_order,
                        val_fraction=d.val_fraction, exemplars_per_class=d.exemplars_per_class,
                        exemplar_selection=d.exemplar_selection, seed=cfg.run.seed, train_per_class=d.train_per_class,
                        val_per_class=d.val_per_class)


def prepare(cfg: RunConfig, preset: str | None, rd: RunDir | None = None, need_pool: bool = True) -> Context:
    """Load data, pool and stream; create (or reopen) the run directory and write its manifest once."""
    device = resolve_device(cfg.run.device)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    ds = load_dataset(cfg.data)
    pool, pool_info = None, {"pool": cfg.data.pool, "used": False}
    lottery_teaching = cfg.teaching.enabled and REGISTRY[cfg.run.method].fused   # baselines never query a pool
    trains = REGISTRY[cfg.run.method].trains           # run.method=stream describes the pool instead
    if need_pool and (not trains or lottery_teaching):
        pool, pool_info = load_pool(cfg.data, ds)
        if pool is None and trains:
            raise LLTError("data.pool=none but lottery teaching is on: choose a pool or set teaching.enabled=false")
    stream = stream_for(cfg, ds)
    numerics = resolve_numerics(cfg.train.precision, device)
    if numerics.warning:
        print(f"WARNING: {numerics.warning}")
    facts = runtime_facts(numerics, device)
    if rd is None:
        rd = RunDir.create(cfg.run.out_dir, run_name(cfg, preset))
    if rd.file("manifest.json").is_file():
        check_format(rd)
        check_same_stream(rd, stream.manifest())
        warn_runtime_change(rd, facts)
    else:
        rd.write_manifest(cfg, preset, device=str(device),
                          seeds={"run": cfg.run.seed, "split": derive_seed(cfg.run.seed, "split"),
                                 "init": derive_seed(cfg.run.seed, "init"),
                                 "rule": "every random choice draws from derive_seed(run seed, purpose), purposes: "
                                         "split, exemplars/<label>, init, augment/<stage>, teaching/<task>"},
                          dataset={"name": ds.name, **ds.info()}, pool=pool_info, stream=stream.manifest(),
                          runtime=facts)
        save_checkpoint(rd.file("stream.pt"), stream.state_dict(), stream.manifest())
    return Context(cfg=cfg, rd=rd, ds=ds, stream=stream, pool=pool, device=device,
                   normalizer=Normalizer(ds.mean, ds.std, device, channels_last=numerics.channels_last),
                   numerics=numerics, train_images=ds.train_images.to(device),
                   train_labels=stream.train_labels.to(device), test_images=ds.test_images.to(device))


def open_run(run_dir: str, data_dir: str | None = None) -> tuple[RunConfig, RunDir]:
    """The config of an existing run directory (optionally with another data folder)."""
    rd = RunDir(run_dir)
    path = rd.file("manifest.json")
    if not path.is_file():
        raise LLTError(f"{run_dir} is not an llt run directory (no manifest.json)")
    try:
        manifest = json.loads(path.read_text())
        cfg = from_tree(legacy_tree(manifest["config"]), origin=str(path))
    except (json.JSONDecodeError, KeyError, TypeError, LLTError) as e:
        raise LLTError(f"{path}: not a valid llt manifest ({e})") from None
    if data_dir:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=data_dir))
    return cfg, rd
