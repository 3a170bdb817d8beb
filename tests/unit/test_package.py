"""The package as a user installs it: declared dependencies, extras that keep inference light, the transformers
floor, and a wheel built from the sources that trains a step from outside the checkout.

In-process tests here; the ones that start processes or take long are in tests/integration/test_package.py.
"""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support import PACKAGES, REPO


def requirements() -> tuple[list[Requirement], dict[str, list[Requirement]]]:
    """pyproject.toml's base dependencies and its extras."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = {name: [Requirement(r) for r in reqs] for name, reqs in project["optional-dependencies"].items()}
    return [Requirement(r) for r in project["dependencies"]], extras


def third_party_imports(package: str, import_time_only: bool = False) -> dict[str, set[str]]:
    """Top-level module names imported by a package's files that are neither the standard library nor ours, each
    with the files importing it. import_time_only skips function bodies (imports deferred until a call)."""
    found: dict[str, set[str]] = {}

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            if import_time_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            names = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in PACKAGES and top != "__future__":
                    found.setdefault(top, set()).add(where)
            visit(child, where)

    for path in sorted((REPO / package).rglob("*.py")):
        visit(ast.parse(path.read_text()), str(path.relative_to(REPO)))
    return found


def distribution(module: str) -> str:
    """The distribution a module comes from (installed), else the module's own name (flash_attn -> flash-attn)."""
    dists = importlib.metadata.packages_distributions().get(module)
    return canonicalize_name(dists[0] if dists else module)


def test_every_import_is_declared_and_model_needs_only_the_base_dependencies():
    base, extras = requirements()
    base_names = {canonicalize_name(r.name) for r in base}
    every = base_names | {canonicalize_name(r.name) for reqs in extras.values() for r in reqs}
    undeclared = {module: sorted(files) for package in PACKAGES
                  for module, files in third_party_imports(package).items() if distribution(module) not in every}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    # model/ is inference too (model.generate, model.chat): what it imports on import must be the base set.
    beyond_base = {module: sorted(files) for module, files in third_party_imports("model", True).items()
                   if distribution(module) not in base_names}
    assert not beyond_base, f"model/ imports beyond the base dependencies at import time: {beyond_base}"


def test_model_imports_without_ray_or_deepspeed():
    """Inference installs neither: every module of model/ must import with both missing."""
    code = ("import importlib, pkgutil, sys\n"
            "sys.modules['ray'] = sys.modules['deepspeed'] = None  # any `import ray` / `import deepspeed` now fails\n"
            "import model\n"
            "for info in pkgutil.iter_modules(model.__path__):\n"
            "    importlib.import_module(f'model.{info.name}')\n"
            "import model.chat, model.generate\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_constraints_pin_every_dependency_within_the_declared_ranges():
    base, extras = requirements()
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    untested = {"flash-attn", "wandb"}  # neither runs on the CPU machines the tests run on
    for req in base + [r for reqs in extras.values() for r in reqs]:
        name = canonicalize_name(req.name)
        if name in untested:
            continue
        assert name in pins, f"{req.name} is a dependency but constraints.txt does not pin it"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject.toml's {req}"


def test_generation_refuses_transformers_older_than_5_24(monkeypatch):
    import transformers

    from model.generate import cfg_image_ids, check_transformers_version

    for ok in ("5.24.0", "5.25.0.dev0", "6.1.0"):
        monkeypatch.setattr(transformers, "__version__", ok)
        check_transformers_version()
    monkeypatch.setattr(transformers, "__version__", "5.18.0")
    with pytest.raises(RuntimeError, match=r"transformers 5\.18\.0 is installed.*transformers>=5\.24"):
        check_transformers_version()
    # Checked before the loop touches the model: the refusal comes first, whatever the arguments.
    with pytest.raises(RuntimeError, match=r"transformers 5\.18\.0"):
        cfg_image_ids(None, [[1, 2]], pad=0)
