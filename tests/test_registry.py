"""One registry of method names (llt.registry), read by every consumer; no second list remains."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from llt import registry
from llt.registry import REGISTRY

SRC = Path(__file__).resolve().parents[1] / "src" / "llt"


def test_every_consumer_reads_the_one_registry():
    from llt import config, study
    from llt.methods import driver, incremental, retrain
    from llt.reporting import report

    field = {f.name: f for f in config.dataclasses.fields(config.RunSection)}["method"]
    assert field.metadata["choices"] == registry.RUN_METHODS
    assert config.check_config is registry.check_config
    assert driver.REGISTRY is REGISTRY and incremental.REGISTRY is REGISTRY
    assert study.TICKET_SEARCHES is registry.TICKET_SEARCHES
    assert retrain.TICKET_SEARCHES is registry.TICKET_SEARCHES and retrain.retrained_name is registry.retrained_name
    assert report.TICKET_METHODS is registry.TICKET_METHODS and report.label is registry.label
    assert report.RETRAINED == registry.names("retrained")


def test_every_runnable_method_resolves_to_a_runner_of_its_own_name():
    for name, m in REGISTRY.items():
        if not m.runnable:
            with pytest.raises(ValueError, match="not a run.method"):
                m.runner()
            continue
        fn = m.runner()
        assert callable(fn)
        owner = getattr(fn, "__self__", None)          # Incremental.run is a classmethod of the method's class
        if owner is not None:
            assert not hasattr(owner, "name"), f"{owner.__name__} restates its name: it is the registry entry's"


def test_no_module_keeps_its_own_list_of_method_names():
    """A tuple, list, set or dict literal holding two or more method names outside the registry is a second
    registry (the bug this replaced: two BASELINES, two TICKET_METHODS, an if/elif chain)."""
    names = set(REGISTRY)
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name == "registry.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                items = node.elts
            elif isinstance(node, ast.Dict):
                items = [k for k in node.keys if k is not None]
            else:
                continue
            hits = {e.value for e in items if isinstance(e, ast.Constant) and e.value in names}
            if len(hits) >= 2:
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno} {sorted(hits)}")
    assert not offenders, offenders


def test_method_specific_config_rules_come_from_the_registry():
    from llt.config import load_config
    from llt.errors import LLTError

    with pytest.raises(LLTError, match="baseline.replay_batching: applies to the baselines that replay a memory"):
        load_config("demo", ["run.method=lwf", "baseline.replay_batching=balanced"])
    with pytest.raises(LLTError, match="baseline.mask_from"):
        load_config("demo", ["run.method=cil", "baseline.mask_from=x"])
    with pytest.raises(LLTError, match="needs at least 1 exemplar"):
        load_config("demo", ["run.method=icarl", "data.exemplars_per_class=0"])
    assert load_config("demo", ["run.method=icarl", "baseline.replay_batching=balanced"]).baseline.replay_batching \
        == "balanced"
    with pytest.raises(LLTError, match="run.method: 'trbu' is not one of"):
        load_config("demo", ["run.method=trbu"])          # a re-training's name, made by `llt retrain` only


def test_reading_the_registry_imports_no_training_code():
    import subprocess
    import sys

    code = "import sys, llt.config, llt.registry; print('llt.trainer' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "False"


def literal_name_comparisons(source: str, where: str = "") -> list[str]:
    """Branches on a literal method name: a comparison (==, !=, in, not in) of a constant that is a method name
    (or a container of such constants) with an expression whose source mentions `method` or `name`
    (run.method, summary["method"], info.name, a variable named method); a `match` case on such a constant;
    and `REGISTRY["..."]` with a literal key. The same strings in other roles ("joint" as a BatchNorm mode,
    "finetune" as a rewind mode, "stream" as a stage name) are not flagged."""
    names = set(REGISTRY)
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "REGISTRY" \
                and isinstance(node.slice, ast.Constant) and node.slice.value in names:
            out.append(f"{where}:{node.lineno} REGISTRY[{node.slice.value!r}]")
        if isinstance(node, ast.match_case):
            consts = {n.value.value for n in ast.walk(node.pattern)
                      if isinstance(n, ast.MatchValue) and isinstance(n.value, ast.Constant) and n.value.value in names}
            if consts:
                out.append(f"{where}:{node.pattern.lineno} case {sorted(consts)}")
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        consts = set()
        for op in operands:
            items = op.elts if isinstance(op, (ast.Tuple, ast.List, ast.Set)) else [op]
            consts |= {e.value for e in items if isinstance(e, ast.Constant) and e.value in names}
        if consts and any("method" in ast.unparse(op) or "name" in ast.unparse(op) for op in operands
                          if not isinstance(op, (ast.Constant, ast.Tuple, ast.List, ast.Set))):
            out.append(f"{where}:{node.lineno} {sorted(consts)}")
    return out


def test_no_module_branches_on_a_literal_method_name():
    """What a method is lives in its registry entry: no `cfg.run.method == "bu"` or `method in ("td",)` outside
    registry.py (the issue-27 review found six)."""
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name != "registry.py":
            offenders += literal_name_comparisons(path.read_text(), str(path.relative_to(SRC)))
    assert not offenders, offenders


@pytest.mark.parametrize("planted", ['if method == "replay":\n    pass\n', 'x = cfg.run.method != "bu"\n',
                                     'ok = summary["method"] in ("td",)\n', 'y = "icarl" == self.method\n',
                                     'z = self.info.name == "der"\n', 'w = REGISTRY["replay"].memory\n',
                                     'match cfg.run.method:\n    case "bu":\n        pass\n'])
def test_the_literal_name_guard_catches_a_planted_comparison(planted):
    assert literal_name_comparisons(planted), planted
    assert not literal_name_comparisons('if mode == "joint":\n    pass\n')     # a BatchNorm mode, not a method
    assert not literal_name_comparisons('done = rd.stage_done("stream")\n')


def test_method_classes_do_not_restate_registry_traits():
    import importlib
    for name, m in REGISTRY.items():
        if not m.runnable or "." not in m.target.split(":")[1]:
            continue
        cls = getattr(importlib.import_module(m.target.split(":")[0]), m.target.split(":")[1].split(".")[0])
        traits = {f.name for f in dataclasses.fields(registry.Method)} | {"uses_teacher", "local_ce", "default_batching"}
        for klass in cls.__mro__:
            if klass.__module__.startswith("llt.methods"):
                assert not traits & set(vars(klass)), (klass.__name__, traits & set(vars(klass)))
