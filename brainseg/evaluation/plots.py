"""Figures logged as PNG artifacts (matplotlib, headless)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def learning_curves(history: dict[str, list[float]]):
    """Loss and Dice per epoch, train vs validation."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, keys, title in ((axes[0], ("loss", "val_loss"), "loss"),
                            (axes[1], ("dice", "val_dice", "val_patient_dice"), "Dice")):
        for k in keys:
            if k in history:
                ax.plot(np.arange(1, len(history[k]) + 1), history[k], marker="o", label=k)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    return fig


def overlay(image: np.ndarray, mask: np.ndarray, color=(255, 0, 0), alpha: float = 0.45) -> np.ndarray:
    """(H, W, 3) uint8 image with ``mask`` (H, W) bool tinted in ``color``."""
    out = image.astype(np.float32).copy()
    out[mask] = (1 - alpha) * out[mask] + alpha * np.array(color, np.float32)
    return out.astype(np.uint8)


def overlay_grid(images, truths, preds, titles):
    """Rows of (image, truth overlay, prediction overlay)."""
    n = len(images)
    fig, axes = plt.subplots(max(n, 1), 3, figsize=(9, 3 * max(n, 1)), squeeze=False)
    for i, (im, t, p, title) in enumerate(zip(images, truths, preds, titles)):
        for j, (pic, label) in enumerate(((im, "image (FLAIR)"), (overlay(im, t, (0, 255, 0)), "truth"),
                                          (overlay(im, p), "prediction"))):
            axes[i, j].imshow(pic if j else pic[:, :, 1], cmap=None if j else "gray")
            axes[i, j].set_title(f"{title}\n{label}" if j == 0 else label, fontsize=8)
            axes[i, j].axis("off")
    fig.tight_layout()
    return fig


def save(fig, path) -> None:
    fig.savefig(path, dpi=80)
    plt.close(fig)


def overlay_examples(ev, images: list[np.ndarray], truths: list[np.ndarray]):
    """Best, median and worst tumor slices by per-slice Dice -> overlay grid figure."""
    s = ev.slices
    tumor = s[s["truth_px"] > 0].copy()
    if tumor.empty:
        idx = list(range(min(3, len(s))))
        titles = [f"{s.loc[i, 'patient_dir']} #{s.loc[i, 'slice']}" for i in idx]
    else:
        tumor["dice"] = 2 * tumor["tp"] / (2 * tumor["tp"] + tumor["fp"] + tumor["fn"])
        tumor = tumor.sort_values("dice")
        picks = {"worst": tumor.index[0], "median": tumor.index[len(tumor) // 2], "best": tumor.index[-1]}
        idx = list(picks.values())
        titles = [f"{k}: {s.loc[i, 'patient_dir']} #{s.loc[i, 'slice']} Dice {tumor.loc[i, 'dice']:.2f}"
                  for k, i in picks.items()]
    return overlay_grid([images[i] for i in idx], [truths[i] for i in idx],
                              [ev.preds[i] for i in idx], titles)
