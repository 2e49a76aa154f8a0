"""The package's import rules, read from the source with ``ast`` (function-level imports included).

ops -> layers -> models -> evaluation -> training      (each may import those to its left)
data knows no model; evaluation never imports training; ops/layers/models/evaluation never
import Lightning; nothing imports the deprecated aliases (vlm_mamba/lit_module.py, ...); no cycles.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "vlm_mamba"
CORE = {"vlm_mamba.config", "vlm_mamba.registry", "vlm_mamba.generation"}
ALIASES = {f"vlm_mamba.{n}" for n in ("lit_module", "callbacks", "metrics", "results", "report", "export")}
# group -> the groups it may import (itself included)
ALLOWED = {
    "core": {"core"},
    "ops": {"ops"},
    "layers": {"layers", "ops", "core"},
    "models": {"models", "layers", "ops", "core", "data"},
    "data": {"data", "core"},
    "evaluation": {"evaluation", "data", "models", "layers", "ops", "core"},
    "training": {"training", "evaluation", "data", "models", "layers", "ops", "core"},
    "demo": {"demo", "training", "evaluation", "data", "models", "core"},
    "package": {"core", "models"},  # vlm_mamba/__init__.py: the public API
    "alias": {"training", "evaluation"},
}
NO_LIGHTNING = {"core", "ops", "layers", "models", "evaluation"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def group(name: str) -> str:
    if name in ALIASES:
        return "alias"
    if name == "vlm_mamba":
        return "package"
    if name in CORE:
        return "core"
    return name.split(".")[1]


def imports(name: str) -> tuple[set[str], set[str]]:
    """(vlm_mamba modules, other top-level packages) imported anywhere in module ``name``."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    ours, others = set(), set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names]
        else:
            continue
        for t in targets:
            if t.split(".")[0] == "vlm_mamba":
                while t not in MODULES:  # `import vlm_mamba.x.y` of a name inside a module
                    t = t.rsplit(".", 1)[0]
                ours.add(t)
            else:
                others.add(t.split(".")[0])
    ours.discard(name)
    return ours, others


GRAPH = {name: imports(name) for name in MODULES}


def test_the_rules_see_every_module():
    assert {"vlm_mamba.training.module", "vlm_mamba.evaluation.tasks", "vlm_mamba.ops"} <= set(MODULES)
    assert "vlm_mamba.evaluation.tasks" in GRAPH["vlm_mamba.training.module"][0]  # validation scores
    assert "lightning" in GRAPH["vlm_mamba.training.module"][1]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_follow_the_layering(name):
    ours, others = GRAPH[name]
    g = group(name)
    bad = sorted(t for t in ours if group(t) not in ALLOWED[g])
    assert not bad, f"{name} ({g}) imports {bad}; {g} may import only {sorted(ALLOWED[g])}"
    if g in NO_LIGHTNING:
        assert not others & {"lightning", "pytorch_lightning"}, f"{name} ({g}) imports Lightning"


def test_no_import_cycles():
    """Depth-first search over every import edge (function-level ones too)."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node][0]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)
