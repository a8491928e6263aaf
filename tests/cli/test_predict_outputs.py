"""``brainseg predict`` as a user runs it (issue 37): outputs never collide, one bad file never stops
the batch, names with control characters and images the served model refuses are refused by name
with the server's words; every other file is still written, with its features.csv row."""

from __future__ import annotations

import errno
import os

import numpy as np
import pandas as pd
import pytest
import tifffile

from brainseg.data import imageio
from brainseg.serving.limits import RequestLimits
from helpers import invoke_flat, project_files, threshold_model

SIZE = 64


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A fixed network (bright FLAIR pixels are tumor) saved as a model folder."""

    folder = tmp_path_factory.mktemp("model")
    threshold_model(folder)
    return folder


@pytest.fixture
def project(tmp_path, monkeypatch):
    root = project_files(tmp_path / "project")
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    for var in RequestLimits.ENV.values():
        monkeypatch.delenv(var, raising=False)
    return root


def slice_with(x0: int, x1: int, size: int = SIZE) -> np.ndarray:
    """An RGB slice, dark with a bright block over columns x0..x1 (the network finds the block)."""
    image = np.full((size, size, 3), 20, np.uint8)
    image[size // 4: 3 * size // 4, x0:x1] = 220
    return image


def write_slice(path, image: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".png":
        path.write_bytes(imageio.encode_png(image))
    else:
        tifffile.imwrite(path, image)
    return path


def mask_of(path) -> np.ndarray:
    return imageio.check_mask(imageio.read_file(path), str(path))


def predict(*args, out, model) -> tuple[int, str]:
    code, output = invoke_flat("predict", *args, "--out", out, "--model", model)
    assert "Traceback" not in output, output
    return code, output


def bad_lines(output: str) -> list[str]:
    return [part.strip() for part in output.split("BAD ")[1:]]


# ------------------------------------------------------------------------------ outputs never collide
@pytest.mark.parametrize("as_folders", [False, True], ids=["two files", "two folders"])
def test_two_slices_of_one_name_in_two_folders_keep_their_folders(project, model, tmp_path, as_folders):
    """Once: exit 0, one mask overwrote the other and both CSV rows named the survivor."""
    from brainseg.inference.segmenter import Segmenter

    left = write_slice(tmp_path / "in" / "A" / "scan_1.tif", slice_with(4, 20))
    right = write_slice(tmp_path / "in" / "B" / "scan_1.tif", slice_with(40, 60))
    args = [left.parent, right.parent] if as_folders else [left, right]
    code, output = predict(*args, out=tmp_path / "out", model=model)
    assert code == 0, output
    out = tmp_path / "out"
    assert not (out / "scan_1_pred.png").exists()
    segmenter = Segmenter.from_dir(model)
    for folder, path in (("A", left), ("B", right)):
        expected = segmenter.segment([imageio.read_image(path)], groups=[folder]).masks[0]
        np.testing.assert_array_equal(mask_of(out / folder / "scan_1_pred.png"), expected)
        assert (out / folder / "scan_1_overlay.png").is_file()
    assert not np.array_equal(mask_of(out / "A" / "scan_1_pred.png"), mask_of(out / "B" / "scan_1_pred.png"))
    rows = pd.read_csv(out / "features.csv").set_index("mask_file")
    assert sorted(rows.index) == ["A/scan_1_pred.png", "B/scan_1_pred.png"]
    assert rows.loc["A/scan_1_pred.png", "file"] == str(left) and rows.loc["B/scan_1_pred.png", "file"] == str(right)
    assert sorted(rows["overlay_file"]) == ["A/scan_1_overlay.png", "B/scan_1_overlay.png"]


def test_the_slices_of_one_folder_are_written_flat_as_before(project, model, tmp_path):
    folder = tmp_path / "in" / "TCGA_CS_4941_19960909"
    files = [write_slice(folder / f"TCGA_CS_4941_19960909_{k}.tif", slice_with(4 * k, 4 * k + 20)) for k in (1, 2)]
    code, output = predict(folder, out=tmp_path / "out", model=model)
    assert code == 0, output
    assert sorted(pd.read_csv(tmp_path / "out" / "features.csv")["mask_file"]) == [f"{f.stem}_pred.png" for f in files]


def test_two_inputs_that_would_write_one_name_are_both_refused_by_name(project, model, tmp_path):
    folder = tmp_path / "in" / "scans"
    tif = write_slice(folder / "scan_1.tif", slice_with(4, 20))
    png = write_slice(folder / "scan_1.png", slice_with(40, 60))
    good = write_slice(folder / "scan_2.tif", slice_with(10, 30))
    code, output = predict(folder, out=tmp_path / "out", model=model)
    assert code == 1, output
    assert bad_lines(output) == [f"{png}, {tif}: both would be written as scan_1_pred.png and "
                                 "scan_1_overlay.png; rename one"]
    assert pd.read_csv(tmp_path / "out" / "features.csv")["file"].tolist() == [str(good)]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["scan_2_overlay.png", "scan_2_pred.png"]


# ---------------------------------------------------------------------- one bad file never stops the batch
def test_a_legal_but_very_long_name_is_reported_and_the_others_are_written(project, model, tmp_path):
    """Once: the write of its outputs failed (File name too long), stopped everything and wrote no CSV."""
    folder = tmp_path / "in" / "scans"
    long = write_slice(folder / ("x" * 246 + "_1.tif"), slice_with(4, 20))  # 252 bytes: a legal name
    good = [write_slice(folder / f"scan_{k}.tif", slice_with(10, 30)) for k in (2, 3)]
    code, output = predict(folder, out=tmp_path / "out", model=model)
    assert code == 1, output
    [bad] = bad_lines(output)
    assert bad.startswith(f"{long}: its outputs' names ({long.stem}_overlay.png and a temporary name) would be "
                          "266 bytes, over the 255-byte limit of"), bad
    assert bad.endswith("give the file a shorter name")
    assert pd.read_csv(tmp_path / "out" / "features.csv")["file"].tolist() == [str(f) for f in good]
    assert (tmp_path / "out" / "patients.csv").is_file()


def test_a_name_the_file_system_refuses_when_written_is_reported_and_the_others_are_written(
        project, model, tmp_path, monkeypatch):
    """The same fault found only at the write (a file system with shorter names than it says)."""
    from brainseg.pipeline import predict as predict_module

    monkeypatch.setattr(predict_module, "name_max", lambda folder: 10_000)  # the check before lets it through
    folder = tmp_path / "in" / "scans"
    long = write_slice(folder / ("x" * 246 + "_1.tif"), slice_with(4, 20))
    good = write_slice(folder / "scan_2.tif", slice_with(10, 30))
    code, output = predict(folder, out=tmp_path / "out", model=model)
    assert code == 1, output
    assert bad_lines(output) == [f"{long}: cannot write its outputs as {long.stem}_pred.png "
                                 f"({os.strerror(errno.ENAMETOOLONG)}); the others are written"]
    assert pd.read_csv(tmp_path / "out" / "features.csv")["file"].tolist() == [str(good)]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "features.csv", "patients.csv", "scan_2_overlay.png", "scan_2_pred.png"]  # no half pair, no .part


@pytest.mark.parametrize("name", ["TCGA_CS_4941_19960909_3.tif\n", "scan\n_2.tif", "scan_\r4.tif"])
def test_a_name_with_a_control_character_is_refused_and_never_read_as_a_slice_number(project, model, tmp_path, name):
    folder = tmp_path / "in" / "TCGA_CS_4941_19960909"
    odd = write_slice(folder / name, slice_with(4, 20))
    good = write_slice(folder / "TCGA_CS_4941_19960909_1.tif", slice_with(10, 30))
    code, output = invoke_flat("predict", odd, good, "--out", tmp_path / "out", "--model", model)
    assert code == 1, output
    char = "\\n" if "\n" in name else "\\r"
    assert f"{str(odd)!r}: the name holds a control character ('{char}'); rename it" in output
    assert pd.read_csv(tmp_path / "out" / "features.csv")["file"].tolist() == [str(good)]


# -------------------------------------------------------------- the served model's limits of one image
@pytest.mark.parametrize("shape", [(16, 16, 3), (1, 1, 3), (300, 16, 3)])
def test_an_image_the_server_refuses_as_too_small_predict_refuses_with_its_words(project, model, tmp_path, shape):
    """Once: predict segmented a 1x1 image the server refuses (RequestLimits is now read by both)."""
    folder = tmp_path / "in" / "scans"
    small = write_slice(folder / "scan_1.tif", np.full(shape, 200, np.uint8))
    good = write_slice(folder / "scan_2.tif", slice_with(10, 30))
    code, output = predict(folder, out=tmp_path / "out", model=model)
    assert code == 1, output
    assert bad_lines(output) == [f"{small}: {RequestLimits().image_problem(shape[1], shape[0])}"]
    assert pd.read_csv(tmp_path / "out" / "features.csv")["file"].tolist() == [str(good)]


def test_an_image_over_the_served_byte_limit_is_refused_with_its_variable(project, model, tmp_path, monkeypatch):
    monkeypatch.setenv(RequestLimits.ENV["max_image_bytes"], "10000")
    folder = tmp_path / "in" / "scans"
    big = write_slice(folder / "scan_1.tif", slice_with(4, 20, size=128))  # 49,152 pixel bytes
    good = write_slice(folder / "scan_2.png", slice_with(10, 30))  # a PNG of a few hundred bytes
    code, output = predict(folder, out=tmp_path / "out", model=model)
    assert code == 1, output
    size = big.stat().st_size
    assert bad_lines(output) == [f"{big}: image of {size:,} bytes exceeds the limit of 10,000 bytes per image "
                                 "(BRAINSEG_SERVE_MAX_IMAGE_BYTES)"]
    assert pd.read_csv(tmp_path / "out" / "features.csv")["file"].tolist() == [str(good)]


def test_a_bad_limit_setting_is_one_line_before_anything_is_written(project, model, tmp_path, monkeypatch):
    monkeypatch.setenv(RequestLimits.ENV["max_image_bytes"], "16MB")
    write_slice(tmp_path / "in" / "scan_1.tif", slice_with(4, 20))
    code, output = predict(tmp_path / "in", out=tmp_path / "out", model=model)
    assert code == 2 and "BRAINSEG_SERVE_MAX_IMAGE_BYTES='16MB' is not an integer" in output, output
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
