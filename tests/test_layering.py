"""The layering the tree promises (docs/design.md, "Layers"), checked from the code's own imports.

    entry points   agfsync_jax/{main,pipeline,stages,stage_runner,clean}.py
    stages         <area>/stage.py, each listed once in agfsync_jax.stages.STAGES
    library        every other agfsync_jax module: never imports a stage, an entry point or data_prep
    prep library   data_prep/: PyTorch/LLM side; imports from agfsync_jax only the shared contracts

Every import counts, including those inside functions (they run too), and the module graph has
no cycles.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("agfsync_jax", "data_prep")
ENTRY_POINTS = {"agfsync_jax.main", "agfsync_jax.pipeline", "agfsync_jax.stages", "agfsync_jax.stage_runner",
                "agfsync_jax.clean"}
# What data_prep may use from agfsync_jax: record schemas, the work directory layout, atomic I/O,
# done markers and fingerprints, error types, the score weights, the pair record format, the
# tiny tokenizer recipe, TensorFlow's CPU-only import and the statistics of win rates.
CONTRACTS = {"agfsync_jax", "agfsync_jax.schemas", "agfsync_jax.workdir", "agfsync_jax.atomic_io",
             "agfsync_jax.done_marker", "agfsync_jax.fingerprint", "agfsync_jax.errors", "agfsync_jax.score_weights",
             "agfsync_jax.pairs", "agfsync_jax.pairs.records", "agfsync_jax.pairs.metadata", "agfsync_jax.tiny",
             "agfsync_jax.tiny.tokenizer", "agfsync_jax.tf_cpu", "agfsync_jax.evaluation",
             "agfsync_jax.evaluation.statistics", "agfsync_jax.storage"}


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every project module a file imports (absolute imports). `from a import b` counts a.b when it
    is a module, and a itself only for names that are not submodules (as import linters do:
    running a package's __init__ on the way to its submodule is not a dependency on it)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            submodules = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES]
            names = submodules + ([node.module] if len(submodules) < len(node.names) else [])
        else:
            continue
        found.update(n for n in names if n in MODULES)
    return found


GRAPH = {m: _imports(p) - {m} for m, p in MODULES.items()}


def _is_stage(module: str) -> bool:
    return module.endswith(".stage")


def _layer(module: str) -> str:
    if module in ENTRY_POINTS:
        return "entry"
    if _is_stage(module):
        return "stage"
    return "library" if module.startswith("agfsync_jax") else "prep"


def test_library_modules_import_no_stage_entry_point_or_data_prep():
    bad = [f"{m} -> {d}" for m, deps in GRAPH.items() if _layer(m) == "library"
           for d in sorted(deps) if _layer(d) in ("stage", "entry") or d.startswith("data_prep")]
    assert not bad, "library modules must not import stages, entry points or data_prep:\n" + "\n".join(bad)


def test_jax_side_stages_do_not_import_data_prep():
    bad = [f"{m} -> {d}" for m, deps in GRAPH.items() if m.startswith("agfsync_jax") and _layer(m) != "prep"
           for d in sorted(deps) if d.startswith("data_prep")]
    assert not bad, "agfsync_jax runs data_prep stages only through the stage table:\n" + "\n".join(bad)


def test_data_prep_uses_only_the_shared_contracts_of_agfsync_jax():
    bad = [f"{m} -> {d}" for m, deps in GRAPH.items() if m.startswith("data_prep")
           for d in sorted(deps) if d.startswith("agfsync_jax") and d not in CONTRACTS]
    assert not bad, "data_prep may import only these agfsync_jax modules: " + ", ".join(sorted(CONTRACTS)) + \
        "\n" + "\n".join(bad)


def test_stages_do_not_import_each_other():
    bad = [f"{m} -> {d}" for m, deps in GRAPH.items() if _layer(m) == "stage" for d in sorted(deps) if _is_stage(d)]
    assert not bad, "stages talk through their artifacts (and the stage table), not imports:\n" + "\n".join(bad)


def test_no_import_cycles():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"


def test_every_stage_module_is_in_the_stage_table_once():
    from agfsync_jax import stages

    listed = [s.module for s in stages.STAGES]
    assert len(listed) == len(set(listed)) and len({s.name for s in stages.STAGES}) == len(listed)
    on_disk = {m for m in MODULES if _is_stage(m)}
    assert on_disk <= set(listed), f"stage modules missing from agfsync_jax/stages.py: {sorted(on_disk - set(listed))}"
    for module in listed:
        assert module in MODULES, module


@pytest.mark.parametrize("stage", [s.name for s in __import__("agfsync_jax.stages").stages.STAGES])
def test_stage_modules_expose_run(stage):
    from agfsync_jax import stages

    module = importlib.import_module(stages.get(stage).module)
    assert callable(getattr(module, "run_clean" if stage == "clean" else "run"))


def test_the_checker_sees_function_level_imports(tmp_path):
    """The rules above would be empty if imports inside functions were missed."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from agfsync_jax import stages\n    import data_prep.scoring.stage\n"
                   "from agfsync_jax.models import denoiser, FAMILIES\n")
    assert _imports(src) == {"agfsync_jax.stages", "data_prep.scoring.stage", "agfsync_jax.models.denoiser",
                             "agfsync_jax.models"}
