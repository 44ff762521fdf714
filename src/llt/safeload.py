"""The one reader of every torch file llt loads: tensors and plain values only, bounded memory, no code run.

Every torch-format file llt reads goes through `_read` here: the original code's checkpoints and masks
(`read_tensors`, permissive: other classes become inert placeholders) and llt's own files (`load_file`,
strict: stage and epoch checkpoints, masks, teaching sets, stream.pt, exports; a global outside the few llt
writes is refused). Both formats are read: torch's zip format (torch >= 1.6) and the legacy format (torch
< 1.6: a sequence of pickles followed by the raw storages, what the original code's `torch.save` wrote under
the torch 1.4/1.5 its README allows). torch's own loader never runs: its `weights_only` allow-list admits
calls that allocate a size taken from the file (`bytearray(n)`, `torch.storage.UntypedStorage(n)`,
`torch.FloatTensor(n)`), so llt decides every entry of that list itself (TORCH_ALLOW_LIST_DECISIONS; a test
fails when an installed torch adds one llt has not decided).

No allocation whose size comes from the file is made before it is checked:
- the file's size against `max_bytes` (DEFAULT_MAX_BYTES, a few times the largest PreAct-ResNet-18
  checkpoint with its optimizer); a zip's entry count and central-directory size (read from its end record
  before zipfile parses the directory); its entries stored, not compressed (as torch writes them), their
  declared sizes together within `max_bytes` and within the file;
- the pickle, opcode by opcode (pickletools), before it is run: at most MAX_PICKLE_BYTES long (so that the
  objects it can build are bounded), no length beyond the bytes that follow it (BINBYTES8, BYTEARRAY8,
  BINUNICODE8, LONG4, FRAME, ...), no integer over MAX_INT_BITS bits, no memo index beyond MAX_MEMO (a memo index is
  an allocation in C's unpickler, which grows its memo table to it; the CIFAR reader uses that one);
- every storage against the bytes the file holds (each read once, however often the pickle names it), and
  every tensor's size, strides and offset against its storage: no view may address more elements than its
  storage holds (a stride-0 view of one float "holding" 10^9 elements is refused).

The unpickler is Python's own (pickle._Unpickler) with BUILD allowed only on placeholders (on a tensor it
would call Tensor.__setstate__, which resizes the storage to a size from the file), dict keys and set
elements restricted to strings and numbers (hashing a tuple shared 2^60 ways takes forever), one class per
global name and at most MAX_GLOBALS of them; values from the file are never formatted into messages.

What is rebuilt: tensors (`torch._utils._rebuild_tensor(_v2)`, `_rebuild_parameter*`) over the file's
storages, dtypes and, for foreign files, `torch.device`, `torch.Size`, `collections.OrderedDict` and
`collections.defaultdict` (optimizer state, as an empty dict). Storage classes are names of dtypes, never
called. In a foreign file, every other class becomes an inert, named placeholder (reported as skipped,
e.g. `torch.optim.sgd.SGD`); calling one, which is how a crafted pickle runs `os.system` or `eval`, and also
how it would allocate (`bytearray(n)`), is refused.

Every refusal is an LLTError of one line naming the file and the reason.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import struct
import warnings
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path

import torch

from llt.errors import LLTError

DEFAULT_MAX_BYTES = 512 * 1024 * 1024    # full-width dense checkpoint with SGD momentum: about 90 MB
MAX_PICKLE_BYTES = 1024 * 1024          # the largest llt pickle (an epoch checkpoint with its optimizer) is 35 kB
MAX_MEMO = 1 << 20                       # memo indices: one per object at most, far fewer than the pickle's bytes
MAX_ZIP_ENTRIES = 100_000                # an llt checkpoint has one entry per tensor (a few hundred)
MAX_ZIP_DIRECTORY = 8 * 1024 * 1024      # bytes of central directory zipfile parses (about 150,000 entries at most)
MAX_GLOBALS = 1_000                      # distinct globals one file may name
MAX_INT_BITS = 128                     # the legacy format's magic number has 77 bits
MAX_OBJECTS = 1_000_000                  # containers and tensors walked when checking what was read
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
_CHUNK = 1 << 20

_STORAGE_DTYPES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
                   "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool}


_DTYPES = {k: v for k, v in vars(torch).items() if isinstance(v, torch.dtype)}   # vars: no lazy torch imports


def _text(value, limit: int = 80) -> str:
    """A value from the file, safe to put in a one-line message: short printable strings and numbers as
    they are, anything else by its type (formatting a shared structure from a file can take forever)."""
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value[:limit]).decode("latin-1")
    if isinstance(value, str):
        return value if value.isprintable() and len(value) <= limit else repr(value[:limit]) + ("..." if len(value) > limit else "")
    if isinstance(value, (bool, float)) or value is None:
        return repr(value)
    if isinstance(value, int):
        return str(value) if value.bit_length() <= 128 else f"an integer of {value.bit_length()} bits"
    return f"a {type(value).__name__}"


class _StorageType:
    """What a storage class named in the file stands for: the dtype of the storage it describes. Calling it
    (`torch.FloatStorage(10**9)`, an allocation of a size from the file) is refused."""

    def __init__(self, qualname: str, dtype: torch.dtype):
        self.qualname, self.dtype = qualname, dtype

    def __call__(self, *args, **kwargs):
        raise LLTError(f"refusing to call {self.qualname} while reading a checkpoint (a storage is read from the "
                       f"file's own bytes, never built from a size in its pickle)")

    def __reduce__(self):
        raise TypeError("not picklable")


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
    return storage._size()                # noqa: SLF001 (the public size() warns that TypedStorage is deprecated)


def check_view(size, stride, offset: int, available: int, what: str = "a tensor") -> None:
    """Refuse a view that addresses elements outside its storage or more elements than the storage holds."""
    try:
        size, stride, offset = tuple(int(s) for s in size), tuple(int(s) for s in stride), int(offset)
    except (TypeError, ValueError):
        raise LLTError(f"{what}: malformed view (its size, stride or offset is not a list of integers)") from None
    if (len(size) != len(stride) or len(size) > 64 or any(s < 0 for s in size) or any(s < 0 for s in stride)
            or offset < 0):
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
    if not isinstance(storage, torch.storage.TypedStorage):
        raise LLTError("a tensor is rebuilt over something that is not one of the file's storages; refused")
    check_view(size, stride, storage_offset, _storage_elements(storage))
    t = torch.empty((0,), dtype=storage.dtype)
    t.set_(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))
    return t


def _rebuild_parameter(data, *rest):
    if not isinstance(data, torch.Tensor):
        raise LLTError("a parameter is rebuilt from something that is not a tensor; refused")
    return data


# What every entry of torch's `weights_only` allow-list is to llt. "rebuilt": llt rebuilds it with its own
# bounded code; "storage": a storage class, read as the dtype it names, never called; "dtype": a value;
# "placeholder": refused when called, inert otherwise (foreign files only; llt's own files refuse it outright).
# A torch that adds an entry fails tests/test_corpus.py until it is decided here.
_REBUILT = {"torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter",
            "torch._utils._rebuild_parameter_with_state", "collections.OrderedDict", "torch.Size", "torch.device"}


def decision(qualname: str) -> str:
    """llt's decision for a global of torch's weights_only allow-list (see TORCH_ALLOW_LIST_DECISIONS)."""
    module, _, name = qualname.rpartition(".")
    if qualname in _REBUILT:
        return "rebuilt"
    if module == "torch" and name in _STORAGE_DTYPES or qualname in ("torch.storage.UntypedStorage",):
        return "storage"
    if module == "torch" and name in _DTYPES:
        return "dtype"
    return "placeholder"


# The allow-list of torch 2.13 (torch._weights_only_unpickler._get_allowed_globals), as llt decided it.
TORCH_ALLOW_LIST = (
    "_codecs.encode builtins.bytearray builtins.complex builtins.set collections.Counter collections.OrderedDict "
    "torch.BFloat16Storage torch.BFloat16Tensor torch.BoolStorage torch.BoolTensor torch.ByteStorage "
    "torch.ByteTensor torch.CharStorage torch.CharTensor torch.ComplexDoubleStorage torch.ComplexFloatStorage "
    "torch.DoubleStorage torch.DoubleTensor torch.FloatStorage torch.FloatTensor torch.HalfStorage torch.HalfTensor "
    "torch.IntStorage torch.IntTensor torch.LongStorage torch.LongTensor torch.QInt32Storage torch.QInt8Storage "
    "torch.QUInt2x4Storage torch.QUInt4x2Storage torch.QUInt8Storage torch.ShortStorage torch.ShortTensor "
    "torch.Size torch.Tensor torch._tensor._rebuild_from_type_v2 torch._utils._rebuild_device_tensor_from_cpu_tensor "
    "torch._utils._rebuild_device_tensor_from_numpy torch._utils._rebuild_meta_tensor_no_storage "
    "torch._utils._rebuild_nested_tensor torch._utils._rebuild_parameter torch._utils._rebuild_parameter_with_state "
    "torch._utils._rebuild_qtensor torch._utils._rebuild_sparse_tensor torch._utils._rebuild_tensor "
    "torch._utils._rebuild_tensor_v2 torch._utils._rebuild_tensor_v3 torch._utils._rebuild_wrapper_subclass "
    "torch.bfloat16 torch.bits16 torch.bits1x8 torch.bits2x4 torch.bits4x2 torch.bits8 torch.bool torch.complex128 "
    "torch.complex32 torch.complex64 torch.cuda.BFloat16Storage torch.cuda.BFloat16Tensor torch.cuda.BoolStorage "
    "torch.cuda.BoolTensor torch.cuda.ByteStorage torch.cuda.ByteTensor torch.cuda.CharStorage torch.cuda.CharTensor "
    "torch.cuda.ComplexDoubleStorage torch.cuda.ComplexFloatStorage torch.cuda.DoubleStorage torch.cuda.DoubleTensor "
    "torch.cuda.FloatStorage torch.cuda.FloatTensor torch.cuda.HalfStorage torch.cuda.HalfTensor "
    "torch.cuda.IntStorage torch.cuda.IntTensor torch.cuda.LongStorage torch.cuda.LongTensor torch.cuda.ShortStorage "
    "torch.cuda.ShortTensor torch.cuda.sparse.BFloat16Tensor torch.cuda.sparse.ByteTensor torch.cuda.sparse.CharTensor "
    "torch.cuda.sparse.DoubleTensor torch.cuda.sparse.FloatTensor torch.cuda.sparse.HalfTensor "
    "torch.cuda.sparse.IntTensor torch.cuda.sparse.LongTensor torch.cuda.sparse.ShortTensor torch.device "
    "torch.float16 torch.float32 torch.float4_e2m1fn_x2 torch.float64 torch.float8_e4m3fn torch.float8_e4m3fnuz "
    "torch.float8_e5m2 torch.float8_e5m2fnuz torch.float8_e8m0fnu torch.int1 torch.int16 torch.int2 torch.int3 "
    "torch.int32 torch.int4 torch.int5 torch.int6 torch.int64 torch.int7 torch.int8 torch.nn.parameter.Parameter "
    "torch.per_channel_affine torch.per_channel_affine_float_qparams torch.per_channel_symmetric "
    "torch.per_tensor_affine torch.per_tensor_symmetric torch.qint32 torch.qint8 torch.quint2x4 torch.quint4x2 "
    "torch.quint8 torch.serialization._get_layout torch.sparse.BFloat16Tensor torch.sparse.ByteTensor "
    "torch.sparse.CharTensor torch.sparse.DoubleTensor torch.sparse.FloatTensor torch.sparse.HalfTensor "
    "torch.sparse.IntTensor torch.sparse.LongTensor torch.sparse.ShortTensor torch.storage.TypedStorage "
    "torch.storage.UntypedStorage torch.uint1 torch.uint16 torch.uint2 torch.uint3 torch.uint32 torch.uint4 "
    "torch.uint5 torch.uint6 torch.uint64 torch.uint7 torch.uint8").split()
TORCH_ALLOW_LIST_DECISIONS = {g: decision(g) for g in TORCH_ALLOW_LIST}


def _find(module: str, name: str, strict: bool):
    """What a global named in the file resolves to: llt's own rebuild functions, storage-type tokens, dtypes,
    or (foreign files only) an inert placeholder. Strict mode refuses anything llt's own files never hold."""
    if not isinstance(module, str) or not isinstance(name, str):
        raise LLTError("names a global that is not a string; refused")
    full = f"{module}.{name}"
    if full in ("torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor"):
        return _rebuild_tensor
    if full in ("torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state"):
        return _rebuild_parameter
    if full == "collections.OrderedDict":
        return _ordered_dict
    if module == "torch" and name in _STORAGE_DTYPES:
        return _StorageType(full, _STORAGE_DTYPES[name])
    if full == "torch.storage.UntypedStorage":
        return _StorageType(full, torch.uint8)
    if module == "torch" and name in _DTYPES:
        return _DTYPES[name]
    if strict:
        raise LLTError(f"names {_text(full)}, which llt's own files never hold; refused")
    if full == "collections.defaultdict":
        return lambda *args: {}
    if full == "torch.device":
        return torch.device
    if full == "torch.Size":
        return torch.Size
    return _placeholder(_text(full))


