"""`llt study`: a spec of runs x seeds run by local workers (or Ray), skipping what finished, retrying a
worker that died, refusing malformed specs up front; `llt report` of the study folder."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

from llt.cli import main
from llt.runs import lock_held

SIZE = ["run.method={m}", "model.width=4", "train.epochs=2", "train.milestones=[1]", "data.num_tasks=2",
        "data.exemplars_per_class=3", "train.batch_size=32"]


def spec(path: Path, methods=("cil", "finetune"), seeds=(0, 1), **extra) -> Path:
    runs = [{"name": m, "preset": "demo", "set": [s.format(m=m) for s in SIZE]} for m in methods]
    path.write_text(json.dumps({"seeds": list(seeds), "runs": runs, **extra}))    # JSON is YAML
    return path


def summaries(out: Path) -> dict:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/summary.json"))}


def test_a_study_runs_every_run_once_and_a_second_invocation_does_nothing(tmp_path, capsys):
    s = spec(tmp_path / "s.yaml")
    assert main(["study", str(s), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    got = summaries(tmp_path / "out")
    assert sorted(v["method"] + str(v["seed"]) for v in got.values()) == ["cil0", "cil1", "finetune0", "finetune1"]
    assert out.count("study: finished") == 4 and "final SA" in out
    before = {k: (tmp_path / "out" / k / "summary.json").stat().st_mtime_ns for k in got}
    assert main(["study", str(s), "--out", str(tmp_path / "out")]) == 0
    assert "all 4 runs finished before; nothing to do" in capsys.readouterr().out
    assert {k: (tmp_path / "out" / k / "summary.json").stat().st_mtime_ns for k in got} == before
    assert main(["study", str(s), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    assert "4 runs, 4 finished" in capsys.readouterr().out
    # the study folder reports as one: seeds grouped as mean +- std
    assert main(["report", str(tmp_path / "out"), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report/report.md").read_text()
    assert "seeds: [0, 1]" in md and " +- " in md


def test_derived_steps_wait_for_their_ticket_run(tmp_path, capsys):
    s = spec(tmp_path / "s.yaml", methods=("td",), seeds=(0,),
             derived=[{"name": "td-random", "from": "td", "init": "original", "mask": "random"}])
    s.write_text(s.read_text().replace('"run.method=td"', '"run.method=td", "prune.td_rounds=[1,0]", '
                                                         '"prune.finetune_epochs=1"'))
    assert main(["study", str(s), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert out.index("study: finished td-s0") < out.index("study: started td-random-s0")
    [control] = [v for v in summaries(tmp_path / "out").values() if v["method"] == "trtd"]
    assert control["mask"] == "random"


def test_a_worker_killed_mid_run_is_retried_and_ends_as_an_uninterrupted_run(tmp_path):
    s = spec(tmp_path / "s.yaml", methods=("cil",), seeds=(0,))
    s.write_text(s.read_text().replace('"train.epochs=2"', '"train.epochs=5"').replace(
        '"model.width=4"', '"model.width=4", "run.deterministic=true"'))
    job_args = json.loads(s.read_text())["runs"][0]["set"]
    assert main(["run", "--preset", "demo", "--quiet", "--out", str(tmp_path / "clean"), "--set", "run.name=cil-s0",
                 "--set", "run.seed=0", *sum((["--set", x] for x in job_args), [])]) == 0       # the same run, uninterrupted
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    study = subprocess.Popen([sys.executable, "-m", "llt", "study", str(s), "--out", str(tmp_path / "out")], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, killed = time.time() + 120, None
    while time.time() < deadline and killed is None:      # kill the worker once it is inside task 2
        for note in (tmp_path / "out").glob("*/lock"):
            rd = note.parent
            # inside task 2 and not at its end (on a loaded machine this loop may look late)
            if (rd / "stages/task1.done").is_file() and list(rd.glob("checkpoints/epoch/*.pt")) and \
                    not (rd / "stages/task2.done").is_file() and not (rd / "summary.json").is_file():
                try:
                    killed = json.loads(note.read_text())["pid"]
                except (OSError, ValueError, KeyError):
                    continue
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.02)
    assert killed is not None, "the worker never reached task 2"
    out, _ = study.communicate(timeout=240)
    assert study.returncode == 0, out
    assert "study: finished cil-s0" in out
    [(name, got)] = summaries(tmp_path / "out").items()
    [(_, clean)] = summaries(tmp_path / "clean").items()
    assert got["accuracy_matrix"] == clean["accuracy_matrix"]
    log = (tmp_path / "out/logs/cil-s0.log").read_text()
    assert "taking over" in log and "continuing after epoch" in log       # the retry resumed the killed run


def test_stopping_a_study_stops_its_workers_without_retrying_them(tmp_path):
    s = spec(tmp_path / "s.yaml", methods=("cil",), seeds=(0,))
    s.write_text(s.read_text().replace('"train.epochs=2"', '"train.epochs=30"'))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    study = subprocess.Popen([sys.executable, "-m", "llt", "study", str(s), "--out", str(tmp_path / "out")], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, worker = time.time() + 120, None
    while time.time() < deadline and worker is None:      # stop the study once its worker is training
        for note in (tmp_path / "out").glob("*/lock"):
            if list(note.parent.glob("checkpoints/epoch/*.pt")):
                try:
                    worker = json.loads(note.read_text())["pid"]
                except (OSError, ValueError, KeyError):
                    continue
        time.sleep(0.02)
    assert worker is not None, "the worker never started training"
    study.send_signal(signal.SIGTERM)
    out, _ = study.communicate(timeout=60)
    assert study.returncode == 143, out
    assert "study: stopping 1 running job(s); 0 of 1 runs finished" in out
    [rd] = [p.parent for p in (tmp_path / "out").glob("*/.lock")]
    assert not lock_held(rd) and not (rd / "summary.json").exists()
    with pytest.raises(ProcessLookupError):
        os.kill(worker, 0)                                # the worker is gone, not left training
    log = (tmp_path / "out/logs/cil-s0.log").read_text()
    assert log.count("test images of shape") == 1 and "stopped by SIGTERM" in log     # stopped once, not retried


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["runs"][0].update(preset="no-such-preset"), "runs entry 1 (cil): unknown preset 'no-such-preset'"),
    (lambda d: d["runs"][1].update(set=["train.epochz=3"]), "runs entry 2 (finetune): unknown config key 'train.epochz'"),
    (lambda d: d["runs"][1].update(name="cil"), "duplicate run name 'cil'"),
    (lambda d: d.update(sedes=[0]), "unknown field(s) sedes"),
    (lambda d: d["runs"][0].update(extra=1), "runs entry 1 (cil): unknown field(s) extra"),
    (lambda d: d.update(derived=[{"name": "x", "from": "cil"}]), "derived entry 1 (x): from 'cil' is a cil run, not a ticket run"),
    (lambda d: d.update(derived=[{"name": "x", "from": "nothing"}]), "derived entry 1 (x): from 'nothing' names no run"),
    (lambda d: (d["runs"][0].update(set=[*d["runs"][0]["set"], "run.method=td", "prune.td_rounds=[1,0]"]),
                d.update(derived=[{"name": "x", "from": "cil", "init": "reference"}])),
     "derived entry 1 (x): init 'reference' needs a run that keeps a dense reference per task (bu); 'cil' is a td run"),
])
def test_a_malformed_spec_is_refused_up_front(tmp_path, capsys, edit, message):
    s = spec(tmp_path / "s.yaml")
    d = json.loads(s.read_text())
    edit(d)
    s.write_text(json.dumps(d))
    assert main(["study", str(s), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "out").exists()


def kill_when(out: Path, ready, group: bool = False, deadline_s: float = 120) -> int | None:
    """SIGKILL the process holding the lock of the first run directory under `out` for which ready(dir) is true
    (with `group`, its whole process group); returns its pid."""
    deadline = time.time() + deadline_s
    while time.time() < deadline:
        for note in out.glob("*/lock"):
            if ready(note.parent):
                try:
                    pid = json.loads(note.read_text())["pid"]
                except (OSError, ValueError, KeyError):
                    continue
                os.killpg(os.getpgid(pid), signal.SIGKILL) if group else os.kill(pid, signal.SIGKILL)
                return pid
        time.sleep(0.02)
    return None


def test_ray_executor_lets_ray_schedule_and_retries_a_killed_job(tmp_path, capsys):
    """Issue 21: on a local Ray cluster of 2 CPUs every ready job is submitted, more than one runs at once,
    and a job whose process is killed is retried and resumes from its checkpoints."""
    if os.environ.get("LLT_REQUIRE_RAY") != "1":
        pytest.importorskip("ray")
    import threading

    import ray

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    s = spec(tmp_path / "s.yaml", methods=("finetune", "cil"), seeds=(0,))
    s.write_text(s.read_text().replace('"train.epochs=2"', '"train.epochs=4"'))
    out = tmp_path / "out"
    killed = []
    killer = threading.Thread(target=lambda: killed.append(kill_when(
        out, lambda d: "cil" in d.name and (d / "stages/task1.done").is_file() and any(d.glob("checkpoints/epoch/*.pt")))))
    killer.start()
    try:
        assert main(["study", str(s), "--out", str(out), "--executor", "ray"]) == 0   # --workers 1 would cap it
    finally:
        killer.join()
        ray.shutdown()
    printed = capsys.readouterr().out
    assert "Ray cluster with 2 CPUs" in printed and printed.count("study: submitted") == 2
    got = summaries(out)
    assert len(got) == 2 and killed[0] is not None
    spans = []
    for name in got:                   # from the run's first record to its summary: they overlap in time
        d = out / name
        first = json.loads((d / "records.jsonl").read_text().splitlines()[0]).get("time")
        spans.append((first if first is not None else (d / "manifest.json").stat().st_mtime,
                      (d / "summary.json").stat().st_mtime))
    (a0, a1), (b0, b1) = spans
    assert a0 < b1 and b0 < a1, spans
    log = (out / "logs/cil-s0.log").read_text()
    assert "continuing after epoch" in log                  # the killed job was retried and resumed


def test_without_ray_the_ray_executor_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)            # as if Ray were not installed
    s = spec(tmp_path / "s.yaml", methods=("finetune",), seeds=(0,))
    assert main(["study", str(s), "--out", str(tmp_path / "out"), "--executor", "ray"]) == 2
    assert "--executor ray needs Ray: pip install 'lifelong-tickets[ray]'" in capsys.readouterr().err


def test_study_wide_overrides_and_data_dir_reach_every_job_in_seed_major_order(tmp_path, capsys):
    from llt.study import load_spec

    s = spec(tmp_path / "s.yaml", methods=("cil", "td"), derived=[{"name": "trtd", "from": "td"}])
    d = json.loads(s.read_text())
    d["runs"][1]["set"].append("prune.td_rounds=[1,1]")
    s.write_text(json.dumps(d))
    out = tmp_path / "out"
    plain = load_spec(s, out)
    moved = load_spec(s, out, data_dir="/data/elsewhere")
    # the data's location is not part of a run's identity: the same study continues from another folder
    assert [j.directory for j in moved] == [j.directory for j in plain]
    for j in moved:
        flat = " ".join(j.args)
        assert ('data.data_dir="/data/elsewhere"' in flat) if j.args[0] == "run" else ("--data-dir /data/elsewhere" in flat)
    # a study-wide --set comes after each entry's own (train.epochs=2 there), so it wins
    shorter = load_spec(s, out, ["train.epochs=1"])
    assert {j.key: j.epochs for j in shorter if j.args[0] == "run" and j.key.startswith("cil")} == {"cil-s0": 2, "cil-s1": 2}
    assert [j.directory for j in shorter] != [j.directory for j in plain]
    # seed-major: every job of seed 0, its derived step included, before any job of seed 1
    assert [j.key for j in plain] == ["cil-s0", "td-s0", "trtd-s0", "cil-s1", "td-s1", "trtd-s1"]
    assert main(["study", str(s), "--out", str(out), "--set", "train.epochz=1", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "study-wide --set/--data-dir: unknown config key 'train.epochz'" in err and err.count("\n") == 1
    assert not out.exists()


def test_jobs_sharing_the_cpu_get_their_share_of_its_threads(monkeypatch):
    from llt import study

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)                     # the machine's count is not what counts:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)  # the CPUs we may use
    assert study.cpu_threads(1) is None and study.cpu_threads(2) == 4 and study.cpu_threads(16) == 1
    assert study._env(None, 4)["OMP_NUM_THREADS"] == "4" and "OMP_NUM_THREADS" not in study._env()
    assert study._env(1)["CUDA_VISIBLE_DEVICES"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert study._env(None, 4)["OMP_NUM_THREADS"] == "3"          # the user's own setting wins


def test_study_record_is_relative_and_report_works_from_any_directory(tmp_path, monkeypatch, capsys):
    """Issue 21: study.json names its runs relative to itself; `llt report DIR` from another working directory
    (and after the folder moved) finds every run, and names the ones it cannot find."""
    s = spec(tmp_path / "s.yaml", methods=("finetune",), seeds=(0, 1))
    assert main(["study", str(s), "--out", str(tmp_path / "out")]) == 0
    record = json.loads((tmp_path / "out/study.json").read_text())
    assert all(not Path(j["directory"]).is_absolute() for j in record["jobs"])
    (tmp_path / "out").rename(tmp_path / "moved")
    import shutil

    shutil.rmtree(tmp_path / "moved" / record["jobs"][1]["directory"])     # one run lost
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["report", str(tmp_path / "moved"), "--out", "rep"]) == 0
    captured = capsys.readouterr()
    assert "1 of 2 runs missing: " + Path(record["jobs"][1]["directory"]).name in captured.err
    assert "runs: " + Path(record["jobs"][0]["directory"]).name in (elsewhere / "rep/report.md").read_text()


def test_a_bottom_up_study_killed_during_its_tr_bu_resumes_the_tr_bu(tmp_path):
    """Issue 21: a Bottom-Up run with prune.retrain_after writes its summary before its TR-BU; the TR-BU is a
    job of its own, so a study killed during it (workers and all) resumes it on the next invocation."""
    s = spec(tmp_path / "s.yaml", methods=("bu",), seeds=(0,))
    s.write_text(s.read_text().replace('"run.method=bu"', '"run.method=bu", "prune.retrain_after=true", '
                                                         '"prune.max_rounds=1", "prune.finetune_epochs=1"')
                 .replace('"train.epochs=2"', '"train.epochs=4"'))
    from llt.study import load_spec

    jobs = load_spec(s, tmp_path / "out")
    assert [j.key for j in jobs] == ["bu-s0", "bu-trbu-s0"] and jobs[1].after == "bu-s0"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    study = subprocess.Popen([sys.executable, "-m", "llt", "study", str(s), "--out", str(tmp_path / "out")], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    pid = kill_when(tmp_path / "out", lambda d: d.name.endswith("-retrain-original")
                    and any(d.glob("checkpoints/epoch/*.pt")), group=True)
    study.communicate(timeout=60)
    assert pid is not None, "the TR-BU never started"
    [bu] = [d for d in (tmp_path / "out").iterdir() if d.name.startswith("bu-s0") and "retrain" not in d.name]
    tr = tmp_path / "out" / f"{bu.name}-retrain-original"
    assert (bu / "summary.json").is_file() and not (tr / "summary.json").is_file()     # killed inside TR-BU
    assert main(["study", str(s), "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tr / "summary.json").read_text())["method"] == "trbu"
    assert "continuing after epoch" in (tmp_path / "out/logs/bu-trbu-s0.log").read_text()


def test_a_job_that_writes_no_summary_where_the_study_expects_it_fails_and_blocks_its_controls(tmp_path, capsys,
                                                                                            monkeypatch):
    """A job's process recomputes its run directory from the config; when llt changed under a running study the
    two differ. The study must not count such a job finished (nor start the controls that read its ticket)."""
    import llt.study

    monkeypatch.setattr(llt.study, "_command", lambda job: [sys.executable, "-c", "pass"])   # exits 0, writes nothing
    s = spec(tmp_path / "s.yaml", methods=("td",), seeds=(0,),
             derived=[{"name": "td-random", "from": "td", "init": "original", "mask": "random"}])
    s.write_text(s.read_text().replace('"run.method=td"', '"run.method=td", "prune.td_rounds=[1,0]"'))
    assert main(["study", str(s), "--out", str(tmp_path / "out")]) != 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert "study: FAILED td-s0: it exited cleanly but" in text and "holds no summary.json" in text
    assert "study: skipped td-random-s0: td-s0 failed" in text and "study: finished" not in text


def test_an_executor_that_fails_fails_its_job_not_the_study(tmp_path, capsys, monkeypatch):
    """An exception from the executor (a Ray worker or node lost past its retries) fails that job, with its reason;
    the other jobs still run and the study ends with its usual failure report."""
    import llt.study

    real = llt.study.run_job

    def flaky(job, *args, **kwargs):
        if job.key == "cil-s0":
            raise RuntimeError("worker node died\nmore detail")
        return real(job, *args, **kwargs)

    monkeypatch.setattr(llt.study, "run_job", flaky)
    s = spec(tmp_path / "s.yaml", methods=("cil",), seeds=(0, 1))
    assert main(["study", str(s), "--out", str(tmp_path / "out")]) != 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert "study: cil-s0: its executor failed: RuntimeError: worker node died" in text
    assert "study: FAILED cil-s0" in text and "study: finished cil-s1" in text and "1 run(s) failed: cil-s0" in text


def test_relative_out_and_data_dir_reach_the_jobs_as_absolute_paths(tmp_path, monkeypatch):
    """A job may run in another working directory (a Ray worker): its run directory, --out and --data-dir are
    absolute even when the study was given relative ones."""
    from llt.study import load_spec

    s = spec(tmp_path / "s.yaml", methods=("td",), seeds=(0,),
             derived=[{"name": "td-random", "from": "td", "init": "original", "mask": "random"}])
    s.write_text(s.read_text().replace('"run.method=td"', '"run.method=td", "prune.td_rounds=[1,0]"'))
    monkeypatch.chdir(tmp_path)
    jobs = load_spec("s.yaml", "out", data_dir="data")
    assert len(jobs) == 2 and all(j.directory.is_absolute() and j.directory.parent == tmp_path / "out" for j in jobs)
    run, derived = jobs
    assert f'data.data_dir="{tmp_path / "data"}"' in " ".join(run.args)
    assert f'run.out_dir="{tmp_path / "out"}"' in " ".join(run.args)
    assert derived.args[1] == str(run.directory)
    assert derived.args[derived.args.index("--out") + 1] == str(tmp_path / "out")
    assert derived.args[derived.args.index("--data-dir") + 1] == str(tmp_path / "data")
