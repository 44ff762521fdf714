#!/usr/bin/env python
"""Fuzz llt's one file reader (llt.safeload) with byte-level mutations of real files; print one JSON line.

Seeds: an llt stage checkpoint, an llt mask, a packed ticket export, and a checkpoint in the original code's
layout (pruned convs as weight_orig/weight_mask, an epoch number) in torch's zip and legacy formats. Each
example picks a seed and mutates it (Hypothesis draws the mutations): bytes overwritten, a slice cut out,
bytes inserted, the file truncated, or, for zip files, the same done to the pickle inside a re-built
archive (so that the mutation reaches the unpickler instead of failing the zip's checksum). Each mutated
file is read by `read_tensors` (foreign files) and `load_file` (llt's own): it must either read or be
refused by an LLTError of one line; any other exception is a failure. At the end the process's peak
resident memory is compared with the cap (1 GiB).

    scripts/fuzz_readers.py --examples 5000 --seed 1     # the long run (docs/reliability.md has its figures)
    tests/test_corpus.py runs it with a fixed seed and 150 examples.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path

import torch


def seeds(folder: Path) -> dict[str, bytes]:
    """The real files mutations start from, written by llt's own writers and by torch.save."""
    from llt.export import export_state
    from llt.models import build_model
    from llt.pruning.mask import Mask
    from llt.storage import save_checkpoint

    torch.manual_seed(0)
    model = build_model(num_tasks=2, classes_per_task=2, width=4)
    mask = Mask.ones(model)
    for name in mask.names()[:4]:
        mask.masks[name] = torch.rand_like(mask.masks[name], dtype=torch.float32) > 0.5
    mask.apply_(model)
    out = {}
    save_checkpoint(folder / "stage.pt", model.state_dict(), {"kind": "stage", "task": 1})
    mask.save(folder / "mask.pt", task=1)
    for fmt in ("packed", "llt"):
        torch.save(export_state(model, model.state_dict(), mask, fmt, torch.float16), folder / f"export-{fmt}.pt")
    original = {"epoch": 7, "best_acc": 51.5, "state_dict": {}}
    for k, v in model.state_dict().items():
        if k in mask.masks:
            original["state_dict"][f"module.{k}_orig"] = v.clone()
            original["state_dict"][f"module.{k}_mask"] = mask.masks[k].float()
        else:
            original["state_dict"][f"module.{k}"] = v
    torch.save(original, folder / "original-zip.pt")
    torch.save(original, folder / "original-legacy.pt", _use_new_zipfile_serialization=False)
    for p in sorted(folder.glob("*.pt")):
        out[p.stem] = p.read_bytes()
    return out


def rezip(data: bytes, mutate) -> bytes:
    """`data` (a zip) with its data.pkl replaced by mutate(data.pkl), every other entry as it was."""
    src = zipfile.ZipFile(io.BytesIO(data))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            body = src.read(info)
            dst.writestr(info.filename, mutate(body) if info.filename.endswith("/data.pkl") else body)
    return buf.getvalue()


def apply(data: bytes, ops: list[tuple[str, int, bytes]]) -> bytes:
    """Byte-level mutations: ("set", position, bytes), ("cut", position, length as bytes), ("insert", position,
    bytes), ("truncate", position, _); positions are taken modulo the length."""
    out = bytearray(data)
    for kind, pos, arg in ops:
        if not out:
            break
        pos %= len(out)
        if kind == "set":
            out[pos:pos + len(arg)] = arg
        elif kind == "cut":
            del out[pos:pos + 1 + (arg[0] if arg else 0)]
        elif kind == "insert":
            out[pos:pos] = arg
        elif kind == "truncate":
            del out[pos:]
    return bytes(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000, help="mutated files to try")
    parser.add_argument("--seed", type=int, default=0, help="Hypothesis seed (the same seed tries the same files)")
    args = parser.parse_args(argv)

    from hypothesis import HealthCheck, given, seed, settings
    from hypothesis import strategies as st

    from llt import safeload
    from llt.errors import LLTError

    tmp = Path(tempfile.mkdtemp(prefix="llt-fuzz-"))
    base = seeds(tmp)
    names = sorted(base)
    tally = {"tried": 0, "read": 0, "refused": 0, "failures": []}
    op = st.tuples(st.sampled_from(["set", "set", "set", "cut", "insert", "truncate"]),
                   st.integers(min_value=0, max_value=1 << 24), st.binary(min_size=1, max_size=16))

    @seed(args.seed)
    @settings(max_examples=args.examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(name=st.sampled_from(names), inside=st.booleans(), ops=st.lists(op, min_size=1, max_size=4))
    def one(name, inside, ops):
        data = base[name]
        if inside and data[:2] == b"PK":
            data = rezip(data, lambda pkl: apply(pkl, ops))
        else:
            data = apply(data, ops)
        path = tmp / "mutated.pt"
        path.write_bytes(data)
        tally["tried"] += 1
        for reader in (safeload.read_tensors, safeload.load_file):
            try:
                reader(path)
                tally["read"] += 1
            except LLTError as e:
                text = str(e)
                if "\n" in text.strip() or not text.startswith(str(path)) and "--max-bytes" not in text:
                    tally["failures"].append({"seed_file": name, "ops": repr(ops)[:300], "error": text[:300]})
                tally["refused"] += 1
            except Exception:          # noqa: BLE001 (anything but a one-line refusal is a failure)
                tally["failures"].append({"seed_file": name, "ops": repr(ops)[:300],
                                          "error": traceback.format_exc().strip().splitlines()[-1][:300]})

    start = time.perf_counter()
    one()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"examples": args.examples, "seed": args.seed, "files_tried": tally["tried"],
                      "reads": tally["read"], "refusals": tally["refused"], "failures": tally["failures"][:20],
                      "failure_count": len(tally["failures"]), "peak_rss_bytes": peak,
                      "seconds": round(time.perf_counter() - start, 1), "seeds": {k: len(v) for k, v in base.items()}}))
    return 1 if tally["failures"] or peak > 1 << 30 else 0


if __name__ == "__main__":
    sys.exit(main())
