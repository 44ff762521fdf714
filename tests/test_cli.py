"""The command line: the demo run end to end, data info, and every bad input named by the foundation issue.

Each bad input must give exit status 2, one line on stderr (no traceback) and no run directory that
looks complete (no stage marker, no summary).
"""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, Evil, make_archive, make_cifar10_folder, trust_generated
from llt.cli import main


def run_cli(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_failure(code, err, out_dir=None):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[llt] WARNING")]
    assert len(lines) == 1 and lines[0].startswith("llt: error: "), err
    assert "Traceback" not in err
    if out_dir is not None and os.path.isdir(out_dir):
        assert not list(out_dir.rglob("*.done")) and not list(out_dir.rglob("summary.json"))


def test_demo_run_builds_and_records_the_stream(tmp_path, capsys):
    stream_only = ["--set", "run.method=stream"]
    code, out, err = run_cli(["run", "--preset", "demo", "--out", str(tmp_path / "runs"), *stream_only], capsys)
    assert code == 0, err
    [rd] = list((tmp_path / "runs").iterdir())
    assert rd.name.startswith("demo-stream-digits-s0-")
    manifest = json.loads((rd / "manifest.json").read_text())
    assert manifest["config"]["data"]["dataset"] == "digits" and manifest["stream"]["num_tasks"] == 5
    assert manifest["stream"]["class_order"] == list(range(10)) and manifest["pool"]["num_images"] > 300
    assert manifest["dataset"]["provenance"]["status"] == "embedded"
    assert manifest["environment"]["torch"] == torch.__version__ and "split" in manifest["seeds"]
    state = torch.load(rd / "stream.pt", weights_only=True)["state"]
    assert state["task1.train_idx"].numel() > 150 and state["exemplars.0"].numel() == 20
    assert (rd / "stages" / "stream.done").is_file() and (rd / "config.yaml").is_file()
    assert [r["event"] for r in map(json.loads, (rd / "records.jsonl").read_text().splitlines())] == ["stream"]
    assert "memory" in out and "unlabeled pool: builtin" in out
    # a rerun into the same run directory skips the finished stage
    code, out, _ = run_cli(["run", "--preset", "demo", "--out", str(tmp_path / "runs"), *stream_only], capsys)
    assert code == 0 and "already built" in out
    assert len((rd / "records.jsonl").read_text().splitlines()) == 1


def test_show_config_prints_resolved_yaml(capsys):
    code, out, _ = run_cli(["show-config", "--preset", "paper-cifar10-td", "--set", "train.epochs=3"], capsys)
    assert code == 0 and "td_rounds:" in out and "epochs: 3" in out
    code, out, _ = run_cli(["show-config", "--fields"], capsys)
    assert code == 0 and "prune.base_sparsity (float, default 90.0)" in out
    code, out, _ = run_cli(["show-config", "--list"], capsys)
    assert "paper-cifar10-bu" in out.split()


def test_data_info_prints_json(tmp_path, capsys):
    make_cifar10_folder(tmp_path)
    code, out, err = run_cli(["data", "info", "--dataset", "cifar10", "--data-dir", str(tmp_path)], capsys)
    info = json.loads(out)
    assert code == 0 and info["num_train"] == 100 and info["num_test"] == 20 and info["num_classes"] == 10
    assert info["train_per_class"] == [10] * 10 and info["image_shape"] == [3, 32, 32]
    assert info["checksums_matched"] is False and "WARNING" in err
    code, out, _ = run_cli(["data", "info", "--dataset", "digits", "--pool", "builtin"], capsys)
    info = json.loads(out)
    assert code == 0 and info["num_classes"] == 10 and info["pool"]["num_images"] == info["num_unlabeled"]


# ------------------------------------------------------------------------------------------ bad input

def test_unknown_preset(capsys, tmp_path):
    code, _, err = run_cli(["run", "--preset", "nope", "--out", str(tmp_path)], capsys)
    assert_clean_failure(code, err, tmp_path)
    assert "unknown preset 'nope'" in err


@pytest.mark.parametrize("override, message", [
    ("train.nope=1", "unknown config key"),
    ("train.epochs=abc", "expected an integer"),
    ("data.classes_per_task=3", "not divisible"),
    ("data.class_order=[1,1,2,3,4,5,6,7,8,9]", "not a permutation"),
])
def test_bad_config_values(capsys, tmp_path, override, message):
    code, _, err = run_cli(["run", "--preset", "demo", "--out", str(tmp_path), "--set", override], capsys)
    assert_clean_failure(code, err, tmp_path)
    assert message in err


def cifar_run(tmp_path, *extra):
    return ["run", "--preset", "paper-cifar10-cil", "--set", "run.method=stream", "--set", "data.pool=none",
            "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "runs"), *extra]


def test_missing_data_folder_names_file_and_checksum(capsys, tmp_path):
    code, _, err = run_cli(cifar_run(tmp_path), capsys)
    assert_clean_failure(code, err, tmp_path / "runs")
    assert "cifar-10-python.tar.gz (md5 c58f30108f718f92721af3b95e74349a)" in err


def test_corrupt_data_file_names_file_and_checksum(capsys, tmp_path):
    folder = make_cifar10_folder(tmp_path / "data")
    (folder / "data_batch_4").write_bytes(b"\x80\x02garbage")
    code, _, err = run_cli(cifar_run(tmp_path), capsys)
    assert_clean_failure(code, err, tmp_path / "runs")
    assert "data_batch_4" in err and "634d18415352ddfa80567beed471001a" in err


def test_crafted_pickle_is_refused_and_runs_nothing(capsys, tmp_path):
    folder = make_cifar10_folder(tmp_path / "data")
    sentinel = tmp_path / "pwned"
    (folder / "test_batch").write_bytes(pickle.dumps(Evil(sentinel), protocol=2))
    code, _, err = run_cli(cifar_run(tmp_path), capsys)
    assert_clean_failure(code, err, tmp_path / "runs")
    assert "refused to unpickle" in err and not sentinel.exists()


def test_archive_member_outside_target_is_refused(capsys, tmp_path, monkeypatch):
    folder = make_cifar10_folder(tmp_path / "src")
    (tmp_path / "data").mkdir()
    archive = make_archive(folder, tmp_path / "data" / "cifar-10-python.tar.gz", extra={"/etc/evil": b"x"})
    trust_generated(monkeypatch, folder, archive)
    code, _, err = run_cli(cifar_run(tmp_path), capsys)
    assert_clean_failure(code, err, tmp_path / "runs")
    assert "member '/etc/evil' would be written outside the target folder" in err


def test_image_array_of_wrong_shape_or_dtype(capsys, tmp_path):
    np.savez(tmp_path / "d.npz", train_images=np.zeros((10, 32, 32), np.uint8), train_labels=np.arange(10) % 2,
             test_images=np.zeros((4, 32, 32, 3), np.uint8), test_labels=np.arange(4) % 2)
    args = ["run", "--preset", "demo", "--out", str(tmp_path / "runs"), "--set", "data.dataset=array",
            "--set", f"data.array_path={tmp_path / 'd.npz'}", "--set", "data.pool=none"]
    code, _, err = run_cli(args, capsys)
    assert_clean_failure(code, err, tmp_path / "runs")
    assert "must have shape (N, H, W, 3) or (N, 3, H, W), got (10, 32, 32)" in err
    np.savez(tmp_path / "d.npz", train_images=np.zeros((10, 32, 32, 3), np.float64), train_labels=np.arange(10) % 2,
             test_images=np.zeros((4, 32, 32, 3), np.uint8), test_labels=np.arange(4) % 2)
    code, _, err = run_cli(args, capsys)
    assert_clean_failure(code, err, tmp_path / "runs")
    assert "must be uint8, got dtype float64" in err


def test_output_folder_that_cannot_be_written(capsys, tmp_path):
    (tmp_path / "occupied").write_text("a file, not a folder")
    code, _, err = run_cli(["run", "--preset", "demo", "--set", "run.method=stream",
                            "--out", str(tmp_path / "occupied" / "runs")], capsys)
    assert_clean_failure(code, err)
    assert "cannot write to the output folder" in err


def test_python_dash_m_from_the_source_tree_prints_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "LLT_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "llt", "run", "--preset", "nope"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("llt: error: unknown preset") and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "llt", "--version"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("llt ")
