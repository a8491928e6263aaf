"""Hostile input to the CLI and the data layer: each case exits non-zero with a message naming the
problem, changes nothing, creates no MLflow run, and a good command still works afterwards."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile

from brainseg.data.importer import import_dataset
from brainseg.data.synth import generate
from helpers import invoke_flat, project_files, threshold_model, tree

DATA = Path("data/raw/kaggle_3m")


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder with a valid import at data/raw/kaggle_3m and MLflow pointed inside it."""
    root = project_files(tmp_path / "project")
    import_dataset(generate(tmp_path / "src" / "kaggle_3m", patients=4, slices=4, size=32, seed=0),
                   root / DATA, use_dvc=False)
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))  # where validate unpacks archives
    (tmp_path / "tmp").mkdir()
    return root


def dataset(tmp: Path, name: str, damage=None) -> Path:
    """A fresh small dataset under ``tmp/name/kaggle_3m``, optionally damaged by ``damage(root)``."""
    root = generate(tmp / name / "kaggle_3m", patients=2, slices=4, size=32, seed=3)
    if damage:
        damage(root)
    return root


def first(root: Path, n: int = 2, mask: bool = False) -> Path:
    folder = sorted(p for p in root.iterdir() if p.is_dir())[0]
    return folder / f"{folder.name}_{n}{'_mask' if mask else ''}.tif"


def planar_bomb(path: Path, side: int = 12000) -> None:
    tifffile.imwrite(path, np.zeros((3, 16, 16), np.uint8), photometric="rgb", planarconfig="separate")
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tif.pages[0].tags["ImageWidth"].overwrite(side)
        tif.pages[0].tags["ImageLength"].overwrite(side)


def zip_of(tmp: Path, members: dict[str, bytes], name: str = "x.zip") -> Path:
    path = tmp / name
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for member, data in members.items():
            zf.writestr(member, data)
    return path


def zip_bomb(tmp: Path) -> Path:
    path = tmp / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("kaggle_3m/z.bin", "w") as fh:
        for _ in range(24):
            fh.write(bytes(1024 * 1024))
    return path


