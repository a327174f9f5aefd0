#!/usr/bin/env bash
# GPU inference benchmark (issue 4): DDIM-10 and RTI on the Diffusion-Policy U-Net at batch 1,
# eager vs CUDA graph, fp32 vs bf16, against the memory-bandwidth bound; plus the CUDA tests of
# the GPU path. Writes $OUT/gpu_bench.json, $OUT/gpu_tests.log and $OUT/nvidia_smi.csv.
# Takes about a minute on an H200 once the machine is up. Set COMPILE=1 to also time
# torch.compile(mode="reduce-overhead") (adds minutes of compilation).
#
# The device image has torch but not diffusers: carry its wheels. Once, here, in the repo root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0
# then run it with the device tool: command "bash scripts/bench_inference_gpu.sh",
# carry [".whl"], timeout_s 420.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/*.whl || { echo "diffusers is missing and .whl/ holds no wheels (see the header)"; exit 3; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv \
  | tee "$OUT/nvidia_smi.csv"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_path.py 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -3
timeout 330 python3 -m dppo.bench_inference gpu --out "$OUT/gpu_bench.json" --repeats 50 \
  ${COMPILE:+--compile}
