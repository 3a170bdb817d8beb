"""A missing extra (`pip install .` without [train] or [preprocess]) is one line naming the pip install, from the
launchers, the installed commands and `python -m preprocess` (model/extras.py). Before: a bare
`ModuleNotFoundError: deepspeed`.

Each test runs the real entry point in a child Python in which the extra's package cannot be imported
(`sys.modules[name] = None`, as an uninstalled package fails), never by mocking our code.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import REPO

BLOCK = "import sys; sys.modules[{module!r}] = None; "
SCRIPT = BLOCK + "import runpy; sys.argv = [{path!r}, '--help']; runpy.run_path({path!r}, run_name='__main__')"
MODULE = BLOCK + "import runpy; sys.argv = [{path!r}, '--help']; runpy.run_module({path!r}, run_name='__main__')"
ENTRY = BLOCK + "sys.argv = ['janus', '--help']; from launchers.extras import {entry}; {entry}()"
# The package's metadata gone (a checkout never pip-installed): pyproject.toml says which extra holds what.
NO_METADATA = ("import importlib.metadata as m\ndef gone(name): raise m.PackageNotFoundError(name)\n"
               "m.requires = gone\n")


def run_child(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


def assert_one_line(done: subprocess.CompletedProcess, module: str, extra: str) -> None:
    assert done.returncode == 2, done.stderr[-2000:]
    err = done.stderr.strip().splitlines()
    assert err == [f"error: {module} is not installed: this command needs janus-pipeline's [{extra}] extra: "
                   f"pip install 'janus-pipeline[{extra}]' (in a checkout: pip install -e '.[{extra}]')"], err
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("path", "module", "extra"), [
    ("launchers/stage1.py", "deepspeed", "train"),
    ("launchers/stage2.py", "deepspeed", "train"),
    ("launchers/stage3.py", "deepspeed", "train"),
    ("launchers/export.py", "deepspeed", "train"),
])
def test_launcher_without_its_extra_names_the_pip_install(path, module, extra):
    assert_one_line(run_child(SCRIPT.format(module=module, path=path)), module, extra)


def test_python_m_preprocess_without_its_extra_names_the_pip_install():
    """`ray job submit ... -- python -m preprocess ...`, the README's command, on a machine without the extra."""
    assert_one_line(run_child(MODULE.format(module="ray", path="preprocess")), "ray", "preprocess")


@pytest.mark.parametrize(("entry", "module", "extra"), [
    ("train", "deepspeed", "train"),
    ("export", "deepspeed", "train"),
    ("preprocess", "ray", "preprocess"),
])
def test_installed_command_without_its_extra_names_the_pip_install(entry, module, extra):
    assert_one_line(run_child(ENTRY.format(module=module, entry=entry)), module, extra)


def test_without_package_metadata_the_extra_comes_from_pyproject():
    assert_one_line(run_child(NO_METADATA + ENTRY.format(module="deepspeed", entry="train")), "deepspeed", "train")


def test_a_missing_base_dependency_keeps_its_traceback():
    """safetensors is no extra's: the message would send the user to the wrong fix, so it is not given."""
    done = run_child(ENTRY.format(module="safetensors", entry="train"))
    assert done.returncode == 1
    assert "ModuleNotFoundError" in done.stderr and "pip install 'janus-pipeline[" not in done.stderr