def tar_with(tmp: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    path = tmp / "x.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        member.size = len(data) if member.isfile() else 0
        tf.addfile(member, io.BytesIO(data) if data else None)
    return path


def link(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def write(path: Path, arr: np.ndarray, **kw) -> None:
    tifffile.imwrite(path, arr, **kw)


# name -> build(tmp) -> (args, exit code, words the message must contain)
CASES = {
    # ---- import: the destination
    "import --dest at the project root": lambda t: (
        ["data", "import", dataset(t, "a"), "--dest", ".", "--no-dvc"], 2, ["not a dataset", "params.yaml"]),
    "import --dest at an unrelated folder": lambda t: (
        (t / "mine").mkdir() or (t / "mine" / "thesis.tex").write_text("x") and
        ["data", "import", dataset(t, "a"), "--dest", t / "mine", "--no-dvc"], 2,
        ["thesis.tex", "nothing was changed"]),
    "import --dest holding the source": lambda t: (
        ["data", "import", dataset(t, "a"), "--dest", t / "a", "--no-dvc"], 2, ["contains the source"]),
    "import --dest is a file": lambda t: (
        ["data", "import", dataset(t, "a"), "--dest", "params.yaml", "--no-dvc"], 2, ["is a file"]),
    "import onto itself": lambda t: (["data", "import", DATA, "--dest", DATA, "--no-dvc"], 2, ["already at"]),
    "import a missing source": lambda t: (
        ["data", "import", t / "nowhere", "--no-dvc"], 2, ["nowhere: no such file or folder"]),
    # ---- import: invalid data over the valid import
    "import bad mask values": lambda t: (
        ["data", "import", dataset(t, "a", lambda r: write(first(r, mask=True), np.full((32, 32), 7, np.uint8))),
         "--no-dvc"], 2, ["mask values are {7}", "nothing was replaced"]),
    "import a missing mask": lambda t: (
        ["data", "import", dataset(t, "a", lambda r: first(r, mask=True).unlink()), "--no-dvc"], 2,
        ["image without mask", "_2.tif", "nothing was replaced"]),
    "import a truncated TIFF": lambda t: (
        ["data", "import", dataset(t, "a", lambda r: first(r).write_bytes(first(r).read_bytes()[:300])),
         "--no-dvc"], 2, ["truncated TIFF", "_2.tif"]),
    "import a float image": lambda t: (
        ["data", "import", dataset(t, "a", lambda r: write(first(r), np.zeros((32, 32, 3), np.float32))),
         "--no-dvc"], 2, ["dtype is float32"]),
    "import a zip bomb": lambda t: (["data", "import", zip_bomb(t), "--no-dvc"], 2, ["bomb.zip", "zip bomb"]),
    "import a zip escaping the target": lambda t: (
        ["data", "import", zip_of(t, {"../../evil.txt": b"x"}), "--no-dvc"], 2, ["'../../evil.txt' points outside"]),
    "import a tar with a symlink": lambda t: (
        ["data", "import", tar_with(t, link("kaggle_3m/data.csv", "/etc/passwd")), "--no-dvc"], 2,
        ["'kaggle_3m/data.csv' is a link"]),
    "import a tar with an absolute path": lambda t: (
        ["data", "import", tar_with(t, tarfile.TarInfo("/tmp/evil.txt"), b"x"), "--no-dvc"], 2,
        ["'/tmp/evil.txt' points outside"]),
    # ---- validate: archives and decoders
    "validate a zip bomb": lambda t: (["data", "validate", zip_bomb(t)], 2, ["compression ratio over"]),
    "validate a zip escaping the target": lambda t: (
        ["data", "validate", zip_of(t, {"kaggle_3m/../../../evil.txt": b"x"})], 2, ["points outside"]),
    "validate a corrupt zip": lambda t: (
        (t / "c.zip").write_bytes(b"PK\x03\x04 nope") and ["data", "validate", t / "c.zip"], 2,
        ["c.zip: not a readable zip/tar archive"]),
    "validate a planar pixel bomb": lambda t: (
        ["data", "validate", dataset(t, "a", lambda r: planar_bomb(first(r)))], 1,
        ["BAD", "_2.tif", "12000x12000 pixels is larger than the", "before decoding"]),
    "validate 400 samples per pixel": lambda t: (
        ["data", "validate", dataset(t, "a", lambda r: write(first(r), np.zeros((32, 32, 400), np.uint8),
                                                              photometric="minisblack", planarconfig="contig"))],
        1, ["_2.tif", "400 channels"]),
    "validate a page stack": lambda t: (
        ["data", "validate", dataset(t, "a", lambda r: write(first(r), np.zeros((7, 32, 32), np.uint8)))], 1,
        ["_2.tif", "stack of 7 pages"]),
    "validate a 4-channel image": lambda t: (
        ["data", "validate", dataset(t, "a", lambda r: write(first(r), np.zeros((32, 32, 4), np.uint8)))], 1,
        ["_2.tif", "32x32x4"]),
    "validate a 16-bit mask": lambda t: (
        ["data", "validate", dataset(t, "a", lambda r: write(first(r, mask=True), np.zeros((32, 32), np.uint16)))],
        1, ["_2_mask.tif", "mask dtype is uint16"]),
    "validate garbage named .tif": lambda t: (
        ["data", "validate", dataset(t, "a", lambda r: first(r).write_bytes(b"not an image at all"))], 1,
        ["_2.tif", "not a TIFF or PNG"]),
    "validate a mask of another size": lambda t: (
        ["data", "validate", dataset(t, "a", lambda r: write(first(r, mask=True), np.zeros((16, 16), np.uint8)))],
        1, ["_2_mask.tif", "mask is 16x16 but its image is 32x32"]),
    # ---- settings: checked before any run
    "train.lr=abc": lambda t: (["train", "--set", "train.lr=abc"], 2, ["train.lr", "'abc'", "not a number"]),
    "train.batch_size=0": lambda t: (["train", "--set", "train.batch_size=0"], 2,
                                     ["train.batch_size: 0", "in [1, 4096]"]),
    "train=5": lambda t: (["train", "--set", "train=5"], 2, ["train: 5", "whole section"]),
    "train.epochs=0": lambda t: (["train", "--set", "train.epochs=0"], 2, ["train.epochs: 0", ">= 1"]),
    "train.size=-64": lambda t: (["train", "--set", "train.size=-64"], 2, ["train.size: -64"]),
    "train.steps_per_epoch=0": lambda t: (["train", "--set", "train.steps_per_epoch=0"], 2,
                                          ["train.steps_per_epoch: 0", "null or an integer >= 1"]),
    "tune.n_trials=0": lambda t: (["tune", "--set", "tune.n_trials=0"], 2, ["tune.n_trials: 0"]),
    "tune.epochs=two": lambda t: (["tune", "--set", "tune.epochs=two"], 2, ["tune.epochs", "'two'"]),
    "evaluate.threshold=1.5": lambda t: (["evaluate", "--set", "evaluate.threshold=1.5"], 2,
                                         ["evaluate.threshold: 1.5", "(0, 1)"]),
    "evaluate.tta=maybe": lambda t: (["evaluate", "--set", "evaluate.tta=maybe"], 2,
                                     ["evaluate.tta", "not true or false"]),
    "unknown key": lambda t: (["train", "--set", "train.learning_rate=0.1"], 2, ["unknown key 'train.learning_rate'"]),
    "not KEY=VALUE": lambda t: (["train", "--set", "train.lr"], 2, ["expected KEY=VALUE"]),
    # issue 37: malformed YAML in a value (nothing is constructed or executed)
    "--set a python tag": lambda t: (["train", "--set", f"train.lr=!!python/object/apply:os.mkdir [{t / 'pwned'}]"],
                                     2, ["--set train.lr: the YAML tag !!python/object/apply:os.mkdir is not allowed"]),
    "--set an unclosed bracket": lambda t: (["train", "--set", "train.lr=[0.1, 0.2"], 2,
                                            ["--set train.lr: column 10: not valid YAML"]),
    "--set a recursive anchor": lambda t: (["tune", "--set", "tune.search_space=&x {a: *x}"], 2,
                                           ["--set tune.search_space.a: an anchor that contains itself"]),
    # ---- commands that need something first
    "survival without features": lambda t: (["survival", "--features", t / "none.csv"], 2,
                                            ["none.csv", "brainseg features --truth"]),
    "predict with nothing to read": lambda t: (["predict", t / "empty-dir", "--out", t / "o"], 2,
                                               ["empty-dir: no such file or folder"]),
    "predict --threshold 2": lambda t: (["predict", DATA, "--out", t / "o", "--threshold", "2"], 2,
                                        ["--threshold: 2.0 is not in (0, 1)"]),
    "predict --threshold nan": lambda t: (["predict", DATA, "--out", t / "o", "--threshold", "nan"], 2,
                                          ["--threshold: nan is not in (0, 1)"]),
    "predict --out an existing file": lambda t: (["predict", DATA, "--out", "params.yaml"], 2,
                                                 ["params.yaml: exists and is not a folder"]),
    # ---- resuming (issue 27): refused before any run
    "train --resume with nothing to resume": lambda t: (["train", "--resume", "--checkpoint-dir", t / "ck"], 2,
                                                        ["--resume: no checkpoint under", "brainseg checkpoints"]),
    "train --resume --run unknown": lambda t: (["train", "--resume", "--run", "abc123", "--checkpoint-dir", t / "ck"],
                                               2, ["abc123/state.json: no checkpoint here"]),
    "train --resume --set": lambda t: (["train", "--resume", "--set", "train.lr=0.1"], 2,
                                       ["--resume continues the run with its own settings", "drop --profile, --set"]),
    "train --resume of a damaged checkpoint": lambda t: (
        ["train", "--resume", "--run", "r1", "--checkpoint-dir", _damaged_checkpoint(t / "ck", "r1")], 2,
        ["r1/state.json: unreadable checkpoint"]),
}


def _damaged_checkpoint(root: Path, run_id: str) -> Path:
    (root / run_id).mkdir(parents=True)
    (root / run_id / "state.json").write_text('{"epoch": 3, "hist')  # damaged (a copy cut short, a disk error)
    return root


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_command_is_refused_and_a_good_one_still_works(project, tmp_path, case):
    build = tmp_path / "case"
    build.mkdir()
    args, code, words = CASES[case](build)
    data_before = tree(project / DATA)
    beside_before = sorted(p.name for p in (project / DATA).parent.iterdir())
    project_before = sorted(str(p.relative_to(project)) for p in project.rglob("*"))

    got, output = invoke_flat(*args)
    assert got == code, f"{case}: exit {got}: {output}"
    for word in words:
        assert word in output, f"{case}: {word!r} not in {output!r}"
    assert "Traceback" not in output
    assert tree(project / DATA) == data_before  # the valid import is untouched
    assert sorted(p.name for p in (project / DATA).parent.iterdir()) == beside_before
    if args[0] in ("train", "tune", "evaluate", "survival"):  # refused before any run or file
        assert not (project / "mlflow.db").exists() and not (project / "mlruns").exists()
        assert sorted(str(p.relative_to(project)) for p in project.rglob("*")) == project_before
    assert list((tmp_path / "tmp").iterdir()) == []  # nothing left unpacked
    assert not list(tmp_path.rglob("evil.txt"))

    got, output = invoke_flat("data", "validate", DATA)  # a good command still works
    assert got == 0 and "patients: 4 slices: 16" in output and "problems: 0" in output


def test_the_suite_has_at_least_25_cases():
    assert len(CASES) >= 25


@pytest.mark.parametrize("fault", ["full disk", "read-only folder"])
def test_predict_that_cannot_write_says_so_and_leaves_no_partial_file(project, tmp_path, monkeypatch, fault):
    import errno

    from brainseg.data import imageio

    model = tmp_path / "model"
    threshold_model(model)
    real_write, real_mkdir, writes = Path.write_bytes, Path.mkdir, []

    def write_bytes(self, data):
        writes.append(self)
        if fault == "full disk" and len(writes) > 5:
            real_write(self, data[: len(data) // 2])  # the disk fills halfway through a file
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write(self, data)

    def mkdir(self, *a, **kw):
        if fault == "read-only folder" and self.name == "out":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *a, **kw)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    monkeypatch.setattr(Path, "mkdir", mkdir)
    got, output = invoke_flat("predict", DATA, "--out", tmp_path / "out", "--model", model)
    assert "Traceback" not in output, output
    if fault == "full disk":  # found mid-way: what was written before is whole
        assert got == 1 and "cannot write into" in output and "No space left on device" in output
    else:  # found before the model loads
        assert got == 2 and "out: cannot write there (Permission denied)" in output
    left = sorted((tmp_path / "out").rglob("*")) if (tmp_path / "out").exists() else []  # a folder per patient
    assert not [p for p in left if p.name.endswith(".part")]  # no truncated file left behind
    for png in (p for p in left if p.suffix == ".png"):  # every file there is whole
        imageio.read_image(png)
    pngs = [p for p in left if p.suffix == ".png"]
    if fault == "full disk":
        failed = writes[-1].name[1:-len(".part")]  # the file the disk filled on
        assert pngs and not writes[-1].with_name(failed).exists()
    else:
        assert not pngs
