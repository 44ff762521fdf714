"""The hostile corpus, generated (nothing binary is committed): one pickle for every global of torch's
`weights_only` allow-list, each called with a size far over llt's cap, and one for every pickle opcode that
allocates from a length or an integer in the file, each declaring a size far over the cap; every payload in
torch's zip layout and in its legacy (torch < 1.6) layout. `write_corpus(folder)` writes them all."""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from pathlib import Path

from llt.safeload import LEGACY_MAGIC, LEGACY_PROTOCOL, TORCH_ALLOW_LIST

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


def payloads() -> dict[str, bytes]:
    """Every hostile pickle by name: `global:<qualname>` for each allow-list entry, `op:<opcode>` for each opcode."""
    out = {f"global:{g}": call_global(g) for g in TORCH_ALLOW_LIST}
    out.update({f"op:{name}": body for name, body in OPCODES.items()})
    return out


def as_zip(pkl: bytes) -> bytes:
    """`pkl` as the data.pkl of a file in torch's zip layout."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    return buf.getvalue()


def as_legacy(pkl: bytes) -> bytes:
    """`pkl` as the object of a file in torch's legacy layout (magic, protocol, system info, object, keys)."""
    buf = io.BytesIO()
    for head in (LEGACY_MAGIC, LEGACY_PROTOCOL, {"protocol_version": LEGACY_PROTOCOL, "little_endian": True}):
        pickle.dump(head, buf, protocol=2)
    buf.write(pkl)
    pickle.dump([], buf, protocol=2)
    return buf.getvalue()


def write_corpus(folder: Path) -> dict[str, Path]:
    """Every payload in both layouts under `folder`; {"<payload> [zip|legacy]": path}."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for i, (name, pkl) in enumerate(sorted(payloads().items())):
        for layout, wrap in (("zip", as_zip), ("legacy", as_legacy)):
            path = folder / f"{i:03d}-{layout}.pt"
            path.write_bytes(wrap(pkl))
            files[f"{name} [{layout}]"] = path
    return files
