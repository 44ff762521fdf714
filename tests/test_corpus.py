"""Every file llt reads goes through one bounded reader (llt.safeload), proven on a generated hostile corpus
(tests/corpus.py: one file per global of torch's weights_only allow-list and per allocating pickle opcode,
in the zip and the legacy layout) and by a fuzzer (scripts/fuzz_readers.py). Each corpus file is tried in a
child process: refused in one line naming the file, no traceback, no file created or changed, and the
child's peak resident memory under 1 GiB.

Which entry points see which files: the reader itself, `llt eval --checkpoint`, `llt import`,
`llt.load_ticket` and `llt retrain --weights RUN --mask F` see the whole corpus (a few hundredths of a second
each); the run-directory commands, which open a run and load its dataset first (`llt report`, `llt resume`,
`llt retrain RUN`, `llt eval RUN`, every .pt of a copy of a run replaced by the file), see one file of each
kind in the suite (one global per decision, an opcode, every structure) and the whole corpus in
`scripts/hostile_corpus.py` (docs/reliability.md has its figures)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from corpus import OPCODES, PRESET, STRUCTURES, TINY_BU, as_zip, call_global, refused_in_one_line, write_corpus

from llt import safeload
from llt.errors import LLTError

REPO = Path(__file__).resolve().parents[1]
GB = 1 << 30


def issue_file(path: Path) -> Path:
    """The file of the report: a zip in torch's layout whose data.pkl is `bytearray(2_000_000_000)` (under 1 kB)."""
    path.write_bytes(as_zip(call_global("builtins.bytearray", 2_000_000_000)))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpus")
    files = write_corpus(tmp / "files")
    files["the reported bytearray file [zip]"] = issue_file(tmp / "bytearray.pt")
    from llt.cli import main

    out = tmp / "runs"
    assert main(["run", "--preset", "demo", "--out", str(out), "--quiet", *TINY_BU]) == 0
    [run] = list(out.iterdir())
    return files, run, tmp


def representatives(files: dict[str, Path]) -> dict[str, Path]:
    """One global per decision of llt's (and bytearray, UntypedStorage) and the FRAME opcode in both layouts,
    every structure in the zip layout, and the reported file: each kind of refusal, through each command
    (the opcode checks do not depend on the command; the whole corpus goes through every command in
    scripts/hostile_corpus.py)."""
    chosen, decided = {}, set()
    for name in sorted(files):
        if name.startswith("global:"):
            qualname = name.split(":", 1)[1].split(" [")[0]
            key = (safeload.TORCH_ALLOW_LIST_DECISIONS[qualname], name.endswith("[zip]"))
            if key in decided and qualname not in ("builtins.bytearray", "torch.storage.UntypedStorage"):
                continue
            decided.add(key)
        elif name.startswith("op:") and not name.startswith("op:FRAME "):
            continue
        elif name.startswith("struct:") and not name.endswith("[zip]"):
            continue
        chosen[name] = files[name]
    return chosen


def in_child(spec: dict, tmp: Path) -> dict:
    """Run tests/corpus_child.py on `spec` in a child process; its JSON result."""
    (tmp / "scratch").mkdir(exist_ok=True)
    spec = {"scratch": str(tmp / "scratch"), "preset_args": PRESET, **spec}
    path = tmp / "spec.json"
    path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(REPO / "tests/corpus_child.py"), str(path)], capture_output=True, text=True,
                       env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def failures(result: dict, files: dict[str, Path], names_file) -> list:
    """Every call that was not a one-line refusal naming the file, or that created or changed a file."""
    label = {str(p): name for name, p in files.items()}
    bad = []
    for path, calls in result["results"].items():
        for entry, (code, text, changed, _seconds) in calls.items():
            first = next((line for line in text.splitlines() if line.strip()), "")
            if not refused_in_one_line(code, text, changed, names_file(path, first)):
                bad.append((label[path], entry, code, changed, text[-300:]))
    return bad


def test_llt_decided_every_global_of_the_installed_torch_allow_list():
    allowed = pytest.importorskip("torch._weights_only_unpickler")._get_allowed_globals()
    new = sorted(set(allowed) - set(safeload.TORCH_ALLOW_LIST))
    assert not new, (f"torch {torch.__version__} allows {new} in weights_only files: decide each in "
                     f"llt.safeload (TORCH_ALLOW_LIST) and add it to the corpus")
    assert set(safeload.TORCH_ALLOW_LIST_DECISIONS.values()) <= {"rebuilt", "storage", "dtype", "placeholder"}


