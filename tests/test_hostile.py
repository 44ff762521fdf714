"""Hostile and legacy checkpoint files: each hostile file is refused with one line by `llt eval --checkpoint`,
`llt import` and `llt.load_ticket`, in a child process under an address-space limit, without creating the
sentinel file its payload would create and with the child's peak resident memory under 1 GB. A legacy
(torch < 1.6) checkpoint in the original's layout, with a pickled optimizer, reads like its zip twin."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import Evil
from test_interop import eval_line, original_checkpoint, tiny_ticket

from llt.cli import main
from llt.errors import LLTError
from llt.interop import read_tensors
from llt.safeload import DEFAULT_MAX_BYTES, check_view

REPO = Path(__file__).resolve().parents[1]
TINY = ["--preset", "demo", "--set", "model.width=4", "--set", "data.num_tasks=3"]
GB = 1 << 30

# Runs one command in a grandchild under an address-space limit; prints its exit status and peak RSS (kB).
LAUNCH = """
import resource, subprocess, sys
limit = int(sys.argv[1])
def cap():
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
p = subprocess.run(sys.argv[2:], preexec_fn=cap, capture_output=True, text=True)
print(p.stdout, end="")
sys.stderr.write(p.stderr)
print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def in_child(*args: str) -> tuple[int, int, str]:
    """(exit status, peak RSS in bytes, the command's stdout) of `python ...args` run under a 6 GB
    address-space limit (through a launcher that measures its child's peak RSS)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", LAUNCH, str(6 * GB), sys.executable, *args], capture_output=True,
                       text=True, env=env, timeout=300)
    *out, last = p.stdout.strip().splitlines() or [""]
    code, rss = last.split()
    return int(code), int(rss) * 1024, "\n".join(out) + p.stderr


def err_free_stdout(text: str) -> str:
    """The JSON line the child printed (its last line that starts with '{')."""
    return [line for line in text.splitlines() if line.startswith("{")][-1]


def write_zip(path: Path, pkl: bytes, storages: dict[str, bytes] | None = None, deflate: dict[str, int] | None = None):
    """A file in torch's zip layout (archive/data.pkl, archive/data/<key>, version), written by hand."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        for key, raw in (storages or {}).items():
            z.writestr(f"archive/data/{key}", raw)
        for key, size in (deflate or {}).items():        # a storage of `size` zero bytes, deflated
            info = zipfile.ZipInfo(f"archive/data/{key}")
            info.compress_type = zipfile.ZIP_DEFLATED
            with z.open(info, "w", force_zip64=True) as f:
                chunk = bytes(1 << 24)
                for _ in range(size // len(chunk)):
                    f.write(chunk)
        z.writestr("archive/version", "3\n")
    return path


def hostile_files(tmp: Path, sentinel: Path) -> dict[str, Path]:
    files = {}
    # stride-0 views of 10^9 elements over one float, as weight_orig and weight_mask
    one = torch.ones(1)
    huge = one.as_strided((1000, 1000, 1000), (0, 0, 0))
    path = tmp / "stride0.pt"
    torch.save({"state_dict": {"conv1.weight_orig": huge, "conv1.weight_mask": huge}}, path)
    files["stride0"] = path
    # 44 MB of pickle that builds a list of 22 million integers (protocol 4), in a zip and as a plain pickle
    body = b"\x80\x04]" + b"(" + b"K\x01" * 22_000_000 + b"e."
    files["list-zip"] = write_zip(tmp / "list.pt", body)
    (tmp / "list.pkl").write_bytes(body)
    files["list-pickle"] = tmp / "list.pkl"
    # a zip whose one storage deflates to 600 MiB of zeros (a few hundred kB on disk)
    rebuild = pickle.dumps({"w": torch.zeros(1)}, protocol=2)        # any data.pkl: the sizes are checked first
    files["zip-bomb"] = write_zip(tmp / "bomb.pt", rebuild, deflate={"0": 600 << 20})
    # legacy format with a code-running payload
    path = tmp / "legacy-evil.pt"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(4, 3, 3, 3)}, "optimizer": Evil(sentinel)}, path,
               _use_new_zipfile_serialization=False)
    files["legacy-evil"] = path
    # legacy format whose one storage declares 10^12 floats (in a file of a few hundred bytes)
    files["legacy-huge"] = legacy_file(tmp / "legacy-huge.pt", 10 ** 12)
    return files


