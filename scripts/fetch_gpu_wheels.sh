#!/usr/bin/env bash
# Download the wheels caserve needs on the GPU machine's image (Python 3.12, manylinux x86_64) that the
# image lacks, into .gpu_wheels/ (git-ignored), and record the commit they go with.
# The image already has torch 2.11, transformers, tokenizers, safetensors, numpy, httpx, aiohttp, rich, tqdm, typer,
# pyyaml, matplotlib, prometheus-client, psutil, pytest (see docs/results.md, "GPU run").
# Usage: scripts/fetch_gpu_wheels.sh            (from the repository root; needs PyPI)
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.gpu_wheels
mkdir -p "$dest"
# Dependencies of these are resolved too (starlette, annotated-types, typing-inspection, ...); wheels only.
python -m pip download --quiet --dest "$dest" --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    --platform any \
    msgspec fastapi starlette uvicorn httptools pydantic pydantic-core tenacity "pytest-timeout>=2.3"
git rev-parse HEAD > "$dest/COMMIT" 2>/dev/null || true
du -sh "$dest"
ls "$dest"
