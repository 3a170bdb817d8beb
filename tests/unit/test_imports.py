"""Every module of model/ and pipeline/ imports, and none pulls in Ray: training and inference must run
without it (Ray is only for preprocessing)."""

import json
import pkgutil
import subprocess
import sys

import model
import pipeline


def package_modules() -> list[str]:
    """model, pipeline and every module under them, found on disk so that a new module is covered too."""
    names = []
    for package in (model, pipeline):
        names.append(package.__name__)
        names += [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    return names


def test_every_model_and_pipeline_module_imports_without_ray():
    names = package_modules()
    assert {"model.janus", "model.weights", "pipeline.train", "pipeline.data"} <= set(names), names
    # A fresh interpreter: this test process may already hold Ray from other tests.
    code = ("import importlib, json, sys\n"
            "for name in json.loads(sys.argv[1]):\n"
            "    importlib.import_module(name)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(names)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
