#!/usr/bin/env bash
# The GPU check of guide cost, for the device machine (no network there): installs the wheels
# carried in .whl, then runs the renderer check and the cost benchmark on the preprocessed datasets
# carried in .devdata (built here by benchmarks/bench_pipeline_overhead.py's build_dataset).
#   bash benchmarks/device_run.sh OUTDIR
set -uo pipefail
out=${1:-/tmp/device_out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 nnUNet_raw=/tmp/raw nnUNet_compile=false
nvidia-smi -L | tee "$out/gpu.txt"
python3 benchmarks/check_renderer_device.py --device cuda 2>&1 | tee "$out/renderer.txt"
for d in hippocampus lits; do
  pp=$(ls -d .devdata/$d/nnUNet_preprocessed/Dataset*)
  nnUNet_results=/tmp/results_$d python3 benchmarks/bench_pipeline_overhead.py --preprocessed "$pp" --device cuda \
    --batches ${BATCHES:-24} --steps ${STEPS:-8} --rounds 4 ${EXTRA:-} 2>&1 | grep -v "^20[0-9][0-9]-" | tee "$out/bench_$d.txt"
done
