"""Tickets you can hand to others: export a task's ticket of a run in three layouts, and read any of them back.

    llt      {"state": {"model": state_dict, "mask": {name: bool}}, "meta": JSON}: llt's own checkpoint layout
    prune    the torch.nn.utils.prune layout under the original's parameter names, {"state_dict": ...} with
             `<name>_orig` and `<name>_mask` for every pruned conv and the heads as `linear_main.t` (balanced)
             and `linear.t` (random branch): what the original code saves and loads; plus "llt_model"
    packed   a self-describing compact ticket: per conv, the mask bit-packed (numpy.packbits, row-major) and
             only the kept weights (fp16 or fp32); BatchNorm and heads dense in fp32; a JSON header with the
             format, architecture, config hash, density per layer and a sha256 of every part

Every layout loads with torch.load(weights_only=True). Unpacking a packed fp32 ticket gives back the
exported state exactly, so its accuracy is the same bit for bit; fp16 halves the kept weights' bytes.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from llt.errors import LLTError
from llt.interop import original_name
from llt.models import build_model
from llt.pruning.mask import Mask

PACKED_FORMAT = "llt-packed-ticket/1"


def _sha(t: torch.Tensor) -> str:
    a = t.detach().cpu().contiguous().reshape(-1)
    raw = a.view(torch.uint8).numpy().tobytes() if a.numel() else b""
    return hashlib.sha256(f"{a.dtype}:{tuple(t.shape)};".encode() + raw).hexdigest()[:16]


def architecture(model) -> dict:
    """What build_model needs to rebuild `model`."""
    return {"num_tasks": model.num_tasks, "classes_per_task": model.classes_per_task, "width": model.width,
            "stem_stride": model.stem_stride}


def rebuild(arch: dict):
    """The model a file describes; sizes beyond any PreAct-ResNet-18 a ticket comes from are refused before
    anything is allocated."""
    try:
        sizes = {k: int(arch[k]) for k in ("num_tasks", "classes_per_task", "width", "stem_stride")}
    except (KeyError, TypeError, ValueError) as e:
        raise LLTError(f"the file does not describe its model ({e})") from None
    bounds = {"num_tasks": 1000, "classes_per_task": 1000, "width": 512, "stem_stride": 4}
    bad = [f"{k}={v}" for k, v in sizes.items() if not 1 <= v <= bounds[k]]
    if bad:
        raise LLTError(f"the file describes an implausible model ({', '.join(bad)}); refused")
    return build_model(sizes["num_tasks"], sizes["classes_per_task"], sizes["width"], sizes["stem_stride"])


def pack(state: dict, mask: Mask, arch: dict, dtype: torch.dtype = torch.float16, **header) -> dict:
    """The packed ticket of `state` under `mask` (a dict for torch.save)."""
    if dtype not in (torch.float16, torch.float32):
        raise LLTError(f"packed tickets store fp16 or fp32 weights, not {dtype}")
    bits, kept, dense = {}, {}, {}
    for name, value in state.items():
        if name in mask.masks:
            keep = mask[name].cpu()
            bits[name] = torch.from_numpy(np.packbits(keep.flatten().numpy()))
            kept[name] = value.detach().cpu().flatten()[keep.flatten()].to(dtype)
        else:
            dense[name] = value.detach().cpu()
    head = {"format": PACKED_FORMAT, "weights_dtype": str(dtype).removeprefix("torch."), "architecture": arch,
            "shapes": {n: list(mask[n].shape) for n in mask.names()}, "density": mask.density(),
            "per_layer_density": mask.per_layer_density(), "num_kept": mask.num_kept(),
            "sha256": {**{f"bits/{n}": _sha(t) for n, t in bits.items()}, **{f"kept/{n}": _sha(t) for n, t in kept.items()},
                       **{f"dense/{n}": _sha(t) for n, t in dense.items()}}, **header}
    return {"header": json.dumps(head), "bits": bits, "kept": kept, "dense": dense}


def unpack(obj: dict, source: str = "packed ticket") -> tuple[dict, Mask, dict]:
    """(state_dict in float32, Mask, header) of a packed ticket; checksums and shapes are verified."""
    try:
        head = json.loads(obj["header"])
        bits, kept, dense = obj["bits"], obj["kept"], obj["dense"]
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise LLTError(f"{source}: not a packed llt ticket ({e})") from None
    if head.get("format") != PACKED_FORMAT:
        raise LLTError(f"{source}: format {head.get('format')!r}, expected {PACKED_FORMAT}")
    for part, tensors in (("bits", bits), ("kept", kept), ("dense", dense)):
        for n, t in tensors.items():
            if head["sha256"].get(f"{part}/{n}") != _sha(t):
                raise LLTError(f"{source}: checksum mismatch in {part}/{n} (the file is damaged)")
    state, masks = dict(dense), {}
    for n, shape in head["shapes"].items():
        numel = int(np.prod(shape))
        if n not in bits or n not in kept or numel > bits[n].numel() * 8:
            raise LLTError(f"{source}: {n} declares shape {shape}, more than its stored mask bits cover")
        keep = torch.from_numpy(np.unpackbits(bits[n].numpy(), count=numel).astype(bool))
        if int(keep.sum()) != kept[n].numel():
            raise LLTError(f"{source}: {n} keeps {int(keep.sum())} weights in its mask but stores {kept[n].numel()}")
        w = torch.zeros(numel, dtype=torch.float32)
        w[keep] = kept[n].float()
        state[n], masks[n] = w.view(shape), keep.view(shape)
    return state, Mask(masks), head


def export_state(model, state: dict, mask: Mask, fmt: str, dtype: torch.dtype = torch.float16, **header) -> dict:
    """The object to torch.save for `fmt` (llt, prune or packed)."""
    arch = architecture(model)
    if fmt == "llt":
        return {"state": {"model": state, "mask": dict(mask.masks)},
                "meta": json.dumps({"kind": "llt-ticket", "architecture": arch, "density": mask.density(), **header})}
    if fmt == "prune":
        model.load_state_dict(state)
        # the original's parameter names (heads as linear_main.t / linear.t), so that its model, prepared
        # with torch.nn.utils.prune, loads it with a strict load_state_dict
        return {"state_dict": {original_name(k): v for k, v in mask.to_prune_layout(model).items()},
                "llt_model": json.dumps(arch)}
    if fmt == "packed":
        return pack(state, mask, arch, dtype, **header)
    raise LLTError(f"--format must be llt, prune or packed, got {fmt!r}")


def infer_architecture(state: dict, stem_stride: int = 1) -> dict:
    """The architecture of a PreAct-ResNet-18 state_dict in llt's names, from its shapes (the stem stride
    cannot be seen in them: 1 for 32x32 inputs, give 2 for 64x64)."""
    try:
        heads = sorted({int(k.split(".")[1]) for k in state if k.startswith("heads_main.") and k.endswith(".weight")})
        return {"num_tasks": len(heads), "classes_per_task": int(state["heads_main.0.weight"].shape[0]),
                "width": int(state["conv1.weight"].shape[0]), "stem_stride": stem_stride}
    except (KeyError, ValueError, IndexError) as e:
        raise LLTError(f"not a PreAct-ResNet-18 state_dict with per-task heads ({e})") from None


def load_ticket(path, stem_stride: int = 1, max_bytes: int | None = None):
    """(model, mask, info) from any ticket file: a packed, llt or prune export of llt, an llt stage
    checkpoint, or a checkpoint/mask of the original code. `mask` is None for a dense file. Never runs
    code from the file and reads it within `max_bytes` (default llt.safeload.DEFAULT_MAX_BYTES); pruned
    weights of the model are zero. A file that holds only a mask is refused, naming --mask."""
    from llt.interop import convert, read_tensors
    from llt.safeload import DEFAULT_MAX_BYTES

    obj, skipped = read_tensors(path, DEFAULT_MAX_BYTES if max_bytes is None else max_bytes)
    info = {"skipped": skipped}
    if isinstance(obj, dict) and "header" in obj and "bits" in obj:
        state, mask, head = unpack(obj, str(path))
        model = rebuild(head["architecture"])
        info.update(format="packed", header=head)
    elif isinstance(obj, dict) and isinstance(obj.get("state"), dict) and set(obj["state"]) == {"model", "mask"}:
        meta = json.loads(obj["meta"])
        state, mask = obj["state"]["model"], Mask(obj["state"]["mask"])
        model = rebuild(meta["architecture"])
        info.update(format="llt", meta=meta)
    else:
        arch_json = obj.get("llt_model") if isinstance(obj, dict) else None
        loose, loose_mask = convert(obj, path)          # names converted, not yet checked against a model
        if not loose and loose_mask is not None:
            raise LLTError(f"{path}: holds only a mask (no weights); give it as --mask to `llt retrain --weights W "
                           f"--mask {path}`, or evaluate a checkpoint that has weights")
        arch = json.loads(arch_json) if isinstance(arch_json, str) else infer_architecture(loose, stem_stride)
        model = rebuild(arch)
        state, mask = convert(obj, path, model)         # the file is read once
        info.update(format="prune" if arch_json else "checkpoint")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise LLTError(f"{path}: the weights do not fit the model they describe ({str(e).splitlines()[0][:160]})") from None
    if mask is not None:
        mask.check_fits(model, str(path))
        mask.apply_(model)
    return model, mask, info
