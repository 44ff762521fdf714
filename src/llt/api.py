"""The Python API: drop an llt ticket (or one of the original code's checkpoints) into your own code.

    model, mask = llt.load_ticket("ticket.packed")          # any ticket file llt reads, no code run
    stream = llt.open_stream("demo")                        # data + class-incremental stream of a preset
    row = llt.evaluate(model, stream, task=3)               # test accuracy (%) on tasks 1..3
    llt.apply_mask(model, mask)                             # zero the pruned weights again (after your training)

See docs/api.md for a runnable example.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llt.config import load_config
from llt.context import stream_for
from llt.data.augment import Normalizer
from llt.data.sources import load_dataset
from llt.data.stream import Stream
from llt.errors import LLTError
from llt.evaluation import accuracy
from llt.export import load_ticket as _load_ticket
from llt.pruning.mask import Mask
from llt.runtime import resolve_numerics


def load_ticket(path, stem_stride: int = 1) -> tuple[torch.nn.Module, Mask | None]:
    """(model, mask) from a ticket file: `llt export` output (packed, llt, prune), an llt checkpoint, or a
    checkpoint of the original code. The model is on the CPU in eval mode, its pruned weights zero; `mask`
    is None for a dense file. `stem_stride=2` for 64x64 models read from files that do not say so."""
    model, mask, _ = _load_ticket(path, stem_stride)
    return model.eval(), mask


def apply_mask(model: torch.nn.Module, mask: Mask) -> torch.nn.Module:
    """Zero `model`'s pruned weights in place (checked against the model first); returns the model."""
    mask.check_fits(model)
    mask.apply_(model)
    return model


@dataclass
class StreamData:
    """A class-incremental stream with the images it indexes (what `evaluate` needs)."""

    stream: Stream
    test_images: torch.Tensor      # uint8 (N, 3, H, W)
    mean: tuple                    # per-channel normalisation of the dataset
    std: tuple
    class_names: list


def stream_data(cfg) -> StreamData:
    """The data and task stream a config describes, built exactly as its runs build them."""
    ds = load_dataset(cfg.data)
    return StreamData(stream_for(cfg, ds), ds.test_images, tuple(ds.mean), tuple(ds.std), list(ds.class_names or []))


def open_stream(preset: str | None = None, overrides: tuple[str, ...] | list[str] = ()) -> StreamData:
    """The data and task stream of a preset (with `--set`-style overrides, e.g. "data.data_dir=~/data"),
    built exactly as a run of that preset builds them (same class order, splits, seed)."""
    return stream_data(load_config(preset, list(overrides)))


def evaluate(model: torch.nn.Module, data: StreamData, task: int, batch_size: int = 256,
             precision: str = "fp32") -> list[float]:
    """Test accuracy (percent) on each of tasks 1..task, predicting over the classes of those tasks
    (the balanced branch, task-agnostic), as llt reports it. `precision` as train.precision: "fp32" (the
    default: float32, what bit-exact comparisons use), "auto" or "bf16" (llt.runtime.resolve_numerics;
    where that means channels-last, the model is converted to it in place)."""
    n = data.stream.num_tasks
    if not 1 <= task <= n:
        raise LLTError(f"task must be in 1..{n}, got {task}")
    if model.num_tasks < task or model.classes_per_task != data.stream.classes_per_task:
        raise LLTError(f"the model has {model.num_tasks} heads of {model.classes_per_task} classes; the stream has "
                       f"{n} tasks of {data.stream.classes_per_task}")
    device = next(model.parameters()).device
    numerics = resolve_numerics(precision, device)
    if numerics.channels_last:
        model = model.to(memory_format=torch.channels_last)
    norm = Normalizer(data.mean, data.std, device, channels_last=numerics.channels_last)
    return accuracy(model, data.test_images, data.stream.test_labels, [t.test_idx for t in data.stream.tasks[:task]],
                    norm, batch_size, numerics.autocast_dtype)["row"]
