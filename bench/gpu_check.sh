#!/usr/bin/env bash
# The GPU checks, as one prepared script for a session that is lent a GPU machine (~10 minutes).
#
#   here:  bash bench/gpu_wheels.sh            # pure-Python wheels the GPU image lacks -> gpu-wheels/
#   there: OUT=/some/dir bash bench/gpu_check.sh   (carry gpu-wheels/)
#
# Each part has its own time cap so one slow part cannot eat the lease. Results land in $OUT as JSON
# plus the printed tables; copy the figures into docs/benchmarks.md's table with the card's name.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
if compgen -G "gpu-wheels/*.whl" >/dev/null; then
  python -m pip install --quiet --no-deps gpu-wheels/*.whl
fi
python -m pip install --quiet --no-deps -e . 2>/dev/null || export PYTHONPATH=$PWD
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$OUT/gpu.txt"

part() {  # part NAME SECONDS COMMAND...: run with a cap, keep going on failure
  local name=$1 cap=$2; shift 2
  echo "=== $name (cap ${cap}s)"
  timeout "$cap" "$@" 2>&1 | tee "$OUT/$name.txt"
  echo "=== $name exit ${PIPESTATUS[0]}"
}

part attention_backends 90 python -m pytest -q -p no:cacheprovider tests/unit/test_attention_backends.py
part vq 150 python bench/vq.py --batches 32 128 --iters 3 --json "$OUT/vq.json"
part train_step_1b 240 python bench/train_step.py --model 1b --backends varlen sdpa --checkpointing both \
  --steps 5 --json "$OUT/train_step.json"
# Host syncs (issue 18): a pinned batch's copy under torch.cuda.set_sync_debug_mode("error"); train() for 5
# steps under mode "warn" ("error" would stop in DeepSpeed's own grad-norm check), each wait attributed to ours
# or DeepSpeed's, none of ours allowed outside log steps (-rA prints the list).
part host_syncs 120 python -m pytest -q -rA -p no:cacheprovider tests/unit/test_host_syncs.py tests/integration/test_host_syncs.py