def _ordered_dict(*args):
    """collections.OrderedDict as torch pickles it: built empty, filled by SETITEMS (whose keys are checked)."""
    if args:
        raise LLTError("builds an OrderedDict from arguments, which torch's files never do; refused")
    return OrderedDict()


_SCALARS = (str, bytes, int, float, bool, type(None))


class _Restricted(pickle._Unpickler):             # noqa: SLF001 (the Python unpickler: its opcodes can be replaced)
    """The restricted unpickler; `storage(saved_id)` resolves persistent ids (format-specific). Beside
    find_class, five opcodes are replaced: BUILD (an object's state) applies only to placeholders and to a
    state_dict's attributes (on a tensor it would call Tensor.__setstate__, which resizes its storage to a
    size from the file); dict keys (SETITEM, SETITEMS) and set elements (ADDITEMS, FROZENSET) must hash
    cheaply (hashing a shared tuple structure from a file can take forever)."""

    dispatch = dict(pickle._Unpickler.dispatch)   # noqa: SLF001

    def __init__(self, stream, storage, strict: bool):
        super().__init__(stream)
        self.storage, self.strict, self.skipped, self.globals = storage, strict, set(), {}

    def find_class(self, module: str, name: str):
        key = (module, name)
        if key not in self.globals:
            if len(self.globals) >= MAX_GLOBALS:
                raise LLTError(f"names more than {MAX_GLOBALS:,} globals; refused")
            found = _find(module, name, self.strict)
            if isinstance(found, _Refuse) and module not in ("builtins", "__builtin__"):
                self.skipped.add(found.qualname)   # a builtin named as a value (defaultdict's factory) is not
            self.globals[key] = found              # a skipped object; calling it is still refused
        return self.globals[key]

    def persistent_load(self, saved_id):
        return self.storage(saved_id)

    def _build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(type(inst), _Refuse):
            inst.state = state
        elif type(inst) is OrderedDict and isinstance(state, dict) and all(isinstance(k, str) for k in state):
            inst.__dict__.update(state)            # a state_dict's `_metadata` attribute
        else:
            raise LLTError(f"sets the state of {_text(inst)}, which only skipped objects and state_dicts may have; "
                           f"refused")

    def _keys(self, keys):
        """Keys whose hash is cheap: scalars, tensors and skipped objects (hashed by identity), and tuples of
        scalars; a nested tuple could be shared 2^60 ways and take forever to hash."""
        for k in keys:
            if isinstance(k, tuple):
                if not all(isinstance(e, _SCALARS) for e in k):
                    raise LLTError("uses a nested tuple as a dict key or set element; refused")
            elif not isinstance(k, (*_SCALARS, torch.Tensor)) and not isinstance(type(k), _Refuse):
                raise LLTError(f"uses {_text(k)} as a dict key or set element; refused")

    def _setitem(self):
        value, key = self.stack.pop(), self.stack.pop()
        self._keys((key,))
        self.stack[-1][key] = value

    def _setitems(self):
        items = self.pop_mark()
        self._keys(items[0::2])
        target = self.stack[-1]
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def _additems(self):
        items = self.pop_mark()
        self._keys(items)
        target = self.stack[-1]
        if isinstance(target, set):
            target.update(items)
        else:
            raise LLTError("adds set elements to something that is not a set; refused")

    def _frozenset(self):
        items = self.pop_mark()
        self._keys(items)
        self.append(frozenset(items))

    dispatch[pickle.BUILD[0]] = _build
    dispatch[pickle.SETITEM[0]] = _setitem
    dispatch[pickle.SETITEMS[0]] = _setitems
    dispatch[pickle.ADDITEMS[0]] = _additems
    dispatch[pickle.FROZENSET[0]] = _frozenset


