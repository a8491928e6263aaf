"""What every command shares: the two consoles, --profile / --set, settings checked up front,
``fail`` (message and exit code), the metrics table and the quiet libraries."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from brainseg.settings import quiet
from brainseg.settings.config import Settings, load_settings, validate_settings
from brainseg.settings.settings_io import ConfigError

# soft_wrap: messages and BAD lines name long paths; never break them across lines
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

ProfileOpt = Annotated[Optional[str], typer.Option("--profile", help="Apply a budget profile (smoke, cpu, gpu) "
                                                   "in memory for this command (default: none, params.yaml as "
                                                   "written; `brainseg profile use` writes one into it).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a setting, e.g. --set train.lr=0.0005 "
                                                     "(repeatable).")]
EXPERIMENT = "brainseg"


def fail(message: str, code: int = 1):
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def writable_folder_or_fail(path: Path, option: str = "--out") -> Path:
    """``path`` as a folder this process can write (created if missing), checked before any work
    starts: a read-only place or a file in the way is a one-line error (exit 2), not a traceback
    at the end of a long run."""
    try:
        if path.exists() and not path.is_dir():
            fail(f"{option} {path}: exists and is not a folder", 2)
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".brainseg-write-check-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        fail(f"{option} {path}: cannot write there ({exc.strerror or exc})", 2)
    return path


def settings_or_fail(profile: str | None, overrides: list[str] | None) -> Settings:
    """Settings with every value type- and range-checked (exit 2 naming the key, before any run)."""
    try:
        return validate_settings(load_settings(profile, overrides or []))
    except ConfigError as exc:
        fail(str(exc), 2)


def print_metrics(m: dict, title: str) -> None:
    def f(v):
        return "n/a" if v is None else f"{v:.3f}"

    table = Table(title=title)
    for col in ("metric", "model", "all-empty baseline", "n"):
        table.add_column(col)
    rows = [("per-patient volume Dice, mean", "patient_dice_mean", "n_patients"),
            ("per-patient volume Dice, median", "patient_dice_median", "n_patients"),
            ("per-patient volume IoU, mean", "patient_iou_mean", "n_patients"),
            ("Dice on tumor slices, mean", "tumor_slice_dice_mean", "n_tumor_slices"),
            ("false-positive rate on empty slices", "empty_slice_fp_rate", "n_empty_slices"),
            ("global Dice (all pixels)", "global_dice", "n_slices"),
            ("global IoU (all pixels)", "global_iou", "n_slices"),
            ("smoothed per-slice Dice, all slices (flattering)", "smoothed_slice_dice_all", "n_slices")]
    for label, key, n in rows:
        table.add_row(label, f(m.get(key)), f(m.get(f"baseline_empty_{key}")), str(m.get(n, "")))
    out.print(table)
    out.print("Empty masks: patients with an empty true volume are left out of the Dice means "
              f"(here {m.get('n_patients_empty_truth', 0)}); empty slices count in the FP rate, never as Dice 1.")


def quiet_libraries(verbose: bool = False) -> None:
    """Library start-up noise and known-harmless warnings off (:mod:`brainseg.settings.quiet`), unless ``verbose``."""
    quiet.configure(verbose or quiet.verbose_requested())
