#!/usr/bin/env bash
# One short run for a GPU machine lent for a few minutes: the CUDA tests, then graft
# --device cuda against mergekit --cuda and the GPU I/O floor on a ~1.1B-parameter
# Llama family (TinyLlama's shape): ties, and graft's dare_ties against its ties.
# Everything it writes goes to $OUT (the results JSON, a BENCHMARKS.md section to
# paste, the logs).
#
# It needs, beside the repository: a python3 with torch (CUDA), transformers,
# safetensors, pyyaml, typer, rich, numpy, psutil and pytest; and mergekit 0.1.5 with
# what that python lacks as wheels in .whl/ (this machine's python may be another
# version: download for the GPU machine's, e.g. 3.12):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl mergekit==0.1.5 \
#     immutables==0.21 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types \
#     typing-inspection datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
#
# Budget: 1-2 min of tests, then about 1 min of family generation (on the GPU) and 4-6
# min of merges. Run from the repository root:  OUT=/tmp/gpu bash benchmarks/gpu.sh
# [all|tests|bench]
# (through the device tool: command "bash benchmarks/gpu.sh", carry [".whl"], where the
# tool sets $OUT and brings back what is under it).
set -uo pipefail
OUT=${OUT:-/tmp/graft-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/graft-site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/graft-site"
fi
bin=/tmp/graft-bin
mkdir -p "$bin"
printf '#!/bin/sh\nexec %s -m graft "$@"\n' "$PY" >"$bin/graft"
printf '#!/bin/sh\nexec %s -c "import sys; from mergekit.scripts.run_yaml import main; sys.argv[0] = \\"mergekit-yaml\\"; sys.exit(main())" "$@"\n' "$PY" >"$bin/mergekit-yaml"
ln -sf "$(command -v "$PY")" "$bin/python"
chmod +x "$bin/graft" "$bin/mergekit-yaml"

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
} 2>&1 | tee "$OUT/device.txt"

stage=${1:-all}  # all | tests | bench: two calls of the device tool fit its 10-min limit better

# 1. Every CUDA test (each skips without a GPU, so only here do they run).
[ "$stage" = bench ] || timeout 150 "$PY" -m pytest -q -p no:cacheprovider -rs \
  tests/test_plan.py tests/test_merge_invariants.py tests/test_merge_svd.py \
  tests/test_merge_opcm.py tests/test_merge_wudi.py -k cuda 2>&1 | tee "$OUT/cuda-tests.log"

# 2. The merge benchmark on the GPU. The page cache is dropped where allowed (root).
[ "$stage" = tests ] || timeout 400 "$PY" benchmarks/merge.py --device cuda --family 1b --methods ties \
  --repeats 2 --no-2x --no-vocab-256k --family-methods dare_ties --threads 8 \
  --workdir /tmp/graft-bench --graft "$bin/graft" --mergekit "$bin/mergekit-yaml" \
  --results "$OUT/gpu-merge.json" --markdown "$OUT/gpu-merge.md" 2>&1 | tee "$OUT/gpu-merge.log"
echo "gpu.sh done"
