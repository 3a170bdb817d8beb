"""The layer rule, read from the sources with `ast` (no module is imported):

- model/ imports no module of ours (no preprocess, pipeline, launchers, bench, tests) and never Ray;
- preprocess/ may import model, never pipeline; pipeline/ may import model, never preprocess;
- nothing but launchers/ itself imports launchers (not model, preprocess, pipeline, bench nor tests);
- a test module imports no other test module (shared helpers live in tests/support.py);
- there is no import cycle among our modules, counting imports inside functions too (a cycle that only works
  because one side imports late is still a cycle: it breaks as soon as that import moves to the top).

Every `import x` and `from x import y` counts, at the top of a module or nested in a function, a class or an `if`;
relative imports are resolved against the importing module's package.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from tests.support import REPO

OURS = ("model", "preprocess", "pipeline", "launchers", "bench", "tests")
# The packages the layer rule is about; bench/ and tests/ are read too, for the launchers rule and the cycles.
LAYERS = ("model", "preprocess", "pipeline", "launchers")
# Which of our top-level packages each layer may import (itself always).
ALLOWED = {
    "model": set(),
    "preprocess": {"model"},
    "pipeline": {"model"},
    "launchers": {"model", "preprocess", "pipeline"},
    "bench": {"model", "preprocess", "pipeline"},
    "tests": {"model", "preprocess", "pipeline", "bench"},
}
# Test modules: they import helpers from tests.support (or tests.slurm_harness), never from each other.
TEST_MODULES = ("tests.unit.", "tests.integration.")
# Third-party packages a layer must never import.
BANNED_THIRD_PARTY = {"model": {"ray"}}


@dataclass(frozen=True)
class Import:
    importer: str  # the importing module, dotted (pipeline.planning.memory)
    file: str  # its file, relative to the root
    line: int
    target: str  # the imported module, dotted and absolute; for `from a import b`: a.b when that is a module


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files(root: Path, packages=OURS) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the packages that exist under `root`."""
    files = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            if "__pycache__" not in path.parts:
                files[module_name(root, path)] = path
    return files


def imports_of(root: Path, name: str, path: Path, modules: set[str]) -> list[Import]:
    """Every import in the file, wherever it is in the file, resolved to an absolute dotted name."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    rel = str(path.relative_to(root))
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [Import(name, rel, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from . import x`, `from ..a import b`
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:
                candidate = f"{source}.{alias.name}" if source else alias.name
                found.append(Import(name, rel, node.lineno, candidate if candidate in modules else source))
    return found


def owner(target: str, modules: set[str]) -> str | None:
    """The module of ours that an import of `target` runs: the longest dotted prefix that is one of our files."""
    parts = target.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


def layer_violations(root: Path) -> list[str]:
    """Each import that breaks the layer rule, as `file:line: importer imports target (why)`."""
    files = source_files(root)
    modules = set(files)
    problems = []
    for name, path in files.items():
        layer = name.split(".")[0]
        for imp in imports_of(root, name, path, modules):
            top = imp.target.split(".")[0]
            where = f"{imp.file}:{imp.line}: {imp.importer} imports {imp.target}"
            if top in OURS and top != layer:
                if top == "launchers":
                    problems.append(f"{where} (nothing but launchers imports launchers)")
                elif top not in ALLOWED[layer]:
                    problems.append(f"{where} ({layer} may import {sorted(ALLOWED[layer]) or 'no module of ours'})")
            elif top in BANNED_THIRD_PARTY.get(layer, ()):
                problems.append(f"{where} ({layer} never imports {top})")
            if name.startswith(TEST_MODULES) and imp.target.startswith(TEST_MODULES):
                problems.append(f"{where} (a test module imports helpers from tests.support, not another test module)")
    return problems


def import_graph(root: Path) -> dict[str, set[str]]:
    """Our module -> the modules of ours it imports (top-level and in-function imports alike)."""
    files = source_files(root)
    modules = set(files)
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        for imp in imports_of(root, name, path, modules):
            target = owner(imp.target, modules)
            if target is not None and target != name:
                graph[name].add(target)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The cycles a depth-first search meets (each closing edge gives one), as chains a -> b -> a; each once,
    whatever module it was entered from. Every module on some cycle is on at least one of those reported."""
    cycles, seen = [], set()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):]
                start = cycle.index(min(cycle))  # one spelling per cycle: from its smallest name
                key = tuple(cycle[start:] + cycle[:start])
                if key not in seen:
                    seen.add(key)
                    cycles.append([*key, key[0]])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def check_layers(root: Path) -> list[str]:
    """Everything wrong with the layering under `root`: each bad import, then each cycle as `a -> b -> a`."""
    return layer_violations(root) + ["import cycle: " + " -> ".join(c) for c in import_cycles(import_graph(root))]