_LENGTH_OPS = {"FRAME"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_INT_OPS = {"INT", "LONG", "LONG1", "LONG4", "BININT", "BININT1", "BININT2"}


def _check_pickle(data: bytes, path: Path, what: str = "pickle", limit: int = MAX_PICKLE_BYTES) -> int:
    """Walk the pickle's opcodes without running them; its length (bytes up to STOP). Refuses a pickle
    longer than `limit` bytes, one that is not a pickle, a length beyond the bytes that follow it, an
    integer over MAX_INT_BITS bits and a memo index over MAX_MEMO (C's unpickler grows its memo table to it)."""
    end = 0
    try:
        for op, arg, pos in pickletools.genops(io.BytesIO(data)):
            end = pos
            if pos > limit:
                raise LLTError(f"{path}: its {what} is over {limit:,} bytes; refused (a checkpoint's pickle "
                               f"holds names and small values, its tensors are stored apart)")
            if op.name in _LENGTH_OPS and arg > len(data) - pos:
                raise LLTError(f"{path}: its {what} declares a {op.name} of {arg:,} bytes with {len(data) - pos:,} "
                               f"left; refused")
            if op.name in _INT_OPS and isinstance(arg, int) and arg.bit_length() > MAX_INT_BITS:
                raise LLTError(f"{path}: its {what} holds an integer of {arg.bit_length():,} bits; refused "
                               f"(sizes and counts fit in {MAX_INT_BITS})")
            if op.name in _PUT_OPS and not 0 <= arg < MAX_MEMO:
                raise LLTError(f"{path}: its {what} stores to memo index {arg:,} (at most {MAX_MEMO:,}); refused")
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
    except RecursionError:
        raise LLTError(f"{path}: cannot read (nested too deeply)") from None
    except Exception as e:    # a KeyError's text is the repr of its key, which may be a huge shared structure
        text = "" if isinstance(e, (KeyError, LookupError)) else str(e)
        msg = text.splitlines()[0][:160] if text else ""
        raise LLTError(f"{path}: cannot read ({type(e).__name__}: {msg})") from None


def _storage_dtype(storage_type, path: Path) -> torch.dtype:
    if not isinstance(storage_type, _StorageType):
        what = storage_type.qualname if isinstance(type(storage_type), _Refuse) else _text(storage_type)
        raise LLTError(f"{path}: a storage of type {what}, which llt does not read")
    return storage_type.dtype


def _typed(buffer: torch.Tensor, dtype: torch.dtype):
    with warnings.catch_warnings():      # TypedStorage is what torch's own loader builds here
        warnings.simplefilter("ignore", UserWarning)
        return torch.storage.TypedStorage(wrap_storage=buffer.untyped_storage(), dtype=dtype, _internal=True)


def _fill(buffer: torch.Tensor, read, what: str) -> None:
    """Read buffer.numel() bytes with `read(n)` into `buffer`, one chunk at a time (no second copy)."""
    view, done = buffer.numpy(), 0
    while done < len(view):
        chunk = read(min(_CHUNK, len(view) - done))
        if not chunk:
            raise LLTError(f"{what} ends early (a truncated file)")
        view[done:done + len(chunk)] = memoryview(chunk).cast("B")
        done += len(chunk)


# ------------------------------------------------------------------------------------------------ zip
def check_zip(path: Path, max_bytes: int) -> zipfile.ZipFile:
    """The archive, once its entry count, central directory and declared uncompressed sizes are bounded
    (the end record is read before zipfile parses the directory, whose parsed form costs far more memory
    than its bytes)."""
    try:
        with open(path, "rb") as f:
            end = zipfile._EndRecData(f)          # noqa: SLF001 (the end record, as zipfile itself reads it)
    except (OSError, zipfile.BadZipFile, struct.error, ValueError):
        end = None
    if not end:
        raise LLTError(f"{path}: not a torch checkpoint (a damaged zip archive)")
    entries, directory = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]
    if entries > MAX_ZIP_ENTRIES or directory > MAX_ZIP_DIRECTORY:
        raise LLTError(f"{path}: a zip archive of {entries:,} entries ({directory:,} bytes of directory), above the "
                       f"limits of {MAX_ZIP_ENTRIES:,} entries and {MAX_ZIP_DIRECTORY:,} bytes; refused")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, struct.error, EOFError) as e:
        raise LLTError(f"{path}: not a torch checkpoint (a damaged zip archive: {str(e)[:120]})") from None
    if len(archive.infolist()) > MAX_ZIP_ENTRIES:
        archive.close()
        raise LLTError(f"{path}: a zip archive of more than {MAX_ZIP_ENTRIES:,} entries; refused")
    total = sum(i.file_size for i in archive.infolist())
    if total > max_bytes:
        archive.close()
        raise LLTError(f"{path}: declares {total:,} bytes once uncompressed, above the limit of {max_bytes:,} "
                       f"(--max-bytes to raise it for a file you trust to be that large)")
    if total > path.stat().st_size:
        archive.close()
        raise LLTError(f"{path}: its entries declare {total:,} bytes in a file of {path.stat().st_size:,}; refused")
    packed = [i for i in archive.infolist() if i.compress_type != zipfile.ZIP_STORED or i.compress_size != i.file_size]
    if packed:
        archive.close()
        raise LLTError(f"{path}: entry {_text(packed[0].filename)} is compressed; torch stores every entry as it is, and "
                       f"a compressed entry can expand far beyond its declared size; refused")
    return archive


