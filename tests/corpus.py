"""The hostile corpus, generated (nothing binary is committed): one pickle for every global of torch's
`weights_only` allow-list, each called with a size far over llt's cap, and one for every pickle opcode that
allocates from a length or an integer in the file, each declaring a size far over the cap; every payload in
torch's zip layout and in its legacy (torch < 1.6) layout. `write_corpus(folder)` writes them all."""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from llt.safeload import LEGACY_MAGIC, LEGACY_PROTOCOL, TORCH_ALLOW_LIST

# The run every run-directory command is tried on, and the preset given with `llt eval --checkpoint`
# (tests/test_corpus.py and scripts/hostile_corpus.py).
PRESET = ["--preset", "demo", "--set", "model.width=4", "--set", "data.num_tasks=2"]
TINY_BU = ["--set", "run.method=bu", "--set", "model.width=4", "--set", "train.epochs=1", "--set", "train.milestones=[1]",
           "--set", "data.num_tasks=2", "--set", "data.exemplars_per_class=5", "--set", "train.batch_size=32",
           "--set", "prune.rate=0.2", "--set", "prune.finetune_epochs=1", "--set", "prune.max_rounds=1",
           "--set", "prune.retrain_after=false"]


def refused_in_one_line(code: int, text: str, changed: list, names_file: bool) -> bool:
    """What every call on a corpus file must give: exit status 2, one line that names the file, no
    traceback, no file created or changed."""
    lines = [line for line in text.splitlines() if line.strip()]
    return code == 2 and len(lines) == 1 and not changed and "Traceback" not in text and names_file


HUGE = 3 << 30            # 3 GiB: six times llt's default cap of 512 MiB
PROTO = b"\x80\x04"
STOP = b"."


def _int(n: int) -> bytes:
    """The opcodes that push integer `n` (LONG1 for anything over 31 bits)."""
    return pickle.dumps(n, protocol=2)[2:-1]


def call_global(qualname: str, n: int = HUGE) -> bytes:
    """A pickle that calls `qualname(n)` (GLOBAL, the integer, TUPLE1, REDUCE): how a file would ask a loader
    that trusts the global to allocate `n` bytes or elements."""
    module, _, name = qualname.rpartition(".")
    return b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n" + _int(n) + b"\x85R" + STOP


# Opcodes that take a length or an integer from the file and would allocate from it, each declaring HUGE
# (or the largest its field holds) with only a few bytes after it.
OPCODES = {
    "BINBYTES": b"\x80\x03B" + struct.pack("<I", 0xFFFFFFFF) + b"xx" + STOP,
    "BINBYTES8": PROTO + b"\x8e" + struct.pack("<Q", HUGE) + b"xx" + STOP,
    "BYTEARRAY8": b"\x80\x05\x96" + struct.pack("<Q", HUGE) + b"xx" + STOP,
    "BINUNICODE": PROTO + b"X" + struct.pack("<I", 0xFFFFFFFF) + b"xx" + STOP,
    "BINUNICODE8": PROTO + b"\x8d" + struct.pack("<Q", HUGE) + b"xx" + STOP,
    "BINSTRING": b"\x80\x02T" + struct.pack("<i", 0x7FFFFFFF) + b"xx" + STOP,
    "LONG4": b"\x80\x02\x8b" + struct.pack("<i", 0x7FFFFFFF) + b"xx" + STOP,
    "LONG1-huge-int": b"\x80\x02\x8a\xff" + b"\xff" * 254 + b"\x7f" + STOP,
    "FRAME": PROTO + b"\x95" + struct.pack("<Q", HUGE) + b"}" + STOP,
    "LONG_BINPUT": PROTO + b"}r" + struct.pack("<I", 0xFFFFFFF0) + STOP,
    "PUT": b"(dp4294967280\n" + STOP,
    "INT-text": b"I" + b"9" * 5000 + b"\n" + STOP,
}


def _dag(depth: int = 60) -> bytes:
    """Opcodes that push a tuple t_depth with t_0 = (1,), t_i = (t_{i-1}, t_{i-1}): 2^depth paths in a few
    hundred bytes (each t_i memoized and popped, then fetched twice for the next)."""
    out = b"K\x01\x85q\x000"                                   # (1,) -> memo 0
    for i in range(1, depth + 1):
        out += b"h" + bytes([i - 1]) + b"h" + bytes([i - 1]) + b"\x86q" + bytes([i]) + b"0"
    return out + b"h" + bytes([depth])


