#!/usr/bin/env bash
# The GPU checks, as one prepared script for a GPU machine without network access, in at most 6 minutes.
#
#   here (with network):  bash bench/gpu_wheels.sh      # pinned wheels + CPU-built Stage II inputs -> gpu-wheels/
#   there (carry gpu-wheels/):  OUT=/some/dir bash bench/gpu_check.sh
#   rehearsal on a CPU (what `make test` runs through tests/integration/test_gpu_check.py):
#       GPU_CHECK_DRY=1 GPU_CHECK_WHEELS=DIR GPU_CHECK_CONSTRAINTS=FILE GPU_CHECK_REQUIRE="..." bash bench/gpu_check.sh
#
# Order: environment facts ($OUT/env.json) first; the carried wheels installed offline into a fresh target directory
# put first on PYTHONPATH, their versions asserted against constraints.txt (a missing or wrong wheel stops the script
# here, loudly); then each part under `timeout -k` with its own cap. Every part (each configuration of a bench its
# own run) appends one JSON line to $OUT/results.jsonl the moment it ends and one line to $OUT/summary.txt (name,
# exit code, seconds, cap); all output goes to $OUT/log.txt. Nothing is compiled (no torch.compile settings).
# The caps below add up to BUDGET (a test checks it): a whole run fits one 10-minute command with room to rerun it.
# A part may also use the seconds earlier parts left unused (the later parts keep their caps); it never runs past
# BUDGET: with less than 5 s left it is skipped, and says so.
#
# GPU_CHECK_DRY=1 (no CUDA needed): the same steps with the tiny presets, where each part only parses its exact
# command line (bench scripts through `gpu_check_parts.py argcheck`, pytest parts with --collect-only), and the
# Stage II inputs are built here. Copy the figures into docs/benchmarks.md's table with the card's name.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

BUDGET=360
CAP_env=15
CAP_wheels=30
CAP_shards=15
CAP_kernels=50
CAP_stage2=60
CAP_train_step_ckpt_on=45
CAP_train_step_ckpt_off=35
CAP_vq=30
CAP_host_syncs_unit=25
CAP_host_syncs_train=55

DRY=${GPU_CHECK_DRY:-0}
PY=${PYTHON:-python3}   # there: the image's python3, the one with its CUDA torch
if [[ $DRY == 1 && -z ${PYTHON:-} && -x .venv/bin/python ]]; then PY=.venv/bin/python; fi
OUT=${OUT:-gpu-results}
WHEELS=${GPU_CHECK_WHEELS:-gpu-wheels}
CONSTRAINTS=${GPU_CHECK_CONSTRAINTS:-constraints.txt}
# Carried wheels that must be there, and DeepSpeed, which may be (without it: no Stage II run, no train() syncs).
REQUIRE=${GPU_CHECK_REQUIRE:-transformers tokenizers safetensors huggingface-hub pydantic pytest}
OPTIONAL=${GPU_CHECK_OPTIONAL:-deepspeed}
IMPORTS=${GPU_CHECK_IMPORTS:-transformers tokenizers safetensors pydantic pytest}
START=$SECONDS
REST=0  # the sum of the caps of the parts not run yet
for v in ${!CAP_*}; do REST=$((REST + ${!v})); done

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
: >"$OUT/results.jsonl"
: >"$OUT/summary.txt"
: >"$OUT/log.txt"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
TARGET=$WORK/site   # the carried wheels' install target, first on PYTHONPATH for every part
export PYTHONPATH="$TARGET:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INDEX=1   # nothing may reach for a network
DRYFLAG=()
[[ $DRY == 1 ]] && DRYFLAG=(--dry)

say() { echo "gpu_check: $*" | tee -a "$OUT/log.txt" >&2; }

