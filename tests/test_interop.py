"""The original's files and tickets handed to others: reading the original code's checkpoints and masks
without running code, converting them, evaluating them; exporting tickets (llt, prune, packed) and
loading them back bit for bit; the Python API."""

import copy
import json
import os
import re
from pathlib import Path

import pytest
import torch

from conftest import Evil

import llt
from llt.cli import main
from llt.errors import LLTError
from llt.export import pack, unpack
from llt.interop import load_external, read_tensors
from llt.models import build_model
from llt.pruning import Mask, global_magnitude_prune

DOCS = Path(__file__).resolve().parents[1] / "docs"


def original_names(state: dict) -> dict:
    return {k.replace("heads_main.", "linear_main.").replace("heads_aux.", "linear."): v for k, v in state.items()}


def original_checkpoint(model, mask: Mask, path: Path, with_optimizer: bool = True) -> Path:
    """A checkpoint as the original's main_*.py save it: {'state_dict': ...} with `module.` prefixes,
    pruned convs as weight_orig + weight_mask (torch.nn.utils.prune), an optimizer object beside it."""
    sd = {}
    for k, v in original_names(model.state_dict()).items():
        if k.replace("linear_main.", "heads_main.").replace("linear.", "heads_aux.") in mask.masks:
            llt_name = k.replace("linear_main.", "heads_main.").replace("linear.", "heads_aux.")
            sd["module." + k + "_orig"] = v.clone() + 0.5 * (~mask[llt_name]).float()   # pruned entries nonzero in orig
            sd["module." + k + "_mask"] = mask[llt_name].float()
        else:
            sd["module." + k] = v.clone()
    obj = {"state_dict": sd, "epoch": 100, "best_acc": 97.5}
    if with_optimizer:                     # an optimizer with momentum buffers, on a copy of the model
        other = copy.deepcopy(model)
        opt = torch.optim.SGD(other.parameters(), lr=0.01, momentum=0.9)
        other(torch.randn(2, 3, 32, 32), 1).sum().backward()
        opt.step()
        obj["optimizer"] = opt
    torch.save(obj, path)
    return path


def tiny_ticket(seed=0):
    model = build_model(5, 2, width=4, seed=seed)
    mask = global_magnitude_prune(dict(model.named_parameters()), Mask.ones(model), 0.7)
    mask.apply_(model)
    return model.eval(), mask


def test_an_original_checkpoint_with_an_optimizer_is_read_without_running_code(tmp_path):
    model, mask = tiny_ticket()
    path = original_checkpoint(model, mask, tmp_path / "task1_best_model.pt")
    with pytest.raises(Exception):                                        # torch alone refuses it
        torch.load(path, weights_only=True)
    obj, skipped = read_tensors(path)
    assert skipped == ["torch.optim.sgd.SGD"] and obj["epoch"] == 100 and obj["best_acc"] == 97.5
    state, got_mask, _ = load_external(path, build_model(5, 2, width=4))
    assert got_mask == mask
    for k, v in model.state_dict().items():                              # weight_orig * weight_mask
        assert torch.equal(state[k], v), k
    again, got, info = llt.export.load_ticket(path)
    assert got == mask and info["format"] == "checkpoint" and info["skipped"] == ["torch.optim.sgd.SGD"]


def test_a_file_that_would_run_code_is_refused_and_nothing_runs(tmp_path, capsys):
    sentinel = tmp_path / "ran"
    torch.save({"state_dict": {}, "optimizer": Evil(sentinel)}, tmp_path / "evil.pt")
    with pytest.raises(LLTError, match="refusing to call posix.system"):
        read_tensors(tmp_path / "evil.pt")
    assert main(["eval", "--checkpoint", str(tmp_path / "evil.pt"), "--task", "1", "--preset", "demo"]) == 2
    err = capsys.readouterr().err
    assert "refusing to call posix.system" in err and err.count("\n") == 1
    assert not sentinel.exists()


