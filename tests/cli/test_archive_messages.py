"""Messages about an archive name the user's archive (its members as ``<archive>/<member>``), never
the folder brainseg unpacked it into (removed by then), and say when an archive holds another
archive (issue 37). Run as a user would: ``brainseg data validate`` and ``brainseg data import``."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from brainseg.data.synth import generate
from helpers import invoke_flat, project_files

STAGING_MARKS = ("brainseg-validate-", ".importing-", "/unpacked", "/new/")


@pytest.fixture
def project(tmp_path, monkeypatch):
    root = project_files(tmp_path / "project")
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    return root


def zip_folder(folder: Path, archive: Path, under: str = "") -> Path:
    """``folder`` zipped as ``<under>/<folder name>/...``."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, str(Path(under) / folder.name / p.relative_to(folder)))
    return archive


@pytest.fixture
def damaged(tmp_path) -> tuple[Path, str]:
    """A dataset with one truncated slice: (its kaggle_3m folder, the slice's path inside it)."""
    root = generate(tmp_path / "src" / "kaggle_3m", patients=2, slices=4, size=32, seed=3)
    folder = sorted(p for p in root.iterdir() if p.is_dir())[0]
    bad = folder / f"{folder.name}_2.tif"
    bad.write_bytes(bad.read_bytes()[:300])
    return root, f"kaggle_3m/{folder.name}/{folder.name}_2.tif"


def assert_no_staging(output: str) -> None:
    for mark in STAGING_MARKS:
        assert mark not in output, f"{mark!r} in {output!r}"
    assert "Traceback" not in output


@pytest.mark.parametrize("command", ["validate", "import"])
def test_a_bad_member_is_named_inside_the_users_archive(project, tmp_path, damaged, command):
    root, member = damaged
    archive = zip_folder(root, tmp_path / "lgg.zip")
    args = ["data", "validate", archive] if command == "validate" else ["data", "import", archive, "--no-dvc"]
    code, output = invoke_flat(*args)
    assert code == (1 if command == "validate" else 2), output
    assert f"{archive}/{member}: unreadable or truncated TIFF" in output, output
    assert_no_staging(output)


def test_a_bad_file_of_an_imported_folder_is_named_in_that_folder(project, damaged):
    root, member = damaged
    code, output = invoke_flat("data", "import", root, "--no-dvc")
    assert code == 2 and f"{root.parent / member}: unreadable or truncated TIFF" in output, output
    assert_no_staging(output)


@pytest.mark.parametrize("command", ["validate", "import"])
def test_an_archive_holding_another_archive_says_so(project, tmp_path, command):
    root = generate(tmp_path / "src" / "kaggle_3m", patients=1, slices=4, size=32, seed=3)
    inner = zip_folder(root, tmp_path / "inner.zip")
    outer = tmp_path / "outer.zip"
    with zipfile.ZipFile(outer, "w") as zf:
        zf.write(inner, "download/inner.zip")
    args = ["data", "validate", outer] if command == "validate" else ["data", "import", outer, "--no-dvc"]
    code, output = invoke_flat(*args)
    assert code == 2, output
    assert (f"{outer}: holds another archive (download/inner.zip) and no dataset folder; unpack the inner "
            "archive and give brainseg that archive or its folder") in output, output
    assert_no_staging(output)


def test_an_archive_without_a_dataset_is_named_not_its_unpacked_folder(project, tmp_path):
    archive = tmp_path / "notes.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("notes/readme.txt", "nothing here")
    code, output = invoke_flat("data", "validate", archive)
    assert code == 2 and f"{archive}: no kaggle_3m folder or TCGA_<inst>_<patient>_<date> folders found" in output
    assert_no_staging(output)
