"""`brainseg data` commands through typer's CliRunner: synth, validate, import, manifest, split."""

import shutil
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from brainseg.data.manifest import scan
from helpers import invoke, project_files, tree


def make_archive(root: Path, base: Path, fmt: str) -> str:
    return shutil.make_archive(str(base), fmt, root_dir=root.parent, base_dir=root.name)


@pytest.fixture
def project_dir(tmp_path, monkeypatch):
    """A working folder with the project's params.yaml and profiles (the CLI reads them in cwd)."""
    project_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_synth_then_validate(tmp_path):
    out = tmp_path / "kaggle_3m"
    result = invoke("data", "synth", out, "--patients", 2, "--slices", 5, "--size", 32, "--seed", 4)
    assert result.exit_code == 0, result.output
    assert "wrote 2 synthetic patients x 5 slices (32x32)" in result.output
    assert len(list(out.glob("*/*_mask.tif"))) == 10 and (out / "data.csv").is_file()
    result = invoke("data", "validate", out)
    assert result.exit_code == 0, result.output
    assert "patients: 2  slices: 10" in result.output and "problems: 0" in result.output


def test_synth_refuses_bad_sizes(tmp_path):
    result = invoke("data", "synth", tmp_path / "x", "--slices", 2)
    assert result.exit_code == 2
    assert "synth: need patients >= 1, slices >= 4" in result.output


@pytest.mark.parametrize("fmt", ["zip", "gztar"])
def test_validate_an_archive(synth_root, tmp_path, monkeypatch, fmt):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where validate unpacks it
    (tmp_path / "tmp").mkdir()
    archive = make_archive(synth_root, tmp_path / "lgg", fmt)
    result = invoke("data", "validate", archive)
    assert result.exit_code == 0, result.output
    assert "patients: 3  slices: 12" in result.output


def test_validate_a_corrupt_archive_exits_2(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where validate would unpack it
    (tmp_path / "lgg.zip").write_bytes(b"PK\x03\x04 truncated")
    result = invoke("data", "validate", tmp_path / "lgg.zip")
    assert result.exit_code == 2
    assert f"{tmp_path / 'lgg.zip'}: not a readable zip/tar archive" in result.output


def test_import_folder(synth_root, tmp_path):
    dest = tmp_path / "data" / "raw" / "kaggle_3m"
    dest.parent.mkdir(parents=True)
    (dest.parent / "SYNTHETIC").write_text("marker")
    result = invoke("data", "import", synth_root.parent, "--dest", dest, "--no-dvc")
    assert result.exit_code == 0, result.output
    assert f"{dest}: copied (DVC not used)" in result.output
    assert tree(dest) == tree(synth_root)
    assert not (dest.parent / "SYNTHETIC").exists()  # the pipeline now uses the imported data
    assert not dest.with_name("kaggle_3m.importing").exists()
    assert scan(dest).ok


@pytest.mark.parametrize("fmt", ["zip", "gztar"])
def test_import_archive_replaces_an_existing_dataset(synth_root, make_synth, tmp_path, fmt):
    dest = tmp_path / "raw" / "kaggle_3m"
    shutil.copytree(make_synth(patients=1, slices=4, seed=9), dest)
    archive = make_archive(synth_root, tmp_path / "lgg", fmt)
    result = invoke("data", "import", archive, "--dest", dest, "--no-dvc")
    assert result.exit_code == 0, result.output
    assert tree(dest) == tree(synth_root)


@pytest.mark.parametrize("make_bad, message", [
    (lambda tmp: tmp / "does-not-exist", "does-not-exist: no such file or folder"),
    (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "no kaggle_3m folder"),
    (lambda tmp: (tmp / "bad.tar.gz").write_bytes(b"junk") and tmp / "bad.tar.gz",
     "bad.tar.gz: not a readable zip/tar archive"),
])
def test_import_bad_path_exits_2_and_leaves_dest_untouched(make_synth, tmp_path, make_bad, message):
    dest = tmp_path / "raw" / "kaggle_3m"
    shutil.copytree(make_synth(patients=2, slices=4), dest)
    before = tree(dest)
    result = invoke("data", "import", make_bad(tmp_path), "--dest", dest, "--no-dvc")
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and message in result.output
    assert tree(dest) == before
    assert sorted(p.name for p in dest.parent.iterdir()) == ["kaggle_3m"]


def test_import_onto_itself_is_refused(synth_root):
    before = tree(synth_root)
    result = invoke("data", "import", synth_root, "--dest", synth_root, "--no-dvc")
    assert result.exit_code == 2
    assert "already at" in result.output
    assert tree(synth_root) == before


def test_manifest_then_split(project_dir, make_synth):
    root = make_synth(patients=10, slices=4)
    manifest, split = project_dir / "m" / "manifest.csv", project_dir / "m" / "split.csv"
    result = invoke("data", "manifest", "--root", root, "--out", manifest)
    assert result.exit_code == 0, result.output
    assert "manifest: 10 patients, 40 slices" in result.output
    m = pd.read_csv(manifest)
    assert len(m) == 40 and m["patient"].nunique() == 10

    result = invoke("data", "split", "--manifest", manifest, "--out", split, "--set", "split.seed=3")
    assert result.exit_code == 0, result.output
    s = pd.read_csv(split)
    assert sorted(s["patient"]) == sorted(m["patient"].unique())
    counts = s["subset"].value_counts()
    expected = f"train {counts['train']}, val {counts['val']}, test {counts['test']}"
    assert f"split 10 patients: {expected}" in result.output
    assert counts["val"] >= 1 and counts["test"] >= 1


def test_manifest_refuses_a_dataset_with_problems(project_dir, synth_root):
    bad = next(synth_root.glob("*/*_2.tif"))
    bad.write_bytes(b"")
    out = project_dir / "manifest.csv"
    result = invoke("data", "manifest", "--root", synth_root, "--out", out)
    assert result.exit_code == 1
    assert f"BAD {bad}: zero-byte file" in result.output
    assert "1 problem(s)" in result.output
    assert not out.exists()


def test_manifest_missing_root_and_bad_override(project_dir):
    result = invoke("data", "manifest", "--root", project_dir / "nothing")
    assert result.exit_code == 2 and "dataset not found" in result.output
    result = invoke("data", "manifest", "--set", "data.rooot=x")
    assert result.exit_code == 2 and "unknown key 'data.rooot'" in result.output


def test_split_without_manifest_exits_2(project_dir):
    result = invoke("data", "split", "--manifest", project_dir / "none.csv", "--out", project_dir / "s.csv")
    assert result.exit_code == 2
    assert "manifest not found" in result.output
