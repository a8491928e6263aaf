"""Layout discovery: the kaggle_3m folder, a parent of it, the doubled Kaggle layout, archives."""

import io
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest

from brainseg.data.layout import discover, find_root, is_archive, open_dataset, parse_folder


@pytest.mark.parametrize("name, expected", [
    ("TCGA_CS_4941_19960909", ("TCGA_CS_4941", "CS", "19960909")),
    ("TCGA_HT_A61A_20000127", ("TCGA_HT_A61A", "HT", "20000127")),
    ("TCGA_DU_S000_20000101", ("TCGA_DU_S000", "DU", "20000101")),
    ("TCGA_CS_4941", None),              # no scan date
    ("TCGA_CS_4941_1996090", None),      # 7-digit date
    ("TCGA_cs_4941_19960909", None),     # lower-case institution
    ("tcga_CS_4941_19960909", None),
    ("TCGA_CS_4941_19960909_copy", None),
    ("kaggle_3m", None),
])
def test_parse_folder(name, expected):
    meta = parse_folder(name)
    if expected is None:
        assert meta is None
    else:
        assert (meta["patient"], meta["institution"], meta["scan_date"]) == expected


def n_patients(root: Path) -> int:
    return len({s.patient for s in discover(root).slices})


def test_find_root_accepts_the_folder_itself(synth_root):
    assert find_root(synth_root) == synth_root


def test_find_root_accepts_a_parent(synth_root):
    assert find_root(synth_root.parent) == synth_root


def test_find_root_accepts_a_parent_of_patient_folders_named_otherwise(synth_root, tmp_path):
    other = tmp_path / "download" / "my_copy"
    other.parent.mkdir()
    shutil.copytree(synth_root, other)
    (other / "data.csv").unlink()  # found by its TCGA_* folders alone
    assert find_root(tmp_path / "download") == other


def test_find_root_picks_one_copy_of_the_doubled_kaggle_layout(synth_root, tmp_path):
    # the Kaggle archive: kaggle_3m/ and lgg-mri-segmentation/kaggle_3m/ with identical content
    top = tmp_path / "archive"
    shutil.copytree(synth_root, top / "kaggle_3m")
    shutil.copytree(synth_root, top / "lgg-mri-segmentation" / "kaggle_3m")
    root = find_root(top)
    assert root == top / "kaggle_3m"  # the shallowest copy
    assert n_patients(root) == 3


def test_find_root_refuses_two_different_datasets(make_synth, tmp_path):
    top = tmp_path / "two"
    shutil.copytree(make_synth(patients=3), top / "a" / "kaggle_3m")
    shutil.copytree(make_synth(patients=4), top / "b" / "kaggle_3m")
    with pytest.raises(ValueError, match="several dataset folders found"):
        find_root(top)


def test_find_root_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        find_root(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="expected a folder or a .zip/.tar"):
        find_root(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no kaggle_3m folder"):
        find_root(tmp_path / "empty")


@pytest.mark.parametrize("fmt, suffix", [("zip", ".zip"), ("gztar", ".tar.gz")])
def test_open_dataset_unpacks_archives(synth_root, tmp_path, fmt, suffix):
    archive = shutil.make_archive(str(tmp_path / "lgg"), fmt, root_dir=synth_root.parent,
                                  base_dir="kaggle_3m")
    assert archive.endswith(suffix) and is_archive(Path(archive))
    work = tmp_path / "work"
    root = open_dataset(Path(archive), work)
    assert root == work / "kaggle_3m"
    layout = discover(root)
    assert len(layout.slices) == 12 and not layout.problems and layout.data_csv is not None


def test_open_dataset_doubled_layout_in_a_zip(synth_root, tmp_path):
    archive = tmp_path / "lgg-mri-segmentation.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(synth_root.rglob("*")):
            if f.is_file():
                rel = f.relative_to(synth_root)
                zf.write(f, f"kaggle_3m/{rel}")
                zf.write(f, f"lgg-mri-segmentation/kaggle_3m/{rel}")
    root = open_dataset(archive, tmp_path / "work")
    assert root == tmp_path / "work" / "kaggle_3m"
    assert n_patients(root) == 3


def test_open_dataset_plain_folder_needs_no_workdir(synth_root):
    assert open_dataset(synth_root.parent) == synth_root


@pytest.mark.parametrize("name, content", [
    ("bad.zip", b"this is not a zip file"),
    ("bad.tar.gz", b"this is not a gzip file"),
])
def test_open_dataset_corrupt_archive_is_a_value_error_naming_it(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=rf"{name}: not a readable zip/tar archive"):
        open_dataset(tmp_path / name, tmp_path / "work")


def test_open_dataset_refuses_zip_members_outside_the_destination(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../escaped.txt", "x")
    with pytest.raises(ValueError, match="points outside the archive"):
        open_dataset(archive, tmp_path / "work")
    assert not (tmp_path / "escaped.txt").exists()


def test_open_dataset_refuses_tar_members_outside_the_destination(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(ValueError, match="evil.tar.gz: unsafe member refused"):
        open_dataset(archive, tmp_path / "work")
    assert not (tmp_path / "escaped.txt").exists()


def test_discover_sorts_slice_numbers_numerically(make_synth):
    root = make_synth(patients=1, slices=12)
    layout = discover(root)
    assert [s.slice for s in layout.slices] == list(range(1, 13))  # 10 after 9, not after 1
    s = layout.slices[9]
    assert s.image_path.name.endswith("_10.tif") and s.mask_path.name.endswith("_10_mask.tif")
    assert (s.patient, s.institution, s.scan_date) == ("TCGA_DU_S000", "DU", "20000101")


def test_discover_ignores_other_files_and_untiffed_folders(synth_root):
    (synth_root / "README.txt").write_text("notes")
    (synth_root / "TCGA_DU_S000_20000101" / "notes.txt").write_text("notes")
    (synth_root / "thumbnails").mkdir()
    (synth_root / "thumbnails" / "a.png").write_bytes(b"x")
    layout = discover(synth_root)
    assert not layout.problems
    assert len(layout.slices) == 12
