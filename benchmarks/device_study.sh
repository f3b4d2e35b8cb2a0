#!/usr/bin/env bash
# The issue-12 training study on the GPU machine (no network there): installs the wheels carried in
# .whl (see device_run.sh), unpacks the study datasets carried in .studypack/study.tar.xz (built here
# with `python benchmarks/click_study.py prepare .study && tar -cf - .study | xz -9 > .studypack/study.tar.xz`),
# runs the hippocampus and LiTS studies side by side, and copies the tables, summaries, evaluation
# results and the small LiTS models to OUT.
#   BUDGET=420 bash benchmarks/device_study.sh OUTDIR
#   ONLY_HIPPOCAMPUS="plain;prompts + up to 3 clicks per object" FOLDS="0 1 2" TEST_SET=1 bash benchmarks/device_study.sh OUTDIR
#   ONLY_LITS="tumor + prompts" FOLDS="0 1 2 3 4" bash benchmarks/device_study.sh OUTDIR   # box vs click on all 8 slabs
set -uo pipefail
out=${1:-/tmp/study_out}
budget=${BUDGET:-420}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 nnUNet_compile=false
tar -xJf .studypack/study.tar.xz -C /tmp || exit 1
nvidia-smi -L | tee "$out/gpu.txt"
nproc >> "$out/gpu.txt"
run() {  # study [click_study.py run options...]
  local d=$1; shift
  python3 benchmarks/click_study.py run benchmarks/studies/$d.json --root /tmp/.study/$d --out /tmp/study/$d \
    --device cuda --deadline "$budget" "$@" > "$out/$d.txt" 2>&1
}
only() {  # study "job;job;..." [click_study.py run options...]: a short run of these jobs on ${FOLDS:-0}
  local d=$1 names=$2; shift 2
  IFS=';' read -ra jobs <<< "$names"
  # shellcheck disable=SC2086
  run "$d" --folds ${FOLDS:-0} "$@" --only "${jobs[@]}"
}
if [ -n "${ONLY_HIPPOCAMPUS:-}${ONLY_LITS:-}" ]; then  # a second, short run: only these jobs (names separated by ;)
  # shellcheck disable=SC2086
  [ -n "${ONLY_HIPPOCAMPUS:-}" ] && only hippocampus "$ONLY_HIPPOCAMPUS" --parallel 4 --da-workers 3 ${TEST_SET:+--test-set} &
  [ -n "${ONLY_LITS:-}" ] && only lits "$ONLY_LITS" --parallel 3 --da-workers 2 -n 5 &
  wait
else
  run hippocampus --parallel 3 --da-workers 3 &
  run lits --parallel 2 --da-workers 2 &
  wait
fi
# one archive (the device tool brings back only a few files): tables, summaries, evaluation results,
# logs, and the small LiTS models (small plans: well under a MB each) for the napari screenshots
cd /tmp/study && find . \( -name study.md -o -name study.json -o -name results.json -o -name report.md \
  -o -name clicks.csv -o -name per_case.csv -o -path "*validation*/summary.json" -o -name "training_log*.txt" -o -path "./*/logs/*" \
  -o \( -path "./lits/results/*" \( -name plans.json -o -name dataset.json -o -name guide_settings.json \
  -o -name checkpoint_final.pth \) \) \) -type f | tar -czf "$out/study.tgz" -T -
ls -la "$out"
