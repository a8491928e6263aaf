"""The synthetic generator writes the public layout with plausible, consistent lesions."""

import numpy as np
import pandas as pd
import pytest
import tifffile

from brainseg.data import clinical
from brainseg.data.layout import discover
from brainseg.data.manifest import scan
from brainseg.data.synth import generate, synth_patient

PATIENTS, SLICES, SIZE = 5, 12, 48


@pytest.fixture(scope="module")
def synth12(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synth") / "kaggle_3m",
                    patients=PATIENTS, slices=SLICES, size=SIZE, seed=3)


def volume(folder, mask: bool) -> np.ndarray:
    suffix = "_mask" if mask else ""
    return np.stack([tifffile.imread(folder / f"{folder.name}_{k}{suffix}.tif")
                     for k in range(1, SLICES + 1)])


def patient_folders(root):
    return sorted(p for p in root.iterdir() if p.is_dir())


def test_layout_is_the_public_one_and_validates(synth12):
    result = scan(synth12)
    assert result.ok, result.problems
    s = result.summary()
    assert (s["patients"], s["slices"]) == (PATIENTS, PATIENTS * SLICES)
    assert set(s["institutions"]) == {"DU", "HT", "CS", "FG", "EZ"}
    folder = patient_folders(synth12)[0]
    image = tifffile.imread(folder / f"{folder.name}_1.tif")
    mask = tifffile.imread(folder / f"{folder.name}_1_mask.tif")
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    assert mask.shape == (SIZE, SIZE) and mask.dtype == np.uint8
    assert [r.slice for r in discover(synth12).slices[:SLICES]] == list(range(1, SLICES + 1))


def test_data_csv_columns_and_patients(synth12):
    df = pd.read_csv(synth12 / "data.csv")
    assert list(df.columns) == ["Patient"] + clinical.CLINICAL_COLUMNS + [clinical.TARGET]
    folders = {"_".join(p.name.split("_")[:3]) for p in patient_folders(synth12)}
    assert set(df["Patient"]) == folders
    assert set(df[clinical.TARGET].unique()) <= {0, 1}
    assert df["age_at_initial_pathologic"].between(18, 85).all()
    table = clinical.read_clinical(synth12 / "data.csv")  # the reader takes what synth writes
    assert len(table) == PATIENTS


def test_masks_binary_first_and_last_slices_empty_lesion_contiguous(synth12):
    for folder in patient_folders(synth12):
        masks = volume(folder, mask=True)
        assert set(np.unique(masks).tolist()) <= {0, 255}
        areas = (masks > 0).sum(axis=(1, 2))
        assert areas[0] == 0 and areas[-1] == 0, folder.name
        tumor = np.flatnonzero(areas)
        assert len(tumor) >= 2, (folder.name, areas)
        assert (np.diff(tumor) == 1).all(), (folder.name, areas)  # one run of consecutive slices
        assert SLICES // 4 <= tumor.mean() <= 3 * SLICES // 4  # in the middle of the volume


def test_lesion_overlaps_from_slice_to_slice(synth12):
    for folder in patient_folders(synth12):
        masks = volume(folder, mask=True) > 0
        tumor = np.flatnonzero(masks.sum(axis=(1, 2)))
        for a, b in zip(tumor[:-1], tumor[1:]):
            assert (masks[a] & masks[b]).any(), (folder.name, a, b)


def test_flair_brighter_inside_lesion_than_elsewhere_in_head(synth12):
    for folder in patient_folders(synth12):
        images, masks = volume(folder, mask=False), volume(folder, mask=True) > 0
        flair = images[..., 1].astype(float)
        head = flair > 40  # background is ~3, tissue ~95
        inside = flair[masks].mean()
        outside = flair[head & ~masks].mean()
        assert inside > outside + 30, (folder.name, inside, outside)
        assert head[masks].all()  # the lesion lies in the head


def test_deterministic_for_a_seed_and_seed_matters(tmp_path):
    a = generate(tmp_path / "a", patients=2, slices=4, size=32, seed=11)
    b = generate(tmp_path / "b", patients=2, slices=4, size=32, seed=11)
    c = generate(tmp_path / "c", patients=2, slices=4, size=32, seed=12)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    tifs = [f for f in files if f.suffix == ".tif"]
    assert len(tifs) == 16
    for f in tifs:
        np.testing.assert_array_equal(tifffile.imread(a / f), tifffile.imread(b / f))
    assert (a / "data.csv").read_text() == (b / "data.csv").read_text()
    assert any(not np.array_equal(tifffile.imread(a / f), tifffile.imread(c / f)) for f in tifs)


def test_synth_patient_shapes():
    images, masks = synth_patient(np.random.default_rng(0), 6, 32)
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
    assert masks.shape == (6, 32, 32) and masks.dtype == np.uint8


@pytest.mark.parametrize("kw", [dict(patients=0), dict(slices=3), dict(size=8)])
def test_too_small_refused(tmp_path, kw):
    with pytest.raises(ValueError, match="synth: need"):
        generate(tmp_path / "x", **(dict(patients=1, slices=4, size=32) | kw))
