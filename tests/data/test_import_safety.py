"""`brainseg data import` never loses data, and archives are unpacked within limits."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from brainseg.data import imageio
from brainseg.data.importer import ImportRefused, check_destination, import_dataset, marker_path
from brainseg.data.layout import ArchiveLimits, extract_archive
from helpers import invoke_flat, tree


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def zip_bomb(path: Path, megabytes: int, name: str = "kaggle_3m/zeros.bin") -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf, zf.open(name, "w", force_zip64=True) as fh:
        block = bytes(1024 * 1024)
        for _ in range(megabytes):
            fh.write(block)
    return path


def tar_bomb(path: Path, megabytes: int) -> Path:
    class Zeros(io.RawIOBase):
        def __init__(self, n):
            self.left = n

        def readable(self):
            return True

        def readinto(self, b):
            n = min(len(b), self.left)
            b[:n] = bytes(n)
            self.left -= n
            return n

    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo("kaggle_3m/zeros.bin")
        info.size = megabytes * 1024 * 1024
        tf.addfile(info, io.BufferedReader(Zeros(info.size)))
    return path


@pytest.fixture
def good(make_synth) -> Path:
    return make_synth(patients=3, slices=4, size=32, seed=0)


@pytest.fixture
def other_good(make_synth) -> Path:
    return make_synth(patients=2, slices=4, size=32, seed=5)


@pytest.fixture
def bad_masks(make_synth) -> Path:
    root = make_synth(patients=2, slices=4, size=32, seed=7)
    mask = sorted(root.glob("*/*_2_mask.tif"))[0]
    m = np.zeros((32, 32), np.uint8)
    m[2:5, 2:5] = 128
    imageio.write_tiff(mask, m)
    return root


# ------------------------------------------------------------------------------- the destination
def test_dest_at_the_project_root_changes_nothing(good, tmp_path, monkeypatch):
    project = tmp_path / "project"
    for rel, text in {"params.yaml": "profile: smoke\n", ".git/HEAD": "ref: refs/heads/main\n",
                      "brainseg/cli/__init__.py": "print()\n", "mlflow.db": "sqlite",
                      "mlruns/1/meta.yaml": "x"}.items():
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_text(text)
    before = tree(project), listing(tmp_path)
    monkeypatch.chdir(project)
    code, output = invoke_flat("data", "import", good, "--dest", ".", "--no-dvc")
    assert code == 2
    assert "is not empty and is not a dataset" in output and ".git/" in output
    assert (tree(project), listing(tmp_path)) == before  # nothing inside or beside it changed


def test_dest_at_an_unrelated_folder_changes_nothing(good, tmp_path):
    unrelated = tmp_path / "home"
    (unrelated / "photos").mkdir(parents=True)
    (unrelated / "notes.txt").write_text("mine")
    (unrelated / "photos" / "cat.png").write_bytes(b"png")
    before = tree(unrelated), listing(tmp_path)
    code, output = invoke_flat("data", "import", good, "--dest", unrelated, "--no-dvc")
    assert code == 2 and "notes.txt" in output and "nothing was changed" in output
    assert (tree(unrelated), listing(tmp_path)) == before


def test_dest_holding_the_source_is_refused(good):
    parent = good.parent
    before = tree(parent)
    code, output = invoke_flat("data", "import", good, "--dest", parent, "--no-dvc")
    assert code == 2 and "contains the source" in output
    assert tree(parent) == before


@pytest.mark.parametrize("name, make, word", [
    ("a file", lambda d: d.write_text("x"), "is a file"),
    ("dataset + project file", lambda d: (d.mkdir(), (d / "TCGA_CS_S000_20000101").mkdir(),
                                           (d / "train.py").write_text("x")), "train.py"),
])
def test_check_destination_refusals(tmp_path, good, name, make, word):
    dest = tmp_path / "dest"
    make(dest)
    with pytest.raises(ImportRefused, match=word):
        check_destination(good, dest)


# -------------------------------------------------------------------------- validate, swap, keep
def test_invalid_data_over_a_valid_import_leaves_the_valid_one(good, bad_masks, tmp_path):
    dest = tmp_path / "data" / "raw" / "kaggle_3m"
    code, output = invoke_flat("data", "import", good, "--dest", dest, "--no-dvc")
    assert code == 0, output
    before = tree(dest), listing(dest.parent)
    code, output = invoke_flat("data", "import", bad_masks, "--dest", dest, "--no-dvc")
    assert code == 2
    assert "mask values are {0, 128}" in output and "nothing was replaced" in output
    assert "_2_mask.tif" in output
    assert (tree(dest), listing(dest.parent)) == before
    code, output = invoke_flat("data", "validate", dest)  # the good data is still there and valid
    assert code == 0 and "patients: 3 slices: 12" in output


def test_replacing_keeps_the_previous_version_and_says_how_to_restore_it(good, other_good, tmp_path):
    dest = tmp_path / "raw" / "kaggle_3m"
    import_dataset(good, dest, use_dvc=False)
    first = tree(dest)
    message = import_dataset(other_good, dest, use_dvc=False)
    assert tree(dest) == tree(other_good)
    backups = sorted(dest.parent.glob("kaggle_3m.previous-*"))
    assert len(backups) == 1 and tree(backups[0]) == first
    assert f"kept in {backups[0]}" in message and f"brainseg data import {backups[0]} --dest {dest}" in message
    meta = json.loads(marker_path(dest).read_text())
    assert meta["source"] == str(other_good) and meta["patients"] == 2 and meta["previous_backup"] == str(backups[0])
    code, output = invoke_flat("data", "import", backups[0], "--dest", dest, "--no-dvc")  # the restore it names
    assert code == 0, output
    assert tree(dest) == first
    assert len(list(dest.parent.glob("kaggle_3m.previous-*"))) == 2  # nothing is ever deleted


def test_import_into_a_new_nested_folder_and_a_failed_one_leaves_no_folders(good, bad_masks, tmp_path):
    dest = tmp_path / "a" / "b" / "kaggle_3m"
    with pytest.raises(ImportRefused):
        import_dataset(bad_masks, dest, use_dvc=False)
    assert not (tmp_path / "a").exists()
    import_dataset(good, dest, use_dvc=False)
    assert tree(dest) == tree(good) and marker_path(dest).is_file()


def test_import_over_the_synthetic_default_replaces_it(good, tmp_path):
    from brainseg.data.importer import ensure_dataset

    dest = tmp_path / "data" / "raw" / "kaggle_3m"
    ensure_dataset(dest, {"patients": 2, "slices": 4, "size": 16, "seed": 0}, use_dvc=False)
    assert (dest.parent / "SYNTHETIC").exists()
    import_dataset(good, dest, use_dvc=False)
    assert tree(dest) == tree(good) and not (dest.parent / "SYNTHETIC").exists()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("dvc") is None, reason="dvc not installed")
def test_with_dvc_a_refused_import_keeps_the_pointer(good, bad_masks, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    subprocess.run(["dvc", "init", "--no-scm", "-q"], check=True)
    subprocess.run(["dvc", "config", "core.analytics", "false"], check=True)
    dest = Path("data/raw/kaggle_3m")
    code, output = invoke_flat("data", "import", good, "--dest", dest)
    assert code == 0, output
    pointer = Path("data/raw/kaggle_3m.dvc").read_text()
    assert "md5" in pointer
    code, output = invoke_flat("data", "import", bad_masks, "--dest", dest)
    assert code == 2 and "mask values" in output
    assert Path("data/raw/kaggle_3m.dvc").read_text() == pointer and tree(dest) == tree(good)
    code, output = invoke_flat("data", "import", good.parent, "--dest", dest)  # a new version: backup + cache
    assert code == 0, output
    assert "also in the DVC cache" in output


# ----------------------------------------------------------------------------------- archive limits
def test_zip_bomb_is_refused_before_writing(tmp_path):
    bomb = zip_bomb(tmp_path / "bomb.zip", 24)  # 24 MB of zeros in ~24 KB
    assert bomb.stat().st_size < 1_000_000
    work = tmp_path / "work"
    with pytest.raises(ValueError, match=r"bomb.zip: compression ratio over 100:1"):
        extract_archive(bomb, work)
    assert list(work.iterdir()) == []


def test_tar_bomb_is_refused_before_writing(tmp_path):
    bomb = tar_bomb(tmp_path / "bomb.tar.gz", 24)
    work = tmp_path / "work"
    with pytest.raises(ValueError, match=r"bomb.tar.gz: compression ratio over 100:1"):
        extract_archive(bomb, work)
    assert list(work.iterdir()) == []


@pytest.mark.parametrize("limits, word", [
    (ArchiveLimits(max_bytes=1000), "unpacks to more than"),
    (ArchiveLimits(max_files=5), "more than 5 members"),
    (ArchiveLimits(max_ratio=1.5, ratio_floor=0), "compression ratio over 1.5:1"),
])
def test_each_archive_limit(good, tmp_path, limits, word):
    archive = shutil.make_archive(str(tmp_path / "lgg"), "zip", root_dir=good.parent, base_dir=good.name)
    with pytest.raises(ValueError, match=word):
        extract_archive(Path(archive), tmp_path / "work", limits)
    assert extract_archive(Path(archive), tmp_path / "ok") == tmp_path / "ok"  # defaults let it through


def test_limits_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("BRAINSEG_ARCHIVE_MAX_BYTES", "2e9")
    monkeypatch.setenv("BRAINSEG_ARCHIVE_MAX_FILES", "7")
    monkeypatch.setenv("BRAINSEG_ARCHIVE_MAX_RATIO", "oops")  # unreadable: the default stays
    limits = ArchiveLimits.from_env()
    assert (limits.max_bytes, limits.max_files, limits.max_ratio) == (2_000_000_000, 7, ArchiveLimits().max_ratio)


@pytest.mark.parametrize("member", ["../escaped.txt", "/tmp/abs.txt", "kaggle_3m/../../escaped.txt"])
def test_zip_and_tar_members_outside_are_refused(tmp_path, member):
    z = tmp_path / "evil.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr(member, "x")
    t = tmp_path / "evil.tar"
    with tarfile.open(t, "w") as tf:
        info = tarfile.TarInfo(member)
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    for archive in (z, t):
        with pytest.raises(ValueError, match="unsafe member refused.*points outside"):
            extract_archive(archive, tmp_path / "work")
    assert list((tmp_path / "work").iterdir()) == [] and not (tmp_path / "escaped.txt").exists()


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE])
def test_tar_links_and_special_files_are_refused(tmp_path, kind):
    t = tmp_path / "links.tar"
    with tarfile.open(t, "w") as tf:
        info = tarfile.TarInfo("kaggle_3m/link")
        info.type, info.linkname = kind, "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(ValueError, match="unsafe member refused: 'kaggle_3m/link' is a"):
        extract_archive(t, tmp_path / "work")