def test_the_layers_import_only_downwards_and_without_cycles():
    files = source_files(REPO)
    assert {"model.janus", "pipeline.train", "preprocess.job", "launchers.demo"} <= set(files)  # read them all
    assert {m.split(".")[0] for m in files} >= set(LAYERS)
    problems = check_layers(REPO)
    assert not problems, "\n".join(problems)


def write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_the_checker_reports_each_kind_of_violation(tmp_path):
    """A made-up tree breaking every rule once (some inside functions, some relative): each one is reported."""
    root = write(tmp_path, {
        "model/__init__.py": "",
        "model/a.py": "from pipeline import x\n",
        "model/b.py": "def late():\n    import ray.data\n",
        "model/c.py": "import os\nfrom . import d\n",  # fine: itself and the standard library
        "model/d.py": "import torch\n",
        "model/e.py": "def f():\n    from tests.support import REPO\n",
        "preprocess/__init__.py": "",
        "preprocess/job.py": "from model.d import torch\nfrom pipeline.data import reader\n",
        "pipeline/__init__.py": "",
        "pipeline/data/__init__.py": "",
        "pipeline/data/reader.py": "from ...preprocess import job\n",
        "pipeline/planning/__init__.py": "",
        "pipeline/planning/memory.py": "def report_of():\n    from pipeline.planning import report\n",
        "pipeline/planning/report.py": "from .memory import report_of\n",
        "pipeline/x.py": "import launchers.stage1\n",
        "launchers/__init__.py": "",
        "launchers/stage1.py": "from pipeline import x\nfrom preprocess import job\nfrom launchers import stage2\n",
        "launchers/stage2.py": "",
        "bench/loader.py": "from launchers.stage1 import main\n",
        "tests/__init__.py": "",
        "tests/support.py": "",
        "tests/unit/__init__.py": "",
        "tests/unit/test_a.py": "from tests.support import REPO\n",  # fine
        "tests/integration/__init__.py": "",
        "tests/integration/test_a.py": "def test():\n    from ..unit.test_a import REPO\n",
    })
    found = check_layers(root)
    expected = [
        "model/a.py:1: model.a imports pipeline.x (model may import no module of ours)",
        "model/b.py:2: model.b imports ray.data (model never imports ray)",
        "model/e.py:2: model.e imports tests.support (model may import no module of ours)",
        "preprocess/job.py:2: preprocess.job imports pipeline.data.reader (preprocess may import ['model'])",
        "pipeline/data/reader.py:1: pipeline.data.reader imports preprocess.job (pipeline may import ['model'])",
        "pipeline/x.py:1: pipeline.x imports launchers.stage1 (nothing but launchers imports launchers)",
        "bench/loader.py:1: bench.loader imports launchers.stage1 (nothing but launchers imports launchers)",
        "tests/integration/test_a.py:2: tests.integration.test_a imports tests.unit.test_a (a test module imports "
        "helpers from tests.support, not another test module)",
    ]
    cycles = [
        "import cycle: pipeline.planning.memory -> pipeline.planning.report -> pipeline.planning.memory",
        # reader -> job -> reader: the relative `from ...preprocess import job` resolved
        "import cycle: pipeline.data.reader -> preprocess.job -> pipeline.data.reader",
        "import cycle: launchers.stage1 -> pipeline.x -> launchers.stage1",
    ]
    assert sorted(found) == sorted(expected + cycles), "\n".join(found)
    # Clean once the violations go: the checker's silence above is the rule holding, not a reader that sees nothing.
    for rel in ("model/a.py", "model/b.py", "model/e.py", "preprocess/job.py", "pipeline/data/reader.py",
                "pipeline/x.py", "pipeline/planning/memory.py", "bench/loader.py", "tests/integration/test_a.py"):
        (root / rel).write_text("import os\n")
    assert check_layers(root) == []


def test_a_longer_cycle_is_reported_as_a_readable_chain(tmp_path):
    root = write(tmp_path, {"pipeline/__init__.py": "", "pipeline/a.py": "import pipeline.b\n",
                            "pipeline/b.py": "from pipeline import c\n",
                            "pipeline/c.py": "def f():\n    import pipeline.a\n"})
    assert check_layers(root) == ["import cycle: pipeline.a -> pipeline.b -> pipeline.c -> pipeline.a"]
