"""``brainseg data ...`` (synth, validate, import, manifest, split, prepare, export) and ``brainseg profile use``."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from brainseg.cli.common import ProfileOpt, SetOpt, console, fail, out, settings_or_fail
from brainseg.data.layout import as_user_path, open_dataset
from brainseg.settings.profiles import use_profile
from brainseg.settings.settings_io import ConfigError

# brainseg.data.{synth,manifest,split,importer,context} import pandas: deferred into the commands
# that use them, so `brainseg --help` and the other commands start fast.


def data_synth(out_dir: Annotated[Path, typer.Argument(help="Folder to write (the kaggle_3m layout).")],
               patients: int = 12, slices: int = 16, size: int = 64, seed: int = 0):
    """Write synthetic patients in the public kaggle_3m layout (with data.csv)."""
    from brainseg.data.synth import generate

    try:
        generate(out_dir, patients=patients, slices=slices, size=size, seed=seed)
    except ValueError as exc:
        fail(str(exc), 2)
    out.print(f"wrote {patients} synthetic patients x {slices} slices ({size}x{size}) to {out_dir}")


def data_validate(root: Annotated[Path, typer.Argument(help="kaggle_3m folder, a parent of it, or the .zip/.tar.* "
                                                            "archive.")],
                  json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the summary as "
                                                                   "JSON.")] = None):
    """Check every image/mask pair and data.csv; exit 1 if anything is bad."""
    from brainseg.data.manifest import scan

    with tempfile.TemporaryDirectory(prefix="brainseg-validate-") as tmp:  # an archive unpacks here
        try:
            found = open_dataset(root, Path(tmp))
        except (FileNotFoundError, ValueError) as exc:
            fail(str(exc), 2)
        result = scan(found)

    def shown(text) -> str:  # an archive's members as <archive>/<member>, never the removed folder
        return as_user_path(str(text), Path(tmp), root)

    s = result.summary()
    table = Table(title=f"dataset {shown(found)}")
    for col in ("institution", "patients", "slices"):
        table.add_column(col)
    for inst, counts in s["institutions"].items():
        table.add_row(inst, str(counts["patients"]), str(counts["slices"]))
    out.print(table)
    out.print(f"patients: {s['patients']}  slices: {s['slices']}  tumor slices: {s['tumor_slices']}  "
              f"problems: {s['problems']}")
    for p in result.problems:
        out.print(f"BAD {shown(p)}", markup=False, highlight=False)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(s | {"problem_list": [shown(p) for p in result.problems]}, indent=2))
    if not result.ok:
        raise typer.Exit(1)


PatternOpt = Annotated[Optional[list[str]], typer.Option(help="Volumes: file-name pattern(s) of this sequence in a "
                                                          "patient folder (fnmatch, any case; repeatable; default: "
                                                          "BraTS and nnU-Net names, docs/scans.md).")]


def data_import(src: Annotated[Path, typer.Argument(help="The Kaggle download (kaggle_3m folder, a parent, or the "
                                                         "archive), or a folder of patients given as NIfTI volumes "
                                                         "(one folder per patient, or nnU-Net's imagesTr/labelsTr).")],
                dest: Path = Path("data/raw/kaggle_3m"),
                dvc: Annotated[bool, typer.Option(help="Track the copy with DVC (dvc add).")] = True,
                flair: PatternOpt = None, pre: PatternOpt = None, post: PatternOpt = None, label: PatternOpt = None,
                label_rule: Annotated[str, typer.Option(help="Volumes: how labels become the binary abnormality: "
                                                        "'any' (label > 0, BraTS whole tumour) or label values, "
                                                        "e.g. 1,2,4.")] = "any",
                resample: Annotated[bool, typer.Option(help="Volumes: resample pre/post onto the FLAIR's grid when "
                                                       "they lie on another (default: refuse).")] = False,
                clinical: Annotated[Optional[Path], typer.Option(help="Volumes: a data.csv for the patients "
                                                                 "(Patient = the source folder names); default: "
                                                                 "a Patient column alone.")] = None,
                site: Annotated[str, typer.Option(help="Volumes: the 2-character institution code of renamed "
                                                  "patients (TCGA_<site>_<nnnn>_00000000).")] = "IM"):
    """Copy or unpack a dataset into data/raw/kaggle_3m and track it with DVC (switches the pipeline to it).

    A folder of NIfTI volumes (BraTS, nnU-Net, your own) is converted into the same layout, with each
    patient's spacing recorded (docs/scans.md, "Bring your own training data")."""
    from brainseg.data.importer import holds_volumes, import_dataset, import_volumes
    from brainseg.data.volume_import import DEFAULT_PATTERNS, LabelRule, Options

    chosen = {"flair": flair, "pre": pre, "post": post, "label": label}
    try:
        if any(chosen.values()) or clinical is not None or holds_volumes(src):
            options = Options(patterns={k: tuple(v) if v else DEFAULT_PATTERNS[k] for k, v in chosen.items()},
                              label_rule=LabelRule.parse(label_rule), resample=resample, site=site)
            message = import_volumes(src, dest, options, use_dvc=dvc, clinical_csv=clinical,
                                     echo=lambda line: out.print(line, markup=False, highlight=False))
        else:
            message = import_dataset(src, dest, use_dvc=dvc)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        fail(str(exc), 2)
    except OSError as exc:  # a read-only --dest, a full disk
        fail(f"import: cannot write {exc.filename or dest}: {exc.strerror or exc}", 1)
    out.print(message, markup=False, highlight=False)


