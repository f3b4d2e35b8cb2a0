#!/usr/bin/env bash
# The issue-12 training study on the GPU machine (no network there): installs the wheels carried in
# .whl (see device_run.sh), unpacks the study datasets carried in .studypack/study.tar.xz (built here
# with `python benchmarks/click_study.py prepare .study && tar -cf - .study | xz -9 > .studypack/study.tar.xz`),
# runs the hippocampus and LiTS studies side by side, and copies the tables, summaries, evaluation
# results and the small LiTS models to OUT.
#   BUDGET=420 bash benchmarks/device_study.sh OUTDIR
set -uo pipefail
out=${1:-/tmp/study_out}
budget=${BUDGET:-420}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 nnUNet_compile=false
tar -xJf .studypack/study.tar.xz -C /tmp || exit 1
nvidia-smi -L | tee "$out/gpu.txt"
nproc >> "$out/gpu.txt"
run() {  # name parallel da_workers extra...
  local d=$1; shift
  python3 benchmarks/click_study.py run benchmarks/studies/$d.json --root /tmp/.study/$d --out /tmp/study/$d \
    --device cuda --deadline "$budget" "$@" > "$out/$d.txt" 2>&1
}
run hippocampus --parallel 3 --da-workers 3 &
run lits --parallel 2 --da-workers 2 &
wait
for d in hippocampus lits; do
  s=/tmp/study/$d
  mkdir -p "$out/$d"
  cp "$s"/study.md "$s"/study.json "$out/$d/" 2>/dev/null
  (cd "$s" && find eval -name results.json -o -name report.md -o -name clicks.csv | tar -cf - -T - | tar -xf - -C "$out/$d")
  (cd "$s" && find results \( -path "*validation*/summary.json" -o -name "training_log*.txt" -o -name progress.png \) \
     | tar -cf - -T - | tar -xf - -C "$out/$d")
  (cd "$s" && tar -cf - logs | tar -xf - -C "$out/$d")
done
# the LiTS models (small plans: well under a MB each) for the napari screenshots and later evaluation
(cd /tmp/study/lits && find results \( -name plans.json -o -name dataset.json -o -name guide_settings.json \
   -o -name "checkpoint_final.pth" \) | tar -cf - -T - | tar -xf - -C "$out/lits")
du -sh "$out"
