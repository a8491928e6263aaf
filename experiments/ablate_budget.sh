#!/bin/sh
# Issue 24's ablation: levers of the `cpu` recipe at one equal training budget, scored on the
# validation patients only (--no-test-report: no test patient is read), then one table from MLflow.
# Run from a project folder with the real data imported (docs/recipe.md):
#   sh experiments/ablate_budget.sh 6m      # ~7 min a row on a 2-core CPU (budget + validation + logging)
# Prints per row: validation per-patient Dice mean / median with its 95% bootstrap interval over
# patients, FP rate on empty slices, slices seen, slices/s.
set -e
B=${1:-6m}
row() { name=$1; shift; echo "=== $name $(date +%T)"
        brainseg train --profile cpu --budget "$B" --no-test-report --progress lines "$@" | tee -a ablation.log; }
# Each row: the cpu profile (plain U-Net 16 filters, progressive 64 -> 128 px, linear decay) with overrides.
row A-unet-r18-cosine --set train.arch=unet --set train.progressive_size=null --set train.lr_schedule=cosine
row B-unet-r18-prog64-linear --set train.arch=unet
row C-plain16-prog64-linear
row D-unet-r18-prog64-linear-tversky --set train.arch=unet --set 'train.loss={bce: 0.2, tversky: 1.0}'
row E-unet-r18-linear --set train.arch=unet --set train.progressive_size=null
row F-plain32-prog64-linear --set train.base_filters=32
python - "$B" <<'PY'
import sys, mlflow
from brainseg.training.budget import parse_budget
runs = mlflow.search_runs(experiment_names=["brainseg"], filter_string=
                          f"params.budget_minutes = '{parse_budget(sys.argv[1])}' and attributes.status = 'FINISHED'", order_by=["start_time ASC"])
cols = {"params.arch": "arch", "params.progressive_size": "prog", "params.lr_schedule": "lr",
        "params.loss_weights": "loss", "metrics.val_patient_dice_mean": "mean",
        "metrics.val_patient_dice_median": "median", "metrics.val_patient_dice_ci_low": "ci_lo",
        "metrics.val_patient_dice_ci_high": "ci_hi", "metrics.val_empty_slice_fp_rate": "fp",
        "metrics.slices_seen": "slices", "metrics.slices_per_s": "slices/s", "metrics.train_minutes": "min"}
print(runs[["run_id", *cols]].rename(columns=cols).round(3).to_string(index=False))
PY
