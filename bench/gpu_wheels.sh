#!/usr/bin/env bash
# Wheels the lent GPU image lacks (it has torch, triton, pyarrow, pillow), for bench/gpu_check.sh.
# Compiled ones (pydantic-core, tokenizers, safetensors) are fetched for the GPU image's Python 3.12.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf gpu-wheels && mkdir -p gpu-wheels
python3 -m pip wheel --quiet --no-deps -w gpu-wheels "transformers==5.24.0" "deepspeed==0.19.8" hjson \
  "huggingface-hub>=1"
python3 -m pip download --quiet -d gpu-wheels --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 "pydantic>=2,<3" "tokenizers>=0.22" safetensors hf-xet
ls gpu-wheels
