#!/usr/bin/env bash
# The one call on a lent H200 (device tool, carry [".gpu-data"], timeout_s 570): the GPU tests,
# then bench/gpu.py, everything under $OUT. Prepare .gpu-data/ here first (bench/gpu.py's
# docstring): val pixels, efficientnet-lite0.onnx, and in .gpu-data/whl/ the wheels the image
# lacks for the build test (cryptography, cffi, pycparser for Python 3.12).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:?run this through the device tool}"
if ls .gpu-data/whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .gpu-data/whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
timeout 180 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_torch_engine.py \
  2>&1 | tee "$out/pytest-gpu.txt"
timeout 360 python3 bench/gpu.py --out "$out" --budget-s "${BUDGET_S:-210}" \
  --lite0 .gpu-data/efficientnet-lite0.onnx --pixels .gpu-data/val200.npy 2>&1 | tee "$out/log.txt"