# part NAME CONFIG RESULT_JSON COMMAND...: run under its cap (cut to what is left of BUDGET), keep going on failure.
part() {
  local name=$1 config=$2 result=$3; shift 3
  local capvar="CAP_$name" cap left t0 rc status=""
  REST=$((REST - ${!capvar}))        # the caps of the parts still to come stay theirs...
  left=$((BUDGET - (SECONDS - START)))
  cap=$((left - REST))               # ...and this part may use what earlier ones left unused,
  ((cap < ${!capvar})) && cap=${!capvar}
  ((cap > left)) && cap=$left        # but never beyond the budget
  if ((cap < 5)); then
    status=skipped_no_time; rc=125
    say "$name: skipped, ${left}s left of the ${BUDGET}s budget"
    echo "$name rc=$rc status=$status config=$config" >>"$OUT/summary.txt"
    "$PY" bench/gpu_check_parts.py record --out "$OUT/results.jsonl" --part "$name" --config "$config" --rc "$rc" \
      --seconds 0 --cap 0 --status "$status" "${DRYFLAG[@]}" || true
    return 0
  fi
  echo "=== $name [$config] (cap ${cap}s)" >>"$OUT/log.txt"
  t0=$(date +%s.%N)
  set +e
  timeout -k 5 "$cap" "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  set -e
  local secs
  secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')
  cat "$WORK/$name.log" >>"$OUT/log.txt"
  echo "=== $name exit $rc after ${secs}s" >>"$OUT/log.txt"
  echo "$name rc=$rc seconds=$secs cap=$cap config=$config" >>"$OUT/summary.txt"
  "$PY" bench/gpu_check_parts.py record --out "$OUT/results.jsonl" --part "$name" --config "$config" --rc "$rc" \
    --seconds "$secs" --cap "$cap" --result "$result" --log "$WORK/$name.log" "${DRYFLAG[@]}" || true
  say "$name exit $rc (${secs}s, cap ${cap}s)"
  return 0
}

skip() {  # skip NAME WHY
  local capvar="CAP_$1"
  REST=$((REST - ${!capvar}))
  echo "$1 rc=125 status=skipped why=$2" >>"$OUT/summary.txt"
  "$PY" bench/gpu_check_parts.py record --out "$OUT/results.jsonl" --part "$1" --rc 125 --seconds 0 --cap 0 \
    --status "skipped: $2" "${DRYFLAG[@]}" || true
  say "$1 skipped: $2"
}

echo "mode=$([[ $DRY == 1 ]] && echo dry || echo gpu) budget=$BUDGET python=$PY wheels=$WHEELS" >>"$OUT/summary.txt"

# 1. Environment facts, before anything is installed (the image's own versions).
part env "" "" "$PY" bench/gpu_check_parts.py env "$OUT/env.json" "${DRYFLAG[@]}"

# 2. The carried wheels, offline, into $TARGET; a missing or wrong wheel ends the check here (exit 3).
read -r -a require <<<"$REQUIRE"
read -r -a optional <<<"$OPTIONAL"
read -r -a imports <<<"$IMPORTS"
part wheels "$WHEELS" "$WORK/wheels.json" "$PY" bench/gpu_check_parts.py wheels --dir "$WHEELS" --target "$TARGET" \
  --constraints "$CONSTRAINTS" --require "${require[@]}" --optional "${optional[@]}" --imports "${imports[@]}" \
  --json "$WORK/wheels.json"
if ! grep -q '^wheels rc=0 ' "$OUT/summary.txt"; then
  grep -h 'gpu_check: FAILED' "$WORK/wheels.log" >&2 || tail -n 5 "$WORK/wheels.log" >&2
  say "FAILED: the carried wheels did not install as pinned; no part was run (see $OUT/log.txt)"
  echo "result=FAILED at wheels" >>"$OUT/summary.txt"
  exit 3
fi
DEEPSPEED=$("$PY" -c 'import json, sys; print(int("deepspeed" in json.load(open(sys.argv[1]))["installed"]))' \
  "$WORK/wheels.json")
echo "deepspeed_carried=$DEEPSPEED" >>"$OUT/summary.txt"
[[ $DEEPSPEED == 1 ]] || say "DeepSpeed is not among the carried wheels: no Stage II run, no train() host syncs"
# The tests' photographs: a stand-in for the photo package, carried by gpu_wheels.sh, when the image lacks it.
if [[ -d $WHEELS/photos ]] && ! "$PY" -c "import skimage.data" 2>/dev/null; then
  export PYTHONPATH="$PYTHONPATH:$(cd "$WHEELS/photos" && pwd)"
fi

