"""Reading the original code's files (VITA-Group/Lifelong-Learning-LTH) without running any of their code.

The original saves checkpoints as dicts with a `state_dict` (keys possibly prefixed `module.`, pruned
convs as `<name>.weight_orig` + `<name>.weight_mask` from torch.nn.utils.prune), often with a pickled
optimizer object and other Python objects beside it; its masks are dicts of `*weight_mask` tensors.

`read_tensors(path)` first tries `torch.load(weights_only=True)`. Where that refuses the file because it
holds other objects, a restricted reader takes over: it unpickles torch's zip format itself, rebuilds
tensors and plain containers, and replaces every other class by an inert placeholder that records the
name (reported as skipped). Nothing named in the file is ever imported or called, so a file crafted to
run code cannot: its callables (os.system, eval, ...) are placeholders too, and a call of one is refused.

`to_llt(obj)` converts what was read to llt's layout: a state_dict with llt's parameter names
(`linear_main.t` -> `heads_main.t`, the balanced branch; `linear.t` -> `heads_aux.t`) and dense weights
(`weight_orig * weight_mask`), plus the Mask when the file carried one.
"""

from __future__ import annotations

import builtins
import io
import pickle
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from llt.errors import LLTError
from llt.pruning.mask import Mask

# Globals a checkpoint may name that the reader rebuilds itself (everything else becomes a placeholder).
_STORAGES = {name: getattr(torch, name) for name in ("FloatStorage", "DoubleStorage", "HalfStorage", "BFloat16Storage",
                                                     "LongStorage", "IntStorage", "ShortStorage", "CharStorage",
                                                     "ByteStorage", "BoolStorage")}


class _Refuse(type):
    """Metaclass of the placeholders: calling one (pickle's REDUCE, how a crafted file runs os.system or
    eval) is refused; pickle's NEWOBJ (how objects such as an optimizer are rebuilt) creates an inert
    instance without calling anything."""

    def __call__(cls, *args, **kwargs):
        raise LLTError(f"refusing to call {cls.qualname} while reading a checkpoint (the file tries to run code)")


def _placeholder(full: str) -> type:
    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __setstate__(self, state) -> None:      # pickle's BUILD: keep the state, run nothing
        self.state = state

    return _Refuse("Skipped", (), {"qualname": full, "__new__": __new__, "__setstate__": __setstate__,
                                   "__repr__": lambda self: f"<skipped {full}>"})


# Plain constructors a checkpoint may call through REDUCE; none of them runs code.
_SAFE = {("builtins", n): getattr(builtins, n)
         for n in ("dict", "list", "set", "frozenset", "tuple", "int", "float", "bool", "str", "bytes", "complex",
                   "slice", "range")}
_SAFE.update({("__builtin__", n): c for (_, n), c in list(_SAFE.items())})     # protocol-2 spelling
_SAFE.update({("collections", "OrderedDict"): OrderedDict, ("collections", "defaultdict"): lambda *a: {},
              ("torch", "device"): torch.device, ("torch", "Size"): torch.Size})


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=(), metadata=None):
    t = torch.empty((0,), dtype=storage.dtype)
    t.set_(storage, storage_offset, size, stride)
    return t


def _rebuild_parameter(data, requires_grad, backward_hooks, *args):
    return data


class _Reader(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.skipped = archive, prefix, set()

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if (module, name) in _SAFE:
            return _SAFE[(module, name)]
        if module == "torch" and name in _STORAGES:
            return _STORAGES[name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        self.skipped.add(f"{module}.{name}")
        return _placeholder(f"{module}.{name}")

    def persistent_load(self, saved_id):
        kind, storage_type, key, _location, _numel = saved_id
        if kind != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id {kind!r}")
        raw = self.archive.read(f"{self.prefix}/data/{key}")
        with warnings.catch_warnings():      # TypedStorage is what torch's own loader builds here
            warnings.simplefilter("ignore", UserWarning)
            dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        untyped = torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if raw else torch.UntypedStorage(0)
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)


def _restricted_load(path: Path):
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise LLTError(f"{path}: not a torch zip checkpoint (truncated, or the legacy pre-1.6 format: re-save it "
                       f"with torch.save in torch >= 1.6)") from None
    with archive:
        names = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if not names:
            raise LLTError(f"{path}: no data.pkl in the archive (not a torch checkpoint)")
        prefix = names[0][: -len("/data.pkl")]
        reader = _Reader(archive.read(names[0]), archive, prefix)
        try:
            obj = reader.load()
        except LLTError:
            raise
        except Exception as e:
            raise LLTError(f"{path}: cannot read ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None
    return obj, sorted(reader.skipped)


def read_tensors(path: str | Path) -> tuple[dict, list[str]]:
    """(object with tensors and plain values, names of the classes skipped) of a checkpoint file; never
    runs code from it. LLTError for a missing, truncated or hostile file."""
    path = Path(path)
    if not path.is_file():
        raise LLTError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True), []
    except pickle.UnpicklingError:
        pass                       # other objects beside the tensors: the restricted reader
    except Exception as e:
        if "weights_only" not in str(e) and "Unsupported global" not in str(e):
            raise LLTError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    return _restricted_load(path)


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


def to_llt(obj) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(state_dict, masks) in llt's names from an original checkpoint or mask file: pruned weights become
    weight_orig * weight_mask; `masks` maps conv weight names to bool tensors (empty when unpruned)."""
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
            state[name] = state[name] * keep.to(state[name].dtype)
    return state, masks


def load_external(path: str | Path, model: torch.nn.Module | None = None) -> tuple[dict, Mask | None, list[str]]:
    """An llt or original checkpoint (or mask file) as (state_dict in llt's names, Mask or None, skipped
    class names). With `model`, names and shapes are checked against it; a mask file yields an empty
    state_dict."""
    obj, skipped = read_tensors(path)
    state, mask = convert(obj, path, model)
    return state, mask, skipped


def convert(obj, path, model: torch.nn.Module | None = None) -> tuple[dict, Mask | None]:
    """What read_tensors returned, as (state_dict in llt's names, Mask or None); see load_external."""
    if isinstance(obj, dict) and set(obj) == {"state", "meta"}:        # llt's own checkpoint layout
        obj = obj["state"]
        if all(isinstance(v, torch.Tensor) and v.dtype == torch.bool for v in obj.values()):
            obj = {f"{k}_mask": v for k, v in obj.items()}             # an llt mask file
    try:
        state, masks = to_llt(obj)
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
