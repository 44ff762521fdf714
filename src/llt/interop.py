"""Reading the original code's files (VITA-Group/Lifelong-Learning-LTH) without running any of their code.

The original saves checkpoints as dicts with a `state_dict` (keys possibly prefixed `module.`, pruned
convs as `<name>.weight_orig` + `<name>.weight_mask` from torch.nn.utils.prune), often with a pickled
optimizer object and other Python objects beside it; its masks are dicts of `*weight_mask` tensors.

`read_tensors(path)` (llt.safeload) reads torch's zip and legacy formats with bounded memory, rebuilding
tensors and plain values only; every other class becomes an inert placeholder that records the name
(reported as skipped). Nothing named in the file is ever imported or called.

`to_llt(obj)` converts what was read to llt's layout: a state_dict with llt's parameter names
(`linear_main.t` -> `heads_main.t`, the balanced branch; `linear.t` -> `heads_aux.t`) and dense weights
(`weight_orig * weight_mask`), plus the Mask when the file carried one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llt.errors import LLTError
from llt.pruning.mask import Mask
from llt.safeload import DEFAULT_MAX_BYTES, read_tensors

__all__ = ["read_tensors", "load_external", "convert", "to_llt", "rename", "original_name", "DEFAULT_MAX_BYTES"]


def _tensors_of(obj) -> dict[str, torch.Tensor]:
    """The tensor entries of a state_dict-like mapping (the 'state_dict' entry of a checkpoint dict)."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise LLTError("the file holds no state_dict (a dict of tensors)")
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def rename(key: str) -> str:
    """An original parameter name in llt's layout."""
    key = key.removeprefix("module.")
    if key.startswith("linear_main."):
        return "heads_main." + key[len("linear_main."):]
    if key.startswith("linear."):
        return "heads_aux." + key[len("linear."):]
    return key


def original_name(key: str) -> str:
    """An llt parameter name in the original's layout (the inverse of `rename`, without `module.`)."""
    if key.startswith("heads_main."):
        return "linear_main." + key[len("heads_main."):]
    if key.startswith("heads_aux."):
        return "linear." + key[len("heads_aux."):]
    return key


def to_llt(obj, keep_orig: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(state_dict, masks) in llt's names from an original checkpoint or mask file: pruned weights become
    weight_orig * weight_mask (with `keep_orig`, weight_orig as stored: what the original's main_train.py
    starts a re-training from); `masks` maps conv weight names to bool tensors (empty when unpruned)."""
    tensors = _tensors_of(obj)
    state, masks = {}, {}
    for key, value in tensors.items():
        name = rename(key)
        if name.endswith("_mask"):
            masks[name[: -len("_mask")]] = value != 0
        elif name.endswith("_orig"):
            state[name[: -len("_orig")]] = value
        else:
            state[name] = value
    for name, keep in masks.items():
        if name in state:
            if state[name].shape != keep.shape:
                raise LLTError(f"{name}: weight {tuple(state[name].shape)} and mask {tuple(keep.shape)} differ in shape")
            if not keep_orig:
                state[name] = state[name] * keep.to(state[name].dtype)
    return state, masks


def load_external(path: str | Path, model: torch.nn.Module | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
                  keep_orig: bool = False) -> tuple[dict, Mask | None, list[str]]:
    """An llt or original checkpoint (or mask file) as (state_dict in llt's names, Mask or None, skipped
    class names). With `model`, names and shapes are checked against it; a mask file yields an empty
    state_dict. `keep_orig`: pruned weights as their stored weight_orig (see to_llt)."""
    obj, skipped = read_tensors(path, max_bytes)
    state, mask = convert(obj, path, model, keep_orig)
    return state, mask, skipped


def convert(obj, path, model: torch.nn.Module | None = None, keep_orig: bool = False) -> tuple[dict, Mask | None]:
    """What read_tensors returned, as (state_dict in llt's names, Mask or None); see load_external."""
    if isinstance(obj, dict) and set(obj) == {"state", "meta"}:        # llt's own checkpoint layout
        obj = obj["state"]
        if all(isinstance(v, torch.Tensor) and v.dtype == torch.bool for v in obj.values()):
            obj = {f"{k}_mask": v for k, v in obj.items()}             # an llt mask file
    try:
        state, masks = to_llt(obj, keep_orig)
    except LLTError as e:
        raise LLTError(f"{path}: {e}") from None
    mask = None
    if masks:
        if model is not None:
            params = dict(model.named_parameters())
            full = {n: masks.get(n, torch.ones_like(params[n], dtype=torch.bool))
                    for n in Mask.ones(model).names()}
            mask = Mask(full)
            mask.check_fits(model, str(path))
        else:
            mask = Mask(masks)
    if model is not None and state:
        own = model.state_dict()
        missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            raise LLTError(f"{path}: does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        for k, v in state.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise LLTError(f"{path}: {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
        for k in own:
            state.setdefault(k, own[k].clone())
    return state, mask