# 3. Stage II inputs: the tokenizer and shards carried (built on the CPU by gpu_wheels.sh), the tiny initial weights
# made here; without carried ones (and in the rehearsal) all of it is built here, on this machine's CPU.
INPUTS=$WORK/stage2-inputs
if [[ $DRY != 1 && -d $WHEELS/stage2-inputs/tokenizer ]]; then
  cp -r "$WHEELS/stage2-inputs" "$INPUTS"
  part shards "tiny, init only (shards carried)" "" "$PY" bench/gpu_check_parts.py shards --init-only --out "$INPUTS"
else
  part shards tiny "" "$PY" bench/gpu_check_parts.py shards --out "$INPUTS"
fi

PYTEST=("$PY" -m pytest -q -p no:cacheprovider)
if [[ $DRY == 1 ]]; then
  PYTEST+=(--collect-only)
  RUN=("$PY" bench/gpu_check_parts.py argcheck)  # parse the exact command line, run nothing
  MODEL=tiny DEVICE=cpu SEQ=1024 PRESET=tiny
else
  PYTEST+=(-rA)
  RUN=("$PY")
  MODEL=1b DEVICE=cuda SEQ=4096 PRESET=1b
fi

# 4. The kernel tests on the real kernel (bf16 forward and gradients, per-sample isolation).
part kernels "tests/unit/test_attention_backends.py" "" "${PYTEST[@]}" tests/unit/test_attention_backends.py

# 5. A 1-rank ZeRO-3 Stage II run of a few steps: finite loss, a COMPLETE checkpoint, an export transformers loads.
if [[ $DEEPSPEED == 1 || $DRY == 1 ]]; then
  part stage2 "tiny, 1 rank, 3 steps" "$WORK/stage2.json" "$PY" bench/gpu_check_parts.py stage2 --inputs "$INPUTS" \
    --out "$WORK/stage2-run" --steps 3 --json "$WORK/stage2.json" "${DRYFLAG[@]}"
else
  skip stage2 "DeepSpeed not among the carried wheels"
fi

# 6. bench/train_step.py, 1b at 4096 tokens, varlen, checkpointing on and off (one run, one JSON line each).
for ckpt in on off; do
  part "train_step_ckpt_$ckpt" "$MODEL seq $SEQ varlen checkpointing $ckpt" "$WORK/train_step_$ckpt.json" \
    "${RUN[@]}" bench/train_step.py --model "$MODEL" --device "$DEVICE" --seq-len "$SEQ" --backends varlen \
    --checkpointing "$ckpt" --steps 5 --json "$WORK/train_step_$ckpt.json"
done

# 7. bench/vq.py: the VQ settings, each on the same images.
part vq "$PRESET batches 32 128" "$WORK/vq.json" "${RUN[@]}" bench/vq.py --device "$DEVICE" --preset "$PRESET" \
  --batches 32 128 --iters 3 --json "$WORK/vq.json"

# 8. Host syncs (issue 18): a pinned batch's copy under torch.cuda.set_sync_debug_mode("error"); then train() for
# 5 steps on one rank, each wait attributed to ours or DeepSpeed's (-rA prints the list).
part host_syncs_unit "tests/unit/test_host_syncs.py" "" "${PYTEST[@]}" tests/unit/test_host_syncs.py
if [[ $DEEPSPEED == 1 || $DRY == 1 ]]; then
  part host_syncs_train "tests/integration/test_host_syncs.py" "" "${PYTEST[@]}" tests/integration/test_host_syncs.py
else
  skip host_syncs_train "DeepSpeed not among the carried wheels"
fi

failed=$(awk '$2 != "rc=0" && $2 != "rc=125" && $1 !~ /=/ {print $1}' "$OUT/summary.txt" | tr '\n' ' ')
echo "seconds=$((SECONDS - START)) budget=$BUDGET" >>"$OUT/summary.txt"
if [[ -n $failed ]]; then
  echo "result=FAILED parts: $failed" >>"$OUT/summary.txt"
  say "FAILED parts: $failed(see $OUT/log.txt)"
  exit 1
fi
echo "result=ok" >>"$OUT/summary.txt"
say "all parts passed in $((SECONDS - START))s (results in $OUT)"