class _Storage:
    pass


_ONE_FLOAT = _Storage()


class _Resized:
    """A tensor over one float whose pickled state (BUILD) asks for 2^28 elements of the same storage:
    torch's Tensor.__setstate__ would resize the storage to 1 GiB."""

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, (_ONE_FLOAT, 0, (1,), (1,), False, OrderedDict()),
                (_ONE_FLOAT, 0, (1 << 28,), (1,)))


def tensor_resized_by_build(layout: str) -> bytes:
    """The _Resized tensor in a real file of `layout` (its one storage holds one float)."""
    class P(pickle.Pickler):
        def persistent_id(self, obj):
            if obj is not _ONE_FLOAT:
                return None
            return ("storage", torch.FloatStorage, "0", "cpu", 1) + ((None,) if layout == "legacy" else ())

    buf = io.BytesIO()
    P(buf, protocol=2).dump({"w": _Resized()})
    if layout == "zip":
        return as_zip(buf.getvalue(), {"0": struct.pack("<f", 1.0)})
    return as_legacy(buf.getvalue(), {"0": struct.pack("<f", 1.0)})


STRUCTURES = {
    "tensor-BUILD-resize": tensor_resized_by_build,
    "shared-tuple-as-dict-key": b"\x80\x02}" + _dag() + b"K\x00s.",
    "shared-tuple-as-persistent-id": b"\x80\x02" + _dag() + b"Q.",
    "shared-tuple-as-set": b"\x80\x04\x8f(" + _dag() + b"\x90.",
    "globals-flood": b"\x80\x04(" + b"".join(b"\x8c\x06module\x8c\x05n%04d\x93" % i for i in range(2000)) + b"l.",
    "newline-in-name": b"\x80\x04\x8c\x0eos\nsystem\nfake\x8c\x01x\x93)R.",
    "OrderedDict-from-arguments": b"\x80\x02ccollections\nOrderedDict\n]K\x01K\x02\x86a\x85R.",
}


def payloads() -> dict[str, bytes]:
    """Every hostile pickle by name: `global:<qualname>` for each allow-list entry, `op:<opcode>` for each
    opcode, `struct:<name>` for each structure."""
    out = {f"global:{g}": call_global(g) for g in TORCH_ALLOW_LIST}
    out.update({f"op:{name}": body for name, body in OPCODES.items()})
    out.update({f"struct:{name}": body for name, body in STRUCTURES.items()})
    return out


def as_zip(pkl: bytes, storages: dict[str, bytes] | None = None) -> bytes:
    """`pkl` as the data.pkl of a file in torch's zip layout (with `storages` as archive/data/<key>)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        for key, raw in (storages or {}).items():
            z.writestr(f"archive/data/{key}", raw)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    return buf.getvalue()


def as_legacy(pkl: bytes, storages: dict[str, bytes] | None = None) -> bytes:
    """`pkl` as the object of a file in torch's legacy layout (magic, protocol, system info, object, keys, then
    each of `storages` (float32) as its element count and bytes)."""
    buf = io.BytesIO()
    for head in (LEGACY_MAGIC, LEGACY_PROTOCOL, {"protocol_version": LEGACY_PROTOCOL, "little_endian": True}):
        pickle.dump(head, buf, protocol=2)
    buf.write(pkl)
    pickle.dump(list(storages or {}), buf, protocol=2)
    for raw in (storages or {}).values():
        buf.write(struct.pack("<q", len(raw) // 4) + raw)
    return buf.getvalue()


def write_corpus(folder: Path) -> dict[str, Path]:
    """Every payload in both layouts under `folder`; {"<payload> [zip|legacy]": path}."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for i, (name, pkl) in enumerate(sorted(payloads().items())):
        for layout, wrap in (("zip", as_zip), ("legacy", as_legacy)):
            path = folder / f"{i:03d}-{layout}.pt"
            path.write_bytes(pkl(layout) if callable(pkl) else wrap(pkl))
            files[f"{name} [{layout}]"] = path
    return files