def _read_zip(path: Path, archive: zipfile.ZipFile, strict: bool):
    names = [n for n in archive.namelist() if n.endswith("/data.pkl")]
    if not names:
        raise LLTError(f"{path}: no data.pkl in the archive (not a torch checkpoint)")
    prefix = names[0][: -len("/data.pkl")]
    if archive.getinfo(names[0]).file_size > MAX_PICKLE_BYTES:
        raise LLTError(f"{path}: its pickle is over {MAX_PICKLE_BYTES:,} bytes; refused (a checkpoint's pickle "
                       f"holds names and small values, its tensors are stored apart)")
    order = f"{prefix}/byteorder"
    if order in archive.namelist() and archive.read(order).strip() not in (b"little", b""):
        raise LLTError(f"{path}: written on a big-endian machine; llt reads little-endian checkpoints only")
    data = archive.read(names[0])
    _check_pickle(data, path)
    buffers: dict[str, torch.Tensor] = {}

    def storage(saved_id):
        if not isinstance(saved_id, tuple) or len(saved_id) < 5 or saved_id[0] != "storage":
            raise LLTError(f"an unknown persistent id ({_text(saved_id)}); refused")
        _, storage_type, key, _location, _numel = saved_id[:5]
        dtype = _storage_dtype(storage_type, path)
        if not isinstance(key, str):
            raise LLTError(f"{path}: a storage key that is not a string ({_text(key)}); refused")
        name = f"{prefix}/data/{key}"
        if name not in buffers:               # a storage named twice is read once
            try:
                info = archive.getinfo(name)
            except KeyError:
                raise LLTError(f"{path}: its pickle names storage {_text(key)}, which the archive lacks") from None
            buffers[name] = torch.empty(info.file_size, dtype=torch.uint8)   # declared sizes were bounded
            with archive.open(info) as f:
                _fill(buffers[name], f.read, f"{path}: storage {_text(key)}")
        return _typed(buffers[name], dtype)

    reader = _Restricted(io.BytesIO(data), storage, strict)
    return _run(reader, path), sorted(reader.skipped)


