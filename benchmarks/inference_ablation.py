"""Inference levers of one trained segmenter, measured in one run: precision and post-processing.

    python benchmarks/inference_ablation.py --model MODEL [--profile cpu] [--set data.root=DIR]

MODEL is a model folder (model.h5 + brainseg.json), runs:/ or models:/ URI. Prints, for the
validation patients, every post-processing candidate that training chooses from (the choice is
made on validation only); then, for the model's stored settings, float32 against bfloat16 on
validation and test (test: report only), with the share of mask pixels that differ and the
prediction time. Run it on idle cores: times are wall-clock.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from brainseg.data.arrays import load_full_images
from brainseg.data.context import DataContext
from brainseg.evaluation.evaluate import score, select_postprocessing
from brainseg.registry.model_registry import load_segmenter
from brainseg.settings.config import load_settings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--profile", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    ctx = DataContext.from_settings(load_settings(args.profile, args.overrides))
    stored = load_segmenter(args.model)
    print(f"model {args.model}: stored settings {stored.settings.to_dict()}")

    rows = ctx.rows("val")
    images, truths = load_full_images(rows), ctx.truths("val")
    base = stored.with_settings(tta=False, min_component_px=0, largest_3d=False, keep_largest=False)
    _, table = select_postprocessing(base, rows, images, truths)
    print("\nvalidation patients, post-processing candidates (precision "
          f"{base.precision}; the model stores the best by mean):")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))

    print("\nprecision, stored post-processing:")
    print("subset  precision  dice_mean  dice_median  tumor_slice_dice  empty_fp_rate  seconds  slices/s")
    for subset in ("val", "test"):
        rows = ctx.rows(subset)
        images, truths = load_full_images(rows), ctx.truths(subset)
        groups = rows["patient"].tolist()
        masks = {}
        for precision in ("float32", "bfloat16"):
            seg = stored.with_settings(precision=precision)
            seg.warm_up()
            t0 = time.perf_counter()
            masks[precision] = seg.segment(images, groups).masks
            dt = time.perf_counter() - t0
            s = score(rows, masks[precision], truths).summary
            print(f"{subset:6}  {precision:9}  {s['patient_dice_mean']:.3f}      {s['patient_dice_median']:.3f}"
                  f"        {s['tumor_slice_dice_mean']:.3f}             {s['empty_slice_fp_rate']:.3f}"
                  f"          {dt:6.1f}   {len(images) / dt:6.1f}")
        differ = sum(int((a != b).sum()) for a, b in zip(masks["float32"], masks["bfloat16"]))
        total = sum(m.size for m in masks["float32"])
        print(f"{subset:6}  mask pixels differing float32 vs bfloat16: {differ} of {total} "
              f"({differ / total:.2e}); slices differing: "
              f"{sum(bool((a != b).any()) for a, b in zip(masks['float32'], masks['bfloat16']))} of {len(images)}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
