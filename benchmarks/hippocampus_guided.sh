#!/usr/bin/env bash
# The hippocampus check of issue 2, done the way a new user would: nnU-Net's own commands,
# our trainers made visible with one line, a user-written short subclass of nnUNetTrainerGuide.
#
#   bash benchmarks/hippocampus_guided.sh [WORKDIR] [NUM_CASES] [EPOCHS] [ITERS]
#
# Prints the automatic and guided validation Dice of fold 0 and predicts two held-out images
# with stock nnUNetv2_predict. Needs ../shared/data/Dataset004_Hippocampus. CPU time: about
# EPOCHS*ITERS*1.2 s plus planning and validation (2 cores).
set -euo pipefail
HERE="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-$HERE/.bench/hippocampus}"
NUM="${2:-40}"
EPOCHS="${3:-6}"
ITERS="${4:-50}"
SRC="${NNUNET_GUIDE_SHARED_DATA:-$HERE/../shared/data}/Dataset004_Hippocampus"
[ -d "$SRC" ] || { echo "hippocampus data not found at $SRC" >&2; exit 2; }

rm -rf "$WORK"; mkdir -p "$WORK/my_trainers"
export nnUNet_raw="$WORK/nnUNet_raw" nnUNet_preprocessed="$WORK/nnUNet_preprocessed" nnUNet_results="$WORK/nnUNet_results"
eval "$(nnUNetv2_guide_env)"
# the user's own short trainer, in the user's own folder
cat > "$WORK/my_trainers/my_short_trainer.py" <<PY
import torch
from nnunet_guide.trainers import nnUNetTrainerGuide

class nnUNetTrainerGuideMyShort(nnUNetTrainerGuide):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = $EPOCHS
        self.num_iterations_per_epoch = $ITERS
        self.num_val_iterations_per_epoch = 5
PY
export nnUNet_extTrainer="$WORK/my_trainers:$nnUNet_extTrainer"

# raw dataset: the first NUM training cases, two more held out as "new images"
python - "$SRC" "$nnUNet_raw/Dataset004_Hippocampus" "$NUM" "$WORK/new_images" <<'PY'
import json, os, shutil, sys
src, dst, num, new = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
cases = sorted(f[:-7] for f in os.listdir(f"{src}/labelsTr") if f.endswith(".nii.gz"))
for sub in ("imagesTr", "labelsTr"):
    os.makedirs(f"{dst}/{sub}", exist_ok=True)
os.makedirs(new, exist_ok=True)
for c in cases[:num]:
    shutil.copy(f"{src}/imagesTr/{c}_0000.nii.gz", f"{dst}/imagesTr/")
    shutil.copy(f"{src}/labelsTr/{c}.nii.gz", f"{dst}/labelsTr/")
for c in cases[num:num + 2]:
    shutil.copy(f"{src}/imagesTr/{c}_0000.nii.gz", new)
dj = json.load(open(f"{src}/dataset.json")); dj["numTraining"] = num
json.dump(dj, open(f"{dst}/dataset.json", "w"), indent=1)
PY

t0=$(date +%s)
nnUNetv2_plan_and_preprocess -d 4 -c 3d_fullres -np 1 --verify_dataset_integrity > "$WORK/plan.log" 2>&1
t1=$(date +%s)
nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-2} nnUNetv2_train 4 3d_fullres 0 -tr nnUNetTrainerGuideMyShort -device cpu > "$WORK/train.log" 2>&1
t2=$(date +%s)
MODEL="$nnUNet_results/Dataset004_Hippocampus/nnUNetTrainerGuideMyShort__nnUNetPlans__3d_fullres"
nnUNetv2_predict -i "$WORK/new_images" -o "$WORK/pred_stock" -d 4 -c 3d_fullres -f 0 -tr nnUNetTrainerGuideMyShort -device cpu > "$WORK/predict.log" 2>&1
t3=$(date +%s)
python - "$MODEL/fold_0" "$WORK/pred_stock" "$WORK/new_images" <<'PY'
import json, os, sys
import numpy as np, SimpleITK as sitk
fold, pred, imgs = sys.argv[1:4]
a = json.load(open(f"{fold}/validation/summary.json"))
g = json.load(open(f"{fold}/validation_guided/summary.json"))
print(f"validation cases: {len([k for k in a['metric_per_case']])}")
for lab in a["mean"]:
    print(f"label {lab}: automatic Dice {a['mean'][lab]['Dice']:.4f}  guided Dice {g['mean'][lab]['Dice']:.4f}")
print(f"foreground mean: automatic {a['foreground_mean']['Dice']:.4f}  guided {g['foreground_mean']['Dice']:.4f}")
for f in sorted(os.listdir(pred)):
    if f.endswith(".nii.gz"):
        s = sitk.ReadImage(f"{pred}/{f}"); i = sitk.ReadImage(f"{imgs}/{f[:-7]}_0000.nii.gz")
        arr = sitk.GetArrayFromImage(s)
        print(f"stock nnUNetv2_predict {f}: shape {arr.shape} (image {sitk.GetArrayFromImage(i).shape}), labels {np.unique(arr).tolist()}")
PY
echo "seconds: plan+preprocess $((t1-t0)), train+validation $((t2-t1)), predict $((t3-t2))"