@pytest.mark.parametrize("damage, message", [
    ("truncate", "not a readable checkpoint"),
    ("shape", "has shape"),
    ("missing", "does not fit the model"),
])
def test_damaged_files_give_one_line_errors(tmp_path, capsys, damage, message):
    model, mask = tiny_ticket()
    path = original_checkpoint(model, mask, tmp_path / "c.pt")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:1000])
    else:
        obj, _ = read_tensors(path)
        sd = obj["state_dict"]
        if damage == "shape":
            sd["module.conv1.weight_orig"] = torch.zeros(3, 3, 3, 3)
            sd["module.conv1.weight_mask"] = torch.ones(3, 3, 3, 3)
        else:
            del sd["module.layer2.0.conv1.weight_orig"], sd["module.layer2.0.conv1.weight_mask"]
        torch.save({"state_dict": sd}, path)
    assert main(["eval", "--checkpoint", str(path), "--task", "2", "--preset", "demo", "--set", "model.width=4"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_packed_tickets_round_trip_exactly_in_fp32_and_approximately_in_fp16():
    model, mask = tiny_ticket()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    got, got_mask, head = unpack(pack(state, mask, {"x": 1}, torch.float32))
    assert got_mask == mask and head["num_kept"] == mask.num_kept()
    assert all(torch.equal(got[k], state[k]) for k in state)
    half, _, _ = unpack(pack(state, mask, {}, torch.float16))
    w = "layer1.0.conv1.weight"
    assert torch.allclose(half[w], state[w], rtol=1e-3, atol=1e-4) and not torch.equal(half[w], state[w])
    broken = pack(state, mask, {}, torch.float32)
    broken["kept"][w][0] += 1
    with pytest.raises(LLTError, match=f"checksum mismatch in kept/{w}"):
        unpack(broken)


@pytest.fixture(scope="module")
def td_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("td")
    args = ["run", "--preset", "demo", "--out", str(out), "--quiet", "--set", "run.method=td", "--set", "model.width=4",
            "--set", "train.epochs=2", "--set", "train.milestones=[1]", "--set", "data.num_tasks=3",
            "--set", "data.exemplars_per_class=5", "--set", "train.batch_size=32", "--set", "prune.td_rounds=[2,1,1]",
            "--set", "prune.finetune_epochs=1"]
    assert main(args) == 0
    [rd] = list(out.iterdir())
    return rd


def eval_line(capsys) -> str:
    out = capsys.readouterr().out.strip().splitlines()
    return out[-1]


TINY = ["--preset", "demo", "--set", "model.width=4", "--set", "data.num_tasks=3"]


@pytest.mark.parametrize("fmt", ["llt", "prune", "packed"])
def test_exports_load_back_to_the_same_accuracy(td_run, tmp_path, capsys, fmt):
    capsys.readouterr()
    assert main(["eval", str(td_run), "--task", "3"]) == 0
    reference = re.search(r"test accuracy per task (.*) \| SA", eval_line(capsys)).group(1)
    out = tmp_path / f"ticket.{fmt}"
    extra = ["--fp32"] if fmt == "packed" else []
    assert main(["export", str(td_run), "--task", "3", "--format", fmt, "--out", str(out), *extra]) == 0
    printed = capsys.readouterr().out
    assert f"{out.stat().st_size:,} bytes" in printed
    assert main(["eval", "--checkpoint", str(out), "--task", "3", *TINY]) == 0
    assert re.search(r"test accuracy per task (.*) \| SA", eval_line(capsys)).group(1) == reference    # bit for bit
    model, mask = llt.load_ticket(out)
    assert mask == Mask.load(td_run / "masks/task3.pt", model) and mask.pruned_nonzero(model) == {}


def test_packed_export_is_smaller_than_the_dense_checkpoint(td_run, tmp_path, capsys):
    for fmt in ("llt", "packed"):
        assert main(["export", str(td_run), "--task", "3", "--format", fmt, "--out", str(tmp_path / fmt)]) == 0
    assert (tmp_path / "packed").stat().st_size < (tmp_path / "llt").stat().st_size
    assert main(["export", str(td_run), "--task", "9", "--format", "packed", "--out", str(tmp_path / "x")]) == 2
    assert "task 9 is not finished" in capsys.readouterr().err


def test_import_converts_an_original_checkpoint(tmp_path, capsys):
    model, mask = tiny_ticket()
    path = original_checkpoint(model, mask, tmp_path / "BU_ticket.pt")
    assert main(["import", str(path), "--out", str(tmp_path / "imported")]) == 0
    out = capsys.readouterr().out
    assert "skipped: torch.optim.sgd.SGD" in out
    info = json.loads((tmp_path / "imported/import.json").read_text())
    assert info["density"] == pytest.approx(mask.density()) and info["skipped"] == ["torch.optim.sgd.SGD"]
    got_model, got_mask = llt.load_ticket(tmp_path / "imported/ticket.pt")
    assert got_mask == mask
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in got_model.state_dict().items())


def test_original_checkpoint_evaluates_like_the_llt_model(td_run, tmp_path, capsys):
    """The ticket of a run, written in the original's layout (module. prefixes, weight_orig/weight_mask, an
    optimizer beside it), evaluates to the same accuracy as the run's own model."""
    capsys.readouterr()
    assert main(["eval", str(td_run), "--task", "3"]) == 0
    reference = re.search(r"test accuracy per task (.*) \| SA", eval_line(capsys)).group(1)
    model = build_model(3, 2, width=4)
    model.load_state_dict(torch.load(td_run / "checkpoints/task3.pt", weights_only=True)["state"])
    mask = Mask.load(td_run / "masks/task3.pt", model)
    orig = original_checkpoint(model, mask, tmp_path / "task3_best_model.pt")
    assert main(["eval", "--checkpoint", str(orig), "--task", "3", *TINY, "--pruned"]) == 0
    line = eval_line(capsys)
    assert re.search(r"test accuracy per task (.*) \| SA", line).group(1) == reference
    assert f"remaining weights {100 * mask.density():.2f} %" in line and "skipped: torch.optim.sgd.SGD" in line
    # without a mask in the file --pruned is refused
    dense = tmp_path / "dense.pt"
    torch.save({"state_dict": original_names(model.state_dict())}, dense)
    assert main(["eval", "--checkpoint", str(dense), "--task", "1", *TINY, "--pruned"]) == 2
    assert "--pruned: the file holds no mask" in capsys.readouterr().err


def test_retrain_any_subnetwork_from_files_and_from_a_top_down_run(td_run, tmp_path, capsys):
    # mask file of the original's kind (a dict of *weight_mask) + theta_0 of the run, task 1 (plain training)
    model = build_model(3, 2, width=4)
    mask = Mask.load(td_run / "masks/task2.pt", model)
    torch.save({k + "_mask": v.float() for k, v in mask.masks.items()}, tmp_path / "mask-2.pt")
    args = ["retrain", "--weights", str(td_run / "checkpoints/init.pt"), "--mask", str(tmp_path / "mask-2.pt"),
            "--task", "1", "--preset", "demo", "--set", "model.width=4", "--set", "data.num_tasks=3",
            "--set", "train.epochs=2", "--set", "data.exemplars_per_class=5", "--set", "train.batch_size=32",
            "--out", str(tmp_path / "r1"), "--quiet"]
    assert main(args) == 0
    [rd] = list((tmp_path / "r1").iterdir())
    result = json.loads((rd / "result.json").read_text())
    assert result["task"] == 1 and len(result["row"]) == 1 and result["density"] == pytest.approx(mask.density())
    net = build_model(3, 2, width=4)
    net.load_state_dict(torch.load(rd / "checkpoints/task1.pt", weights_only=True)["state"])
    assert mask.pruned_nonzero(net) == {}
    # task 3 of a Top-Down run: its ticket, and its teaching set as the teacher
    args = ["retrain", "--weights", str(td_run / "checkpoints/init.pt"), "--mask", str(td_run), "--task", "3",
            "--preset", "demo", "--set", "model.width=4", "--set", "data.num_tasks=3", "--set", "train.epochs=2",
            "--set", "data.exemplars_per_class=5", "--set", "train.batch_size=32", "--out", str(tmp_path / "r3"), "--quiet"]
    assert main(args) == 0
    [rd] = list((tmp_path / "r3").iterdir())
    result = json.loads((rd / "result.json").read_text())
    assert len(result["row"]) == 3 and result["teacher"] == str(td_run / "teaching/task2.pt")
    # a task >= 2 needs a teacher unless lottery teaching is off
    args[args.index(str(td_run))] = str(tmp_path / "mask-2.pt")
    assert main(args[:-3] + ["--out", str(tmp_path / "r4"), "--quiet"]) == 2
    assert "needs a teacher" in capsys.readouterr().err
    assert not list((tmp_path / "r4").iterdir())             # a re-training that could not start leaves nothing


def original_model_keys(width: int = 64, heads: int = 5, classes: int = 2) -> dict[str, tuple]:
    """The state_dict names and shapes of the original's PreActResNet18 (VITA-Group/Lifelong-Learning-LTH
    model.py: conv1, layer1-4 of two PreActBlocks with bn1/conv1/bn2/conv2 and a 1x1 `shortcut.0` where the
    shape changes, `linear_main` and `linear` ModuleLists of per-task heads), written out as a fact of that
    model at any width (the original fixes 64)."""
    keys = {"conv1.weight": (width, 3, 3, 3)}

    def bn(prefix, c):
        keys.update({f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
                     f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()})

    in_planes = width
    for stage, (planes, stride) in enumerate(zip((width, 2 * width, 4 * width, 8 * width), (1, 2, 2, 2)), start=1):
        for block, s in enumerate((stride, 1)):
            p = f"layer{stage}.{block}"
            bn(f"{p}.bn1", in_planes)
            keys[f"{p}.conv1.weight"] = (planes, in_planes, 3, 3)
            bn(f"{p}.bn2", planes)
            keys[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            if s != 1 or in_planes != planes:
                keys[f"{p}.shortcut.0.weight"] = (planes, in_planes, 1, 1)
            in_planes = planes
    for branch in ("linear_main", "linear"):
        for t in range(heads):
            keys[f"{branch}.{t}.weight"] = (classes, 8 * width)
            keys[f"{branch}.{t}.bias"] = (classes,)
    return keys


def test_prune_export_loads_strictly_into_a_model_with_the_originals_names(td_run, tmp_path):
    """`llt export --format prune` writes the original's names; a model with exactly those parameters, its convs
    prepared with torch.nn.utils.prune (weight_orig + weight_mask), loads it with strict=True."""
    import torch.nn.utils.prune as prune

    assert len(original_model_keys()) == 120          # the original's full model: 72 parameters, 48 BN buffers
    out = tmp_path / "ticket.prune"
    assert main(["export", str(td_run), "--task", "3", "--format", "prune", "--out", str(out)]) == 0
    sd = torch.load(out, weights_only=True)["state_dict"]

    class Original(torch.nn.Module):
        """Parameters and buffers under the original's names (the names and shapes are the fixture)."""

        def __init__(self, keys):
            super().__init__()
            for name, shape in keys.items():
                *path, leaf = name.split(".")
                mod = self
                for part in path:
                    if not hasattr(mod, part):
                        mod.add_module(part, torch.nn.Module())
                    mod = getattr(mod, part)
                if leaf.startswith(("running_", "num_batches")):
                    mod.register_buffer(leaf, torch.zeros(shape, dtype=torch.long if not shape else torch.float))
                else:
                    mod.register_parameter(leaf, torch.nn.Parameter(torch.zeros(shape)))

    net = Original(original_model_keys(width=4, heads=3))
    for name, mod in net.named_modules():
        if f"{name}.weight_mask" in sd:
            prune.identity(mod, "weight")
    net.load_state_dict(sd, strict=True)
    mask = Mask.load(td_run / "masks/task3.pt", build_model(3, 2, width=4))
    assert sum(k.endswith("weight_mask") for k in sd) == len(mask.masks)
    assert torch.equal(dict(net.named_buffers())["layer2.0.shortcut.0.weight_mask"].bool(), mask["layer2.0.shortcut.0.weight"])


def test_retrain_from_a_pruned_file_starts_kept_weights_at_weight_orig(tmp_path, capsys):
    """As the original's main_train.py: a weight the file had pruned but the new mask keeps starts at the
    file's weight_orig (here non-zero at every pruned position), not at zero; the file's other objects are named."""
    from llt.methods.external import _weights_of

    model, mask = tiny_ticket()
    path = original_checkpoint(model, mask, tmp_path / "BU_ticket.pt")
    orig = torch.load(path, weights_only=False)["state_dict"]
    state = _weights_of(str(path), build_model(5, 2, width=4))
    assert "skipped pickled objects: torch.optim.sgd.SGD" in capsys.readouterr().out
    name = "layer2.0.conv1.weight"
    pruned = ~mask[name]
    assert pruned.any() and torch.equal(state[name], orig[f"module.{name}_orig"])
    assert (state[name][pruned] != 0).all()


def test_retrain_with_weights_of_another_width_fails_cleanly_and_leaves_no_directory(tmp_path, capsys):
    model, mask = tiny_ticket()
    path = original_checkpoint(model, mask, tmp_path / "w4.pt")
    out = tmp_path / "runs"
    args = ["retrain", "--weights", str(path), "--mask", str(path), "--task", "1", "--preset", "demo",
            "--set", "model.width=8", "--out", str(out), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has shape" in err and str(path) in err
    assert not out.exists() or not list(out.iterdir())


def test_the_api_example_in_the_docs_runs(td_run, tmp_path, monkeypatch):
    """docs/api.md's example, run as written (with the ticket of this test's run)."""
    text = (DOCS / "api.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert main(["export", str(td_run), "--task", "3", "--format", "packed", "--out", str(tmp_path / "ticket.pt")]) == 0
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code.replace('"demo"', '"demo", ["model.width=4", "data.num_tasks=3"]'), "api.md", "exec"), scope)
    assert len(scope["row"]) == 3 and all(0 <= v <= 100 for v in scope["row"])
    assert os.path.exists("ticket.pt")


def test_retrain_with_a_named_teacher_builds_its_teaching_set(td_run, tmp_path):
    """--teacher FILE: the named checkpoint queries the pool for task k (stage teach{k-1} of the new run)."""
    model = build_model(3, 2, width=4)
    Mask.load(td_run / "masks/task2.pt", model).save(tmp_path / "mask.pt")       # an llt mask file
    teacher = td_run / "checkpoints/task1.pt"
    args = ["retrain", "--weights", str(td_run / "checkpoints/init.pt"), "--mask", str(tmp_path / "mask.pt"),
            "--task", "2", "--teacher", str(teacher), "--preset", "demo", "--set", "model.width=4",
            "--set", "data.num_tasks=3", "--set", "train.epochs=1", "--set", "data.exemplars_per_class=5",
            "--set", "train.batch_size=32", "--out", str(tmp_path / "r"), "--quiet"]
    assert main(args) == 0
    [rd] = list((tmp_path / "r").iterdir())
    result = json.loads((rd / "result.json").read_text())
    assert result["teacher"] == str(teacher) and len(result["row"]) == 2
    assert (rd / "stages/teach1.done").is_file() and (rd / "teaching/task1.pt").is_file()
    assert main(args) == 0                                   # a rerun skips the finished stage
    assert json.loads((rd / "result.json").read_text())["row"] == result["row"]
    assert main(["resume", str(rd), "--quiet"]) == 0         # llt resume knows it is a re-training
    assert json.loads((rd / "result.json").read_text())["row"] == result["row"]
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [rd.name]