def test_every_corpus_file_is_refused_by_the_reader_and_the_file_entry_points_in_bounded_memory(corpus):
    files, run, tmp = corpus
    assert len(files) == 2 * (len(safeload.TORCH_ALLOW_LIST) + len(OPCODES) + len(STRUCTURES)) + 1
    result = in_child({"mode": "file", "files": [str(p) for p in files.values()], "run": str(run),
                       "entries": ["read_tensors", "load_file", "llt eval --checkpoint", "llt import",
                                   "llt.load_ticket", "llt retrain --weights RUN --mask"]}, tmp)
    assert failures(result, files, lambda path, line: path in line) == []
    assert result["peak_rss"] < GB, f"peak resident memory {result['peak_rss'] / GB:.2f} GiB"
    for name, path in files.items():               # each opcode payload is stopped by the opcode check itself,
        if name.startswith("op:"):                 # before any unpickler runs (not by a later failure)
            assert "its pickle " in result["results"][str(path)]["read_tensors"][1], name
    assert not (tmp / "scratch/out").exists()
    issue = result["results"][str(files["the reported bytearray file [zip]"])]
    assert "refusing to call builtins.bytearray" in issue["llt eval --checkpoint"][1]


def test_representative_corpus_files_are_refused_by_every_run_directory_command(corpus):
    files, run, tmp = corpus
    chosen = representatives(files)
    copy = tmp / "scratch/run"
    result = in_child({"mode": "rundir", "files": [str(p) for p in chosen.values()], "run": str(run)}, tmp)
    assert failures(result, chosen, lambda path, line: f"{copy}/" in line and ".pt: " in line) == []
    assert result["peak_rss"] < GB
    assert not (tmp / "scratch/report").exists() and not (tmp / "scratch/retrained").exists()
    entries = {e for calls in result["results"].values() for e in calls}
    assert entries == {"llt report RUN", "llt resume RUN", "llt retrain RUN", "llt eval RUN"}


def test_the_corpus_fails_when_an_entry_point_bypasses_the_reader(corpus):
    """The same check with llt's reader swapped for a plain torch.load(weights_only=True): the reported file
    drives the child over the memory cap (torch's allow-list admits bytearray(n)), so the test would fail."""
    files, run, tmp = corpus
    path = files["the reported bytearray file [zip]"]
    result = in_child({"mode": "file", "files": [str(path)], "run": str(run), "entries": ["llt import"],
                       "bypass": True}, tmp)
    assert result["peak_rss"] > GB, "a bypassed reader went unnoticed"


def test_the_fuzzer_finds_only_reads_and_one_line_refusals_within_bounded_memory():
    pytest.importorskip("hypothesis")          # the test extra (CI installs it)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(REPO / "scripts/fuzz_readers.py"), "--examples", "150", "--seed", "0"],
                       capture_output=True, text=True, env=env, timeout=600)
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert p.returncode == 0 and out["failure_count"] == 0, out["failures"]
    assert out["files_tried"] == 150 and out["reads"] + out["refusals"] == 300 and out["peak_rss_bytes"] < GB


LOADERS = {"torch": {"load"}, "torch.serialization": {"load"}, "torch.jit": {"load"}, "pickle": {"load", "loads", "Unpickler"},
           "_pickle": {"load", "loads", "Unpickler"}}


