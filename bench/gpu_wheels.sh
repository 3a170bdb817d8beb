#!/usr/bin/env bash
# What bench/gpu_check.sh carries to a GPU machine without network access, built here (with network) into one
# folder, gpu-wheels/ by default (git ignores it; name it in the run's carried paths):
#
#   - wheels of exactly the versions constraints.txt pins, for the GPU machine's Python (3.12, x86-64 Linux):
#     transformers, tokenizers, safetensors, huggingface-hub, pydantic, pytest, with their dependencies (binary
#     wheels only: `pip download --only-binary=:all:`), and DeepSpeed (it ships no wheel: built here, pure Python,
#     no ops) with its own few dependencies. What the GPU image already holds (torch, triton, numpy, pillow,
#     pyarrow) is left out: a carried numpy or torch would replace the image's CUDA build on the path;
#   - photos/: the tests' photographs as a stand-in `skimage.data` (the image has no scikit-image, and the tests'
#     conftest reads the photographs from there), used only where `import skimage.data` fails;
#   - stage2-inputs/: the tokenizer and shards of the 1-rank Stage II run, built on this CPU (its tiny initial
#     weights, 15 MB, are made there in seconds).
#
#   bash bench/gpu_wheels.sh [DIR]        (PYTHON=.venv/bin/python for the project's venv; GPU_PYTHON=3.12)
# Then check the folder offline on this machine: GPU_CHECK_DRY=1 GPU_CHECK_WHEELS=DIR bash bench/gpu_check.sh
# with a Python 3.12 (on another Python its wheel step refuses the 3.12 wheels, as it should).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-gpu-wheels}
PY=${PYTHON:-python3}
GPU_PYTHON=${GPU_PYTHON:-3.12}
MAX_MIB=${GPU_WHEELS_MAX_MIB:-48}   # the working tree and everything carried travel in 64 MiB
PINNED=(transformers tokenizers safetensors huggingface-hub pydantic pytest)
DEEPSPEED_DEPS=(hjson ninja msgpack psutil py-cpuinfo einops nvidia-ml-py)
IMAGE_HAS='^(torch|triton|numpy|pillow|pyarrow|nvidia_[a-z0-9_]+_cu[0-9]+|sympy|networkx|mpmath|jinja2|markupsafe)-'

pin() {  # pin NAME -> NAME==VERSION from constraints.txt, or stop
  local line
  line=$(grep -iE "^$1==[^ #]+" constraints.txt | head -n 1 | sed -E 's/[[:space:]]*#.*//') || true
  [[ -n $line ]] || { echo "gpu_wheels: FAILED: no '$1==VERSION' pin in constraints.txt" >&2; exit 2; }
  echo "$line"
}

specs=()
for name in "${PINNED[@]}"; do specs+=("$(pin "$name")"); done
deepspeed=$(pin deepspeed)
# The other pins (pyyaml, fsspec, numpy...) constrain the dependencies; torch is left out (nothing here needs it).
grep -vE '^torch==' constraints.txt >"${TMPDIR:-/tmp}/gpu-wheels-constraints.txt"
target=(--only-binary=:all: --python-version "$GPU_PYTHON" --implementation cp
        --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_34_x86_64)

rm -rf "$DEST" && mkdir -p "$DEST"
"$PY" -m pip download --quiet --disable-pip-version-check -d "$DEST" "${target[@]}" \
  -c "${TMPDIR:-/tmp}/gpu-wheels-constraints.txt" "${specs[@]}"
"$PY" -m pip download --quiet --disable-pip-version-check -d "$DEST" "${target[@]}" --no-deps "${DEEPSPEED_DEPS[@]}"
# DeepSpeed publishes only a source archive; its wheel is pure Python (no ops prebuilt), built against this torch.
if ! DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation \
  -w "$DEST" "$deepspeed"; then
  echo "gpu_wheels: DeepSpeed's wheel did not build: the check will skip its Stage II run and train() host syncs" >&2
fi
for f in "$DEST"/*.whl; do
  if [[ $(basename "$f") =~ $IMAGE_HAS ]]; then rm -f "$f"; fi
done

# The photographs the tests read, as a stand-in skimage.data.
photos=$("$PY" -c "import os, skimage.data; print(os.path.dirname(skimage.data.__file__))")
mkdir -p "$DEST/photos/skimage/data"
echo '"""Stand-in for scikit-image on the GPU machine: only skimage.data.__file__ (the photographs) is used."""' \
  >"$DEST/photos/skimage/__init__.py"
: >"$DEST/photos/skimage/data/__init__.py"
for name in astronaut.png chelsea.png coffee.png rocket.jpg motorcycle_left.png hubble_deep_field.jpg camera.png \
  logo.png; do
  cp "$photos/$name" "$DEST/photos/skimage/data/"
done

PYTHONPATH=$PWD "$PY" bench/gpu_check_parts.py shards --no-init --out "$DEST/stage2-inputs"

for spec in "${specs[@]}" "$deepspeed"; do
  name=${spec%%==*} version=${spec#*==}
  norm=$(echo "$name" | tr '-' '_')
  compgen -G "$DEST/${norm}-${version}-*.whl" >/dev/null || compgen -G "$DEST/${name}-${version}-*.whl" >/dev/null \
    || echo "gpu_wheels: no wheel of $spec in $DEST" >&2
done
size=$(du -sm "$DEST" | cut -f1)
ls "$DEST"
echo "gpu_wheels: $DEST holds ${size} MiB"
if ((size > MAX_MIB)); then
  echo "gpu_wheels: FAILED: $DEST is ${size} MiB, over ${MAX_MIB} MiB (all that travels must fit in 64 MiB)" >&2
  exit 1
fi
