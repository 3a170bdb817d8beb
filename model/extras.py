"""A missing optional dependency said as the `pip install` that adds it, for every command line of the project.

`pip install .` installs inference only (model/); training, export and preprocessing need the `[train]` or
`[preprocess]` extra. Without it their first import fails deep inside the package with a bare
`ModuleNotFoundError: No module named 'deepspeed'`; `call` makes it one `error:` line naming the extra, exit 2.
Here, in the base package, so that every entry point can use it: the launchers and installed commands
(launchers/extras.py) and `python -m preprocess` (preprocess/__main__.py).
Which extra holds which package is read from the package's own metadata (pyproject.toml's
[project.optional-dependencies], the one place it is written), or from pyproject.toml in a checkout that was never
installed.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import sys
from pathlib import Path
from typing import Any

DISTRIBUTION = "janus-pipeline"
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _normalised(name: str) -> str:
    """A package or module name as pip compares them (PEP 503): flash_attn and flash-attn are one."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements() -> list[str]:
    """Our requirement strings with their markers (`deepspeed>=0.16,<0.20; extra == "train"`)."""
    try:
        return importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:  # a checkout run in place, never pip-installed
        pass
    try:
        import tomllib  # Python 3.11+; before it a checkout that was never installed gets the plain message
    except ModuleNotFoundError:
        return []
    try:
        extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    except (OSError, KeyError, ValueError):
        return []
    return [f'{req}; extra == "{extra}"' for extra, reqs in extras.items() for req in reqs]


def extra_of(module: str) -> str | None:
    """The extra whose requirements install top-level module `module` (deepspeed -> train), else None."""
    wanted = _normalised(module.split(".")[0])
    for requirement in _requirements():
        name = re.match(r"\s*([A-Za-z0-9._-]+)", requirement)
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", requirement)
        if name and extra and _normalised(name.group(1)) == wanted:
            return extra.group(1)
    return None


def missing_extra_message(module: str, extra: str) -> str:
    """The one line a user reads: what is missing and the command that installs it."""
    top = module.split(".")[0]
    return (f"{top} is not installed: this command needs janus-pipeline's [{extra}] extra: "
            f"pip install 'janus-pipeline[{extra}]' (in a checkout: pip install -e '.[{extra}]')")


def call(entry: str, *args: Any, **kwargs: Any) -> Any:
    """Import `entry` ("package.module:function") and call it; a package of an extra missing at import is one
    `error:` line and exit 2 (a retry fails the same way: a person must install it). Any other missing module is
    not ours to explain and keeps its traceback."""
    module_name, function = entry.split(":")
    try:
        target = getattr(importlib.import_module(module_name), function)
    except ModuleNotFoundError as error:
        extra = extra_of(error.name or "")
        if extra is None:
            raise
        print(f"error: {missing_extra_message(error.name or '', extra)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    return target(*args, **kwargs)