def data_manifest(profile: ProfileOpt = None, set_: SetOpt = None,
                  root: Annotated[Optional[Path], typer.Option(help="Dataset folder (default: data.root).")] = None,
                  output: Annotated[Optional[Path], typer.Option("--out", help="Default: data.manifest.")] = None):
    """Validate the dataset and write the manifest (one row per slice); refuses a dataset with problems."""
    from brainseg.data.context import stamp_manifest
    from brainseg.data.manifest import scan

    settings = settings_or_fail(profile, set_)
    root = root or Path(settings.data.root)
    output = output or Path(settings.data.manifest)
    if not root.exists():
        fail(f"{root}: dataset not found (run `brainseg data import PATH` or `brainseg run`)", 2)
    result = scan(root)
    if not result.ok:
        for p in result.problems:
            console.print(f"BAD {p}", markup=False, highlight=False)
        fail(f"{len(result.problems)} problem(s) in {root}; fix them or remove the files (see above)")
    output.parent.mkdir(parents=True, exist_ok=True)
    result.manifest.to_csv(output, index=False)
    stamp_manifest(output, root)  # the data version it was built from: train/tune rebuild it when stale
    s = result.summary()
    out.print(f"manifest: {s['patients']} patients, {s['slices']} slices ({s['tumor_slices']} with tumor) -> {output}")


def data_split(profile: ProfileOpt = None, set_: SetOpt = None,
               manifest: Optional[Path] = None,
               output: Annotated[Optional[Path], typer.Option("--out")] = None):
    """Split patients (never slices) into train/val/test and k folds, stratified by institution and burden."""
    from brainseg.data.manifest import patients_table, read_manifest
    from brainseg.data.split import split_with

    settings = settings_or_fail(profile, set_)
    manifest = manifest or Path(settings.data.manifest)
    output = output or Path(settings.data.split)
    try:
        split = split_with(patients_table(read_manifest(manifest)), settings.split)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc), 2)
    output.parent.mkdir(parents=True, exist_ok=True)
    split.to_csv(output, index=False)
    counts = split["subset"].value_counts().to_dict()
    out.print(f"split {len(split)} patients: " + ", ".join(f"{k} {counts.get(k, 0)}" for k in ("train", "val", "test"))
              + f" -> {output}")


def data_prepare(profile: ProfileOpt = None, set_: SetOpt = None,
                 dvc: Annotated[bool, typer.Option(help="Track generated synthetic data with DVC.")] = True):
    """Make sure a dataset is there (the synthetic default if none was imported), then manifest and split."""
    from brainseg.data.importer import dvc_available, ensure_dataset

    settings = settings_or_fail(profile, set_)
    out.print(ensure_dataset(Path(settings.data.root), settings.data.synth.given(),
                             use_dvc=dvc and dvc_available()))
    data_manifest(profile=profile, set_=set_, root=None, output=None)
    data_split(profile=profile, set_=set_, manifest=None, output=None)


def data_export(dest: Annotated[Path, typer.Argument(help="Folder to create, e.g. $nnUNet_raw/Dataset501_LGG "
                                                          "(must not exist, or be empty).")],
                fmt: Annotated[str, typer.Option("--format", help="nnunet: nnU-Net v2's raw dataset "
                                                 "(docs/scans.md).")] = "nnunet",
                profile: ProfileOpt = None, set_: SetOpt = None):
    """Export data.root (with the platform's split) as NIfTI volumes for nnU-Net v2 or MONAI."""
    from brainseg.data.context import DataContext
    from brainseg.data.export import check_destination, export_nnunet

    if fmt != "nnunet":
        fail(f"--format {fmt!r}: the one format is nnunet", 2)
    settings = settings_or_fail(profile, set_)
    try:
        check_destination(dest)  # before the manifest and split are built
        ctx = DataContext.from_settings(settings, echo=out.print)
        summary = export_nnunet(ctx.manifest, ctx.split, dest, version=ctx.version)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        fail(str(exc), 2)
    except OSError as exc:  # a full disk, a read-only parent: nothing is left at DEST
        fail(f"export: cannot write {exc.filename or dest}: {exc.strerror or exc}", 1)
    out.print(f"nnU-Net dataset: {summary['training']} training and {summary['test']} test patients, "
              f"{summary['folds']} folds (splits_final.json) -> {dest}", markup=False, highlight=False)


def profile_use(name: Annotated[str, typer.Argument(help="A profile of experiments/profiles.yaml.")],
                dry_run: Annotated[bool, typer.Option(help="Show the changes, write nothing.")] = False):
    """Copy a budget profile's values into params.yaml (comments kept): what DVC records is what runs."""
    try:
        diff = use_profile(name, dry_run=dry_run)
    except ConfigError as exc:
        fail(str(exc), 2)
    for key, old, new in diff:
        out.print(f"{key}: {old!r} -> {new!r}", markup=False, highlight=False)
    verb = "would change" if dry_run else "changed"
    out.print(f"params.yaml: {verb} {len(diff)} value(s) for profile {name}" if diff
              else f"params.yaml already has profile {name}'s values")