# ------------------------------------------------------------------------------------------------ legacy
def _read_legacy(path: Path, f, size: int, strict: bool):
    """torch < 1.6's format: magic number, protocol, system info, the object (storages as persistent ids),
    the list of storage keys, then each storage as an int64 element count and its raw bytes."""
    def small_pickle(what: str, limit: int = 1 << 20, storage=lambda sid: None):
        start = f.tell()
        window = f.read(limit + 1)
        n = _check_pickle(window, path, what, limit=limit)
        reader = _Restricted(io.BytesIO(window[:n]), storage, strict)
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
        raise LLTError(f"{path}: legacy torch format of protocol {_text(protocol)}, expected {LEGACY_PROTOCOL}")
    info, _ = small_pickle("header")                         # system info (byte order, type sizes)
    if isinstance(info, dict) and info.get("little_endian") is False:
        raise LLTError(f"{path}: written on a big-endian machine; llt reads little-endian checkpoints only")
    buffers: dict[str, tuple[torch.Tensor, int]] = {}
    declared = [0]

    def storage(saved_id):
        kind = saved_id[0].decode() if isinstance(saved_id, tuple) and saved_id and isinstance(saved_id[0], bytes) \
            else (saved_id[0] if isinstance(saved_id, tuple) and saved_id else None)
        if kind == "module":
            return None                                      # the original's source-code record: unused
        if kind != "storage" or len(saved_id) != 6:
            raise LLTError(f"an unknown persistent id ({_text(kind)}); refused")
        _, storage_type, key, _location, numel, view = saved_id
        if view is not None:
            raise LLTError(f"{path}: storage views (torch < 0.4) are not read")
        dtype = _storage_dtype(storage_type, path)
        element = torch.empty((), dtype=dtype).element_size()
        if not isinstance(key, (str, bytes)) or not isinstance(numel, int):
            raise LLTError(f"{path}: a malformed storage record")
        if key not in buffers:
            nbytes = numel * element
            declared[0] += nbytes
            if nbytes < 0 or declared[0] > size:
                raise LLTError(f"{path}: declares storages of {declared[0]:,} bytes in a file of {size:,}; refused")
            buffers[key] = (torch.empty(nbytes, dtype=torch.uint8), element)
        return _typed(buffers[key][0], dtype)

    obj, reader = small_pickle("pickle", MAX_PICKLE_BYTES, storage)
    keys, _ = small_pickle("storage list")
    if not isinstance(keys, list) or not all(isinstance(k, (str, bytes)) for k in keys) or \
            len(keys) != len(buffers) or set(keys) != set(buffers):
        raise LLTError(f"{path}: its storage list does not match the storages its object uses (a damaged file)")
    for key in keys:
        buffer, element = buffers[key]
        head = f.read(8)
        if len(head) != 8:
            raise LLTError(f"{path}: ends before storage {_text(key)} (a truncated file)")
        (count,) = struct.unpack("<q", head)
        if count * element != buffer.numel():
            raise LLTError(f"{path}: storage {_text(key)} holds {count} elements, its object declared "
                           f"{buffer.numel() // element}")
        _fill(buffer, f.read, f"{path}: storage {_text(key)}")
    return obj, sorted(reader.skipped)


