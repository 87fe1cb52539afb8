"""Import layering: the cycles issue 12 broke stay broken (pipeline <-> stages, training.ray_train
<-> training.sprec, raydpo.models <-> raydpo.quantization), found by a scan of every import
statement (function-level ones too), and the modules involved import on their own in a fresh
interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "raydpo"


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the raydpo modules it imports anywhere in its body (relative imports resolved;
    ``from pkg import name`` counts as importing ``pkg.name`` when that is a module)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                names = [f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name.startswith("raydpo") and name != mod:
                    deps.add(name)
        graph[mod] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_scan_finds_a_cycle():
    """The scan itself: a two-module cycle and a three-module one are found, a chain is not."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert sorted(map(sorted, cycles(graph))) == [["a", "b"], ["c", "d", "e"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    g = import_graph()
    assert "raydpo.training.selfplay" in g["raydpo.training.ray_train"]  # function-level imports count
    assert "raydpo.stages" in g["raydpo.pipeline"]


@pytest.mark.parametrize("pair", [("raydpo.pipeline", "raydpo.stages"),
                                  ("raydpo.training.ray_train", "raydpo.training.sprec")])
def test_broken_cycles_stay_broken(pair):
    for comp in cycles(import_graph()):
        assert not set(pair) <= comp, f"import cycle again: {sorted(comp)}"


def test_models_package_has_no_cycle_and_imports_nothing_above_it():
    graph = import_graph()
    inside = {m for m in graph if m == "raydpo.models" or m.startswith("raydpo.models.")}
    assert {"raydpo.models.device", "raydpo.models.hub", "raydpo.models.tiny", "raydpo.models.smollm2",
            "raydpo.models.scoring", "raydpo.models.quantization", "raydpo.models.loading"} <= inside
    for comp in cycles(graph):
        assert not comp & (inside | {"raydpo.quantization"}), f"import cycle: {sorted(comp)}"
    above = ("raydpo.training", "raydpo.generation", "raydpo.sampling", "raydpo.pipeline", "raydpo.stages",
             "raydpo.cli", "raydpo.tuning", "raydpo.report")
    for m in inside:
        bad = [d for d in graph[m] if d.startswith(above)]
        assert not bad, f"{m} imports {bad} (a layer above raydpo.models)"


MODULES = ["raydpo.models", "raydpo.models.quantization", "raydpo.quantization", "raydpo.pipeline", "raydpo.stages",
           "raydpo.training.ray_train", "raydpo.training.sprec", "raydpo.training.selfplay",
           "raydpo.training.reference"]


def test_each_module_imports_alone_in_a_fresh_interpreter():
    code = ("import importlib, sys\n"
            "for name in sys.argv[1:]:\n"
            "    importlib.import_module(name)\n")
    for name in MODULES:  # one interpreter per module: nothing imported before it
        r = subprocess.run([sys.executable, "-c", code, name], capture_output=True, text=True, timeout=300,
                           cwd=PKG.parent)
        assert r.returncode == 0, f"import {name} failed:\n{r.stderr[-2000:]}"


def test_old_import_paths_still_work():
    import raydpo.models as models
    import raydpo.quantization as old
    from raydpo.models import quantization as new
    from raydpo.training import sprec

    assert old.bnb_config is new.bnb_config and old.combination_error is new.combination_error
    assert models.load_model.__module__ == "raydpo.models.loading"
    assert models.sequence_logprobs.__module__ == "raydpo.models.scoring"
    from raydpo.training.selfplay import sample_rows, selfplay_rows

    assert sprec.selfplay_rows is selfplay_rows and sprec.sample_rows is sample_rows
    from raydpo import pipeline, stages

    assert pipeline.preference_file is stages.preference_file
