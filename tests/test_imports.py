import subprocess
import sys


def test_model_and_pipeline_never_import_ray():
    code = ("import sys, model, model.janus, model.chat_format, model.batch, model.vq, model.stages, pipeline; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