class _Storage:
    pass


class _Tensor:
    def __init__(self, numel):
        self.numel = numel

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (_STORAGE, 0, (self.numel,), (1,), False, {})


_STORAGE = _Storage()


def legacy_file(path: Path, numel: int) -> Path:
    """torch's legacy layout written by hand: magic, protocol, system info, the object, storage keys, and the
    storage as an int64 count (of `numel`) with no data after it."""
    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", numel, None) if obj is _STORAGE else None

    buf = io.BytesIO()
    for head in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
        pickle.dump(head, buf, protocol=2)
    P(buf, protocol=2).dump({"state_dict": {"conv1.weight": _Tensor(numel)}})
    pickle.dump(["0"], buf, protocol=2)
    buf.write(struct.pack("<q", numel))
    path.write_bytes(buf.getvalue())
    return path


EXPECT = {"stride0": "over a storage of 1 elements", "list-zip": "its pickle is over", "list-pickle": "not a readable checkpoint",
          "zip-bomb": "bytes once uncompressed, above the limit of 536,870,912", "legacy-evil": "refusing to call posix.system", "legacy-huge": "declares storages of 4,000,000,000,000 bytes"}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    sentinel = tmp / "ran"
    return hostile_files(tmp, sentinel), sentinel, tmp


# In one child: `llt eval --checkpoint`, `llt import` and `llt.load_ticket` on each file given, each call
# caught; per file, the calls' exit status and error text, printed as JSON on stdout. (One child for all
# files: its peak resident memory bounds that of every call.)
THREE = """
import contextlib, io, json, sys
import llt
from llt.cli import main
from llt.errors import LLTError
out, args, results = sys.argv[1], sys.argv[2].split(), {}
for path in sys.argv[3:]:
    calls = []
    for cmd in (["eval", "--checkpoint", path, "--task", "1"] + args, ["import", path, "--out", out]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(cmd)
        calls.append([code, err.getvalue()])
    try:
        llt.load_ticket(path)
        calls.append([0, ""])
    except LLTError as e:
        calls.append([2, str(e)])
    results[path] = calls
print(json.dumps(results))
"""


def test_hostile_files_are_refused_in_one_line_within_bounded_memory(hostile):
    files, sentinel, tmp = hostile
    out = tmp / "imported"
    code, rss, text = in_child("-c", THREE, str(out), " ".join(TINY), *(str(files[name]) for name in sorted(EXPECT)))
    assert code == 0 and "Traceback" not in text, text[-600:]
    assert rss < GB, f"peak resident memory {rss / GB:.2f} GB"
    assert not sentinel.exists() and not (out / "ticket.pt").exists()
    results = json.loads(err_free_stdout(text))
    assert len(results) == len(EXPECT)
    for name in sorted(EXPECT):
        path = str(files[name])
        for tool, (status, message) in zip(("llt eval --checkpoint", "llt import", "llt.load_ticket"), results[path]):
            lines = [line for line in message.splitlines() if line.strip()]
            assert status == 2 and len(lines) == 1, (name, tool, message)
            assert path in lines[0] and EXPECT[name] in lines[0], (name, tool, lines[0])


