"""The package layout: pure layers import nothing above them, and no import cycle exists (imports inside
functions included)."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "llt"


def imports() -> dict[str, set[str]]:
    """llt module -> the llt modules it imports (anywhere in the file)."""
    graph = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llt"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("llt"))
        graph[name] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_pruning_imports_only_pure_code():
    g = imports()
    allowed = {"llt.errors", "llt.storage", "llt.models", "llt.models.preact_resnet", "llt.pruning",
               "llt.registry"}   # the registry is pure data (the control masks' names)
    for module in (m for m in g if m.startswith("llt.pruning")):
        bad = {d for d in g[module] if d not in allowed and not d.startswith("llt.pruning.")}
        assert not bad, f"{module} imports {sorted(bad)}"


def test_lower_layers_never_import_methods_or_the_cli():
    g = imports()
    top = ("llt.methods", "llt.cli", "llt.reporting", "llt.__main__")
    for module, deps in g.items():
        if module.startswith(top):
            continue
        assert not {d for d in deps if d.startswith(top)}, f"{module} imports {sorted(deps)}"
    for module in ("llt.trainer", "llt.runs", "llt.checkpointing", "llt.evaluation", "llt.teaching"):
        assert not {d for d in g[module] if d.startswith(("llt.context", "llt.console"))}, module
    # the method modules build on the shared base (the baselines on their shared loop), never on each other;
    # the driver dispatches to them
    for module in ("llt.methods.topdown", "llt.methods.bottomup", "llt.methods.retrain", "llt.methods.incremental"):
        assert not {d for d in g[module] if d.startswith("llt.methods.") and d != "llt.methods.base"}, module
    for module in ("dense", "finetune", "joint", "replay", "lwf", "ewc", "icarl"):     # on the one CIL loop
        deps = {d for d in g[f"llt.methods.{module}"] if d.startswith("llt.methods.")}
        assert deps <= {"llt.methods.incremental"}, (module, deps)


def test_the_registry_is_pure_data():
    """llt.registry names the methods for every layer (config validation included), so it imports no llt code;
    it reaches a method's module only by name, when that method runs."""
    assert imports()["llt.registry"] == set()


def test_no_import_cycles():
    g = imports()
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in sorted(g[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
