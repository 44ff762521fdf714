"""Reading checkpoint files nobody vouches for: tensors and plain values only, bounded memory, no code run.

`read_tensors(path, max_bytes)` reads torch's zip format (torch >= 1.6) and the legacy format (torch < 1.6:
a sequence of pickles followed by the raw storages, what the original code's `torch.save` wrote under the
torch 1.4/1.5 its README allows).

What is checked before anything is allocated:
- the zip's declared uncompressed sizes (all entries together) and the legacy file's size against
  `max_bytes` (DEFAULT_MAX_BYTES, a few times the largest PreAct-ResNet-18 checkpoint with its optimizer);
- the pickle itself, opcode by opcode (pickletools), before it is run: at most MAX_PICKLE_BYTES long, so
  that the objects it can build are bounded (a 44 MB pickle of 10^8 integers is refused, not built);
- every tensor's size, strides and offset against its storage's bytes: no view may address more elements
  than its storage holds (a stride-0 view of one float "holding" 10^9 elements is refused).

What is rebuilt: tensors (`torch._utils._rebuild_tensor(_v2)`, `_rebuild_parameter*`), storages, dtypes,
`torch.device`, `torch.Size`, `collections.OrderedDict` (torch's state_dicts) and `collections.defaultdict`
(optimizer state, as an empty dict). Every other class the file names becomes an inert, named placeholder
(reported as skipped, e.g. `torch.optim.sgd.SGD`); calling one, which is how a crafted pickle runs
`os.system` or `eval`, and also how it would build large containers (`list`, `range`, `bytes`), is
refused. torch's own `weights_only` loader reads zip files first (after the size checks); the bound on
tensors is applied to what it returns too.

Every refusal is an LLTError of one line naming the file and the reason.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import struct
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from llt.errors import LLTError

DEFAULT_MAX_BYTES = 512 * 1024 * 1024    # full-width dense checkpoint with SGD momentum: about 90 MB
MAX_PICKLE_BYTES = 16 * 1024 * 1024      # a state_dict with an optimizer pickles to well under 1 MB
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

_STORAGES = {name: getattr(torch, name) for name in ("FloatStorage", "DoubleStorage", "HalfStorage", "BFloat16Storage",
                                                     "LongStorage", "IntStorage", "ShortStorage", "CharStorage",
                                                     "ByteStorage", "BoolStorage")}


class _Refuse(type):
    """Metaclass of the placeholders: calling one (pickle's REDUCE) is refused; pickle's NEWOBJ (how objects
    such as an optimizer are rebuilt) creates an inert instance without calling anything."""

    def __call__(cls, *args, **kwargs):
        raise LLTError(f"refusing to call {cls.qualname} while reading a checkpoint (the file tries to run code "
                       f"or to build objects llt does not read)")


def _placeholder(full: str) -> type:
    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __setstate__(self, state) -> None:      # pickle's BUILD: keep the state, run nothing
        self.state = state

    return _Refuse("Skipped", (), {"qualname": full, "__new__": __new__, "__setstate__": __setstate__,
                                   "__repr__": lambda self: f"<skipped {full}>"})


def _storage_elements(storage) -> int:
    nbytes = storage.nbytes() if callable(getattr(storage, "nbytes", None)) else len(storage)
    size = storage.element_size() if hasattr(storage, "element_size") else 1
    return nbytes // max(size, 1)


def check_view(size, stride, offset: int, available: int, what: str = "a tensor") -> None:
    """Refuse a view that addresses elements outside its storage or more elements than the storage holds."""
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride) or offset < 0:
        raise LLTError(f"{what}: malformed view (size {size}, stride {stride}, offset {offset})")
    numel = 1
    for s in size:
        numel *= s
    if numel == 0:
        return
    extent = offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1
    if extent > available or numel > available:
        raise LLTError(f"{what}: a view of {numel} elements (size {size}, stride {stride}) over a storage of "
                       f"{available} elements; refused (such views expand a few bytes into gigabytes)")


def _rebuild_tensor(storage, storage_offset, size, stride, *rest):
    check_view(size, stride, int(storage_offset), _storage_elements(storage))
    t = torch.empty((0,), dtype=storage.dtype)
    t.set_(storage, storage_offset, size, stride)
    return t


def _rebuild_parameter(data, *rest):
    return data


def _safe_globals() -> dict:
    out = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor, ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
           ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
           ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
           ("collections", "OrderedDict"): OrderedDict, ("collections", "defaultdict"): lambda *a: {},
           ("torch", "device"): torch.device, ("torch", "Size"): torch.Size}
    out.update({("torch", name): s for name, s in _STORAGES.items()})
    return out


_SAFE = _safe_globals()


class _Restricted(pickle.Unpickler):
    """The restricted unpickler; `storage(saved_id)` resolves persistent ids (format-specific)."""

    def __init__(self, stream, storage):
        super().__init__(stream)
        self.storage, self.skipped = storage, set()

    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE:
            return _SAFE[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module not in ("builtins", "__builtin__"):     # a builtin named as a value (defaultdict's factory)
            self.skipped.add(f"{module}.{name}")          # is not a skipped object; calling it is still refused
        return _placeholder(f"{module}.{name}")

    def persistent_load(self, saved_id):
        return self.storage(saved_id)


def _check_pickle(data: bytes, path: Path, what: str = "pickle", limit: int = MAX_PICKLE_BYTES) -> int:
    """Walk the pickle's opcodes without running them; its length (bytes up to STOP). Refuses a pickle
    longer than `limit` bytes or one that is not a pickle."""
    end = 0
    try:
        for op, _arg, pos in pickletools.genops(io.BytesIO(data)):
            end = pos
            if pos > limit:
                raise LLTError(f"{path}: its {what} is over {limit:,} bytes; refused (a checkpoint's pickle "
                               f"holds names and small values, its tensors are stored apart)")
            if op.name == "STOP":
                return pos + 1
    except LLTError:
        raise
    except Exception as e:
        raise LLTError(f"{path}: not a readable checkpoint (its {what} is damaged: {str(e).splitlines()[0][:120]})") from None
    raise LLTError(f"{path}: not a readable checkpoint (its {what} ends early at byte {end})")


def _run(reader: _Restricted, path: Path):
    try:
        return reader.load()
    except LLTError as e:
        raise LLTError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from None
    except Exception as e:
        msg = str(e).splitlines()[0][:160] if str(e) else ""
        raise LLTError(f"{path}: cannot read ({type(e).__name__}: {msg})") from None


def _dtype_of(storage_type) -> torch.dtype:
    if storage_type is torch.UntypedStorage:
        return torch.uint8
    with warnings.catch_warnings():      # TypedStorage classes are what torch's own loader uses here
        warnings.simplefilter("ignore", UserWarning)
        return storage_type.dtype


def _typed(buffer: torch.Tensor, dtype: torch.dtype):
    return torch.storage.TypedStorage(wrap_storage=buffer.untyped_storage(), dtype=dtype, _internal=True)


# ------------------------------------------------------------------------------------------------ zip
def check_zip(path: Path, max_bytes: int) -> zipfile.ZipFile:
    """The archive, once its declared uncompressed sizes are within `max_bytes`."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise LLTError(f"{path}: not a torch checkpoint (a damaged zip archive)") from None
    total = sum(i.file_size for i in archive.infolist())
    if total > max_bytes:
        archive.close()
        raise LLTError(f"{path}: declares {total:,} bytes once uncompressed, above the limit of {max_bytes:,} "
                       f"(--max-bytes to raise it for a file you trust to be that large)")
    return archive


def _zip_pickle(path: Path, archive: zipfile.ZipFile) -> tuple[str, bytes]:
    """(prefix, data.pkl) of a torch zip archive, its pickle checked before anything runs it."""
    names = [n for n in archive.namelist() if n.endswith("/data.pkl")]
    if not names:
        raise LLTError(f"{path}: no data.pkl in the archive (not a torch checkpoint)")
    if archive.getinfo(names[0]).file_size > MAX_PICKLE_BYTES:
        raise LLTError(f"{path}: its pickle is over {MAX_PICKLE_BYTES:,} bytes; refused (a checkpoint's pickle "
                       f"holds names and small values, its tensors are stored apart)")
    data = archive.read(names[0])
    _check_pickle(data, path)
    return names[0][: -len("/data.pkl")], data


def _read_zip(path: Path, archive: zipfile.ZipFile, prefix: str, data: bytes):
    """The restricted reader over a zip archive whose pickle `data` (under `prefix`) was checked."""

    def storage(saved_id):
        kind, storage_type, key, _location, numel = saved_id[:5]
        if kind != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id {kind!r}")
        raw = archive.read(f"{prefix}/data/{key}")
        buffer = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        return _typed(buffer, _dtype_of(storage_type))

    reader = _Restricted(io.BytesIO(data), storage)
    return _run(reader, path), sorted(reader.skipped)


# ------------------------------------------------------------------------------------------------ legacy
def _read_legacy(path: Path, max_bytes: int):
    """torch < 1.6's format: magic number, protocol, system info, the object (storages as persistent ids),
    the list of storage keys, then each storage as an int64 element count and its raw bytes."""
    size = path.stat().st_size
    if size > max_bytes:
        raise LLTError(f"{path}: {size:,} bytes, above the limit of {max_bytes:,} (--max-bytes to raise it)")
    raw = path.read_bytes()
    f = io.BytesIO(raw)

    def small_pickle(what: str):
        start = f.tell()
        n = _check_pickle(raw[start:start + (1 << 20) + 1], path, what, limit=1 << 20)
        reader = _Restricted(io.BytesIO(raw[start:start + n]), lambda sid: None)
        obj = _run(reader, path)
        f.seek(start + n)
        return obj, reader

    try:
        magic, _ = small_pickle("header")
    except LLTError:
        raise LLTError(f"{path}: not a readable checkpoint (truncated or damaged: neither a torch zip archive nor "
                       f"torch's legacy format)") from None
    if magic != LEGACY_MAGIC:
        raise LLTError(f"{path}: not a torch checkpoint (neither a zip archive nor torch's legacy format)")
    protocol, _ = small_pickle("header")
    if protocol != LEGACY_PROTOCOL:
        raise LLTError(f"{path}: legacy torch format of protocol {protocol!r}, expected {LEGACY_PROTOCOL}")
    small_pickle("header")                                   # system info (byte order, type sizes)
    buffers: dict[str, tuple[torch.Tensor, int]] = {}
    declared = [0]

    def storage(saved_id):
        kind = saved_id[0].decode() if isinstance(saved_id[0], bytes) else saved_id[0]
        if kind == "module":
            return None                                      # the original's source-code record: unused
        if kind != "storage" or len(saved_id) != 6:
            raise pickle.UnpicklingError(f"unknown persistent id {kind!r}")
        _, storage_type, key, _location, numel, view = saved_id
        if view is not None:
            raise LLTError(f"{path}: storage views (torch < 0.4) are not read")
        dtype = _dtype_of(storage_type)
        element = torch.empty((), dtype=dtype).element_size()
        if key not in buffers:
            nbytes = int(numel) * element
            declared[0] += nbytes
            if nbytes < 0 or declared[0] > size:
                raise LLTError(f"{path}: declares storages of {declared[0]:,} bytes in a file of {size:,}; refused")
            buffers[key] = (torch.empty(nbytes, dtype=torch.uint8), element)
        return _typed(buffers[key][0], dtype)

    start = f.tell()
    n = _check_pickle(raw[start:start + MAX_PICKLE_BYTES + 1], path)
    reader = _Restricted(io.BytesIO(raw[start:start + n]), storage)
    obj = _run(reader, path)
    f.seek(start + n)
    keys, _ = small_pickle("storage list")
    if not isinstance(keys, list) or set(keys) != set(buffers):
        raise LLTError(f"{path}: its storage list does not match the storages its object uses (a damaged file)")
    for key in keys:
        buffer, element = buffers[key]
        head = f.read(8)
        if len(head) != 8:
            raise LLTError(f"{path}: ends before storage {key} (a truncated file)")
        (count,) = struct.unpack("<q", head)
        if count * element != buffer.numel():
            raise LLTError(f"{path}: storage {key} holds {count} elements, its object declared {buffer.numel() // element}")
        data = f.read(buffer.numel())
        if len(data) != buffer.numel():
            raise LLTError(f"{path}: ends inside storage {key} (a truncated file)")
        if data:
            buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    return obj, sorted(reader.skipped)


# ------------------------------------------------------------------------------------------------ entry
def _check_tensors(obj, path: Path, depth: int = 0) -> None:
    """Every tensor reachable through dicts, lists and tuples addresses only its storage's elements."""
    if depth > 64:
        raise LLTError(f"{path}: nested more than 64 levels deep; refused")
    if isinstance(obj, torch.Tensor):
        check_view(obj.shape, obj.stride(), obj.storage_offset(),
                   obj.untyped_storage().nbytes() // max(obj.element_size(), 1), f"{path}: a tensor")
    elif isinstance(obj, dict):
        for v in obj.values():
            _check_tensors(v, path, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _check_tensors(v, path, depth + 1)


def read_tensors(path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[object, list[str]]:
    """(object with tensors and plain values, names of the classes skipped) of a checkpoint file, zip or
    legacy format; never runs code from it and never allocates more than the limits allow. LLTError (one
    line naming the file) for a missing, damaged, oversized or hostile file."""
    path = Path(path)
    if not path.is_file():
        raise LLTError(f"{path}: no such file")
    if max_bytes < 1:
        raise LLTError(f"--max-bytes must be positive, got {max_bytes}")
    if not zipfile.is_zipfile(path):
        obj, skipped = _read_legacy(path, max_bytes)
    else:
        archive = check_zip(path, max_bytes)
        with archive:
            prefix, data = _zip_pickle(path, archive)           # checked before torch's loader runs it
            try:
                obj, skipped = torch.load(path, map_location="cpu", weights_only=True), []
            except pickle.UnpicklingError:
                obj, skipped = _read_zip(path, archive, prefix, data)       # other objects beside the tensors
            except Exception as e:
                text = str(e)
                if "weights_only" not in text and "Unsupported global" not in text:
                    raise LLTError(f"{path}: not a readable checkpoint ({type(e).__name__}: "
                                   f"{text.splitlines()[0][:160] if text else ''})") from None
                obj, skipped = _read_zip(path, archive, prefix, data)
    _check_tensors(obj, path)
    return obj, skipped
