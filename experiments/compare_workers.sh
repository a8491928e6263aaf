#!/bin/sh
# Issue 25's worker/thread comparison: the `cpu` study's trials on a short budget, once with
# 1 worker x 2 TensorFlow threads and once with 2 workers x 1 thread (one SQLite study each),
# no refit, only the learning rate searched (every trial costs the same). Run from a project folder with the real data imported (docs/tuning.md):
#   sh experiments/compare_workers.sh 4     # minutes per study; ~2 x (4 + 1) min on a 2-core CPU
# Prints per layout: trials, training slices seen by all trials, slices per second of search (the
# study's training throughput: both cores together) and the trials' mean own slices/s.
set -e
M=${1:-4}
for layout in 1x2 2x1; do
  w=${layout%x*}; t=${layout#*x}
  echo "=== $layout $(date +%T)"
  brainseg tune --profile cpu --no-refit --study-name "workers-$layout-$(date +%s)" --storage "sqlite:///workers.db" \
    --set tune.budget_minutes="$M" --set tune.target_trials=2 --set tune.rungs=1 \
    --set tune.search_space=experiments/search_space_speed.yaml --set tune.enqueue_recipe=false \
    --set tune.workers="$w" --set tune.threads="$t" --out "reports/workers-$layout.json" | tee -a workers.log
done
python - <<'PY'
import json, mlflow, optuna
for layout in ("1x2", "2x1"):
    s = json.load(open(f"reports/workers-{layout}.json"))
    study = optuna.load_study(study_name=s["study"], storage="sqlite:///workers.db")
    runs = mlflow.search_runs(experiment_names=["brainseg"], filter_string=
                              f"tags.mlflow.parentRunId = '{s['parent_run_id']}'")
    start = min(t.datetime_start for t in study.trials)
    end = max(t.datetime_complete for t in study.trials if t.datetime_complete)
    seen = runs["metrics.slices_seen"].sum()
    print(f"{layout}: {len(study.trials)} trials, {seen:.0f} training slices in {(end - start).total_seconds():.0f} s "
          f"of search = {seen / (end - start).total_seconds():.1f} slices/s; per trial "
          f"{runs['metrics.slices_per_s'].mean():.1f} slices/s")
PY