def test_a_legitimate_legacy_checkpoint_loads_through_every_entry_point_within_bounded_memory(hostile):
    """The same harness on the original's legacy-format checkpoint with a pickled optimizer: it loads."""
    _, sentinel, tmp = hostile
    model, mask = tiny_ticket()
    zip_path = original_checkpoint(model, mask, tmp / "legit-zip.pt")
    legacy = tmp / "legit-legacy.pt"
    torch.save(torch.load(zip_path, weights_only=False), legacy, _use_new_zipfile_serialization=False)
    code, rss, out = in_child("-c", THREE, str(tmp / "imported-legit"), " ".join(TINY), str(legacy))
    assert code == 0 and rss < GB, out[-600:]
    assert [status for status, _ in json.loads(err_free_stdout(out))[str(legacy)]] == [0, 0, 0]
    assert (tmp / "imported-legit" / "ticket.pt").is_file() and not sentinel.exists()


def test_check_view_refuses_expansions_and_out_of_range_views():
    check_view((4, 3), (3, 1), 0, 12, "t")                         # contiguous: fine
    check_view((2, 3), (3, 1), 6, 12, "t")                         # a view at an offset: fine
    check_view((0, 5), (0, 0), 0, 0, "t")                          # empty: fine
    for size, stride, offset, available in [((10,), (0,), 0, 1), ((4, 3), (3, 1), 1, 12), ((3,), (-1,), 2, 3)]:
        with pytest.raises(LLTError):
            check_view(size, stride, offset, available, "t")


def test_a_legacy_checkpoint_with_an_optimizer_evaluates_like_its_zip_twin(tmp_path, capsys):
    """The original's layout (module. prefixes, weight_orig/weight_mask, a pickled SGD) saved by torch < 1.6's
    format evaluates to the same per-task accuracy as the same objects in the zip format."""
    model, mask = tiny_ticket()
    zip_path = original_checkpoint(model, mask, tmp_path / "zip.pt")
    legacy = tmp_path / "legacy.pt"
    obj = torch.load(zip_path, weights_only=False)
    torch.save(obj, legacy, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(legacy)
    got, skipped = read_tensors(legacy)
    want, _ = read_tensors(zip_path)
    assert skipped == ["torch.optim.sgd.SGD"] and got["epoch"] == 100
    assert got["state_dict"].keys() == want["state_dict"].keys()
    assert all(torch.equal(got["state_dict"][k], v) for k, v in want["state_dict"].items())
    rows = []
    for path in (zip_path, legacy):
        assert main(["eval", "--checkpoint", str(path), "--task", "3", *TINY, "--pruned"]) == 0
        rows.append(eval_line(capsys).split("|")[0].split(":", 1)[1])
    assert rows[0] == rows[1]


def test_the_size_limit_is_a_flag_and_a_file_over_it_is_refused(tmp_path, capsys):
    model, mask = tiny_ticket()
    path = original_checkpoint(model, mask, tmp_path / "ckpt.pt", with_optimizer=False)
    assert main(["eval", "--checkpoint", str(path), "--task", "1", *TINY, "--max-bytes", "1000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "above the limit of 1,000" in err and "--max-bytes" in err
    assert main(["eval", "--checkpoint", str(path), "--task", "1", *TINY, "--max-bytes", str(DEFAULT_MAX_BYTES)]) == 0


def test_a_mask_file_is_refused_naming_the_file_and_mask_option(tmp_path, capsys):
    model, mask = tiny_ticket()
    masks = tmp_path / "mask-3.pt"
    torch.save({f"module.{k}_mask": v.float() for k, v in mask.masks.items()}, masks)
    for args in (["eval", "--checkpoint", str(masks), "--task", "1", *TINY], ["import", str(masks), "--out", str(tmp_path / "o")]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(masks) in err and "--mask" in err
    assert not (tmp_path / "o" / "ticket.pt").exists()


def test_import_writes_files_readable_as_open_would_make_them(tmp_path):
    model, mask = tiny_ticket()
    path = original_checkpoint(model, mask, tmp_path / "ckpt.pt")
    old = os.umask(0o022)
    try:
        assert main(["import", str(path), "--out", str(tmp_path / "imported")]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "imported" / "ticket.pt").stat().st_mode & 0o777 == 0o644
    assert json.loads((tmp_path / "imported" / "import.json").read_text())["skipped"] == ["torch.optim.sgd.SGD"]