def forbidden_loads(source: str, filename: str) -> list[str]:
    """The torch.load / torch.serialization.load / torch.jit.load / pickle.load(s) / Unpickler uses in
    `source`, whatever the module is imported as (llt/safeload.py and llt/data/files.py may subclass
    pickle's unpicklers: the one reader, and the CIFAR archives' restricted unpickler)."""
    allowed = {"Unpickler", "_Unpickler"} if filename in ("safeload.py", "files.py") else set()
    tree = ast.parse(source)
    alias = {}                                   # local name -> module it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                alias[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                if f"{node.module}.{a.name}" in LOADERS:
                    alias[a.asname or a.name] = f"{node.module}.{a.name}"

    def dotted(node) -> str | None:
        if isinstance(node, ast.Name):
            return alias.get(node.id)
        if isinstance(node, ast.Attribute):
            base = dotted(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    found = []
    for node in ast.walk(tree):
        name = None
        if isinstance(node, ast.Attribute):
            base = dotted(node.value)
            if base in LOADERS and node.attr in LOADERS[base] | {"_Unpickler"}:
                name = f"{base}.{node.attr}"
        elif isinstance(node, ast.ImportFrom) and node.module in LOADERS:
            hits = [a.name for a in node.names if a.name in LOADERS[node.module] | {"_Unpickler"}]
            name = f"from {node.module} import {', '.join(hits)}" if hits else None
        if name and name.split(".")[-1] not in allowed:
            found.append(f"{filename}:{node.lineno}: {name}")
    return found


def test_no_torch_load_or_unpickling_outside_the_one_reader():
    found = [hit for path in sorted((REPO / "src/llt").rglob("*.py")) for hit in forbidden_loads(path.read_text(), path.name)]
    assert found == []


def test_the_source_check_sees_a_planted_torch_load():
    assert forbidden_loads("import torch\nstate = torch.load('x.pt', weights_only=True)\n", "storage.py") == \
        ["storage.py:2: torch.load"]
    assert forbidden_loads("from torch import load\nimport pickle\npickle.loads(b'')\n", "report.py") == \
        ["report.py:1: from torch import load", "report.py:3: pickle.loads"]
    assert forbidden_loads("import torch as t\nt.serialization.load('x')\nimport torch.jit\ntorch.jit.load('y')\n",
                           "export.py") == ["export.py:2: torch.serialization.load", "export.py:4: torch.jit.load"]
    assert forbidden_loads("import pickle\nclass R(pickle.Unpickler): pass\n", "safeload.py") == []


def test_every_file_llt_writes_reads_bit_identically_to_torch_load(corpus, tmp_path):
    """Every .pt of a run directory and every export layout: llt's strict reader accepts what llt writes."""
    from llt.cli import main

    _, run, _ = corpus
    paths = sorted(run.rglob("*.pt"))
    assert len(paths) >= 10
    from llt.models import build_model

    torch.save(build_model(num_tasks=2, classes_per_task=2, width=4).state_dict(), tmp_path / "state_dict.pt")
    paths.append(tmp_path / "state_dict.pt")             # an OrderedDict with its _metadata (pickle's BUILD)
    for fmt in ("llt", "prune", "packed"):
        assert main(["export", str(run), "--task", "2", "--format", fmt, "--out", str(tmp_path / f"{fmt}.pt")]) == 0
        paths.append(tmp_path / f"{fmt}.pt")
    for p in paths:
        ours, theirs = safeload.load_file(p), torch.load(p, map_location="cpu", weights_only=True)
        assert same(ours, theirs), p


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """The whole storage under `t` as uint8 (NaN and -0.0 compare by their bits)."""
    return torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())


def same(a, b) -> bool:
    """Equal type, structure and, for tensors, dtype, shape, strides, offset and the bytes of the storage."""
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
                and a.storage_offset() == b.storage_offset()
                and torch.equal(raw_bytes(a), raw_bytes(b)))
    if isinstance(a, dict):
        return (type(a) is type(b) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
                and getattr(a, "_metadata", None) == getattr(b, "_metadata", None))   # a state_dict's attribute
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def test_a_storage_named_many_times_is_read_once_and_shared_containers_are_walked_once(tmp_path):
    t = torch.arange(1000, dtype=torch.float32)
    nested: list = [t]
    for _ in range(40):                       # 2^40 paths through the same list: walked once per object
        nested = [nested, nested]
    path = tmp_path / "shared.pt"
    torch.save({"views": [t[i:i + 10] for i in range(500)], "nested": nested}, path)
    obj = safeload.load_file(path)
    storages = {v.untyped_storage().data_ptr() for v in obj["views"]}
    assert len(storages) == 1 and torch.equal(obj["views"][3], t[3:13])


def test_limits_refuse_in_one_line(tmp_path, monkeypatch):
    path = tmp_path / "many.pt"
    torch.save({f"t{i}": torch.zeros(1) for i in range(30)}, path)
    monkeypatch.setattr(safeload, "MAX_ZIP_ENTRIES", 10)
    with pytest.raises(LLTError, match=r"many.pt: a zip archive of \d+ entries .* above the limits of 10 entries"):
        safeload.load_file(path)
    monkeypatch.undo()
    deflated = tmp_path / "deflated.pt"           # torch stores entries; a compressed one could expand past its size
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    with pytest.raises(LLTError, match=r"deflated.pt: entry .* is compressed; torch stores every entry"):
        safeload.load_file(deflated)
    big = tmp_path / "big.pt"
    torch.save({"w": torch.zeros(1000)}, big)
    with pytest.raises(LLTError, match=r"big.pt: .* above the limit of 100 "):
        safeload.load_file(big, max_bytes=100)
    foreign = tmp_path / "foreign.pt"
    torch.save({"n": torch.Size([2, 3])}, foreign)
    assert safeload.read_tensors(foreign)[0]["n"] == torch.Size([2, 3])
    with pytest.raises(LLTError, match="foreign.pt: names torch.Size, which llt's own files never hold; refused"):
        safeload.load_file(foreign)
