"""One registry of method names (llt.registry), read by every consumer; no second list remains."""

from __future__ import annotations

import ast
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
            assert owner.name == name


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