# ------------------------------------------------------------------------------------------------ entry
def _check_tensors(obj, path: Path) -> None:
    """Every tensor reachable through dicts, lists and tuples addresses only its storage's elements; each
    object is visited once (a pickle can share one list a million times), at most MAX_OBJECTS in all."""
    seen, todo = set(), [(obj, 0)]
    while todo:
        item, depth = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if len(seen) > MAX_OBJECTS:
            raise LLTError(f"{path}: holds more than {MAX_OBJECTS:,} objects; refused")
        if depth > 64:
            raise LLTError(f"{path}: nested more than 64 levels deep; refused")
        if isinstance(item, torch.Tensor):
            check_view(item.shape, item.stride(), item.storage_offset(),
                       item.untyped_storage().nbytes() // max(item.element_size(), 1), f"{path}: a tensor")
        elif isinstance(item, dict):
            todo.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, (list, tuple)):
            todo.extend((v, depth + 1) for v in item)


def _read(path: str | Path, max_bytes: int, strict: bool) -> tuple[object, list[str]]:
    """The one reader: (object, names of skipped classes) of a torch file of either format."""
    path = Path(path)
    if not path.is_file():
        raise LLTError(f"{path}: no such file")
    if max_bytes < 1:
        raise LLTError(f"--max-bytes must be positive, got {max_bytes}")
    size = path.stat().st_size
    if size > max_bytes:
        raise LLTError(f"{path}: {size:,} bytes, above the limit of {max_bytes:,} (--max-bytes to raise it for a file "
                       f"you trust to be that large)")
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as e:
        raise LLTError(f"{path}: cannot read ({e.strerror})") from None
    with warnings.catch_warnings():              # torch's TypedStorage deprecation note is not for the user
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
        if is_zip:
            archive = check_zip(path, max_bytes)
            with archive:
                try:
                    obj, skipped = _read_zip(path, archive, strict)
                except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError, ValueError,
                        KeyError, struct.error, zlib.error) as e:    # a damaged archive (ValueError: a name in
                    raise LLTError(f"{path}: not a readable checkpoint (a damaged zip archive: "   # bad UTF-8)
                                   f"{type(e).__name__}: {str(e)[:120]})") from None
        else:
            with open(path, "rb") as f:
                obj, skipped = _read_legacy(path, f, size, strict)
        _check_tensors(obj, path)
    return obj, skipped


def read_tensors(path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[object, list[str]]:
    """(object with tensors and plain values, names of the classes skipped) of a checkpoint file nobody
    vouches for (the original's checkpoints and masks, exports, any file given to `llt import`/`eval`), zip
    or legacy format; never runs code from it and never allocates more than the limits allow. LLTError (one
    line naming the file) for a missing, damaged, oversized or hostile file."""
    return _read(path, max_bytes, strict=False)


def load_file(path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES):
    """The object in one of llt's own files (checkpoints, masks, stream.pt, teaching sets, exports): only what
    llt writes (tensors, containers, strings and numbers) is accepted; anything else is refused in one line."""
    return _read(path, max_bytes, strict=True)[0]
