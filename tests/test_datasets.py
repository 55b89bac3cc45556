"""Tests for skpatchad.datasets (MVTec AD layout loader and embedded sample)."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.utils import Bunch

from skpatchad.datasets import load_mvtec, load_sample, sample_path

REAL_ROOT = Path("/work/shared/data/mvtec_ad")
SAMPLE_TEST_TYPES = (
    ["broken_large"] * 3 + ["broken_small"] * 3 + ["contamination"] * 4 + ["good"] * 6
)


# --------------------------------------------------------------------------
# Helpers building a tiny MVTec-layout folder
# --------------------------------------------------------------------------
def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _rgb(h, w, value):
    rng = np.random.RandomState(value)
    return rng.randint(0, 256, size=(h, w, 3)).astype(np.uint8)


def _mask(h, w, box):
    mask = np.zeros((h, w), dtype=np.uint8)
    r0, r1, c0, c1 = box
    mask[r0:r1, c0:c1] = 255
    return mask


@pytest.fixture
def tiny_root(tmp_path):
    """A fake dataset with an RGB, a grayscale and a mixed-size category."""
    root = tmp_path / "mvtec"

    # "widget": RGB 8x10 images, written in non-sorted order on purpose.
    cat = root / "widget"
    for name in ["002.png", "000.png", "001.png"]:
        _save(cat / "train" / "good" / name, _rgb(8, 10, int(name[:3])))
    _save(cat / "test" / "good" / "000.png", _rgb(8, 10, 10))
    _save(cat / "test" / "scratch" / "001.png", _rgb(8, 10, 11))
    _save(cat / "test" / "scratch" / "000.png", _rgb(8, 10, 12))
    _save(cat / "test" / "crack" / "000.png", _rgb(8, 10, 13))
    gt = cat / "ground_truth"
    _save(gt / "scratch" / "000_mask.png", _mask(8, 10, (0, 2, 0, 3)))
    _save(gt / "scratch" / "001_mask.png", _mask(8, 10, (4, 8, 5, 10)))
    _save(gt / "crack" / "000_mask.png", _mask(8, 10, (2, 6, 2, 6)))

    # "gray": grayscale (mode L) images.
    cat = root / "gray"
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8)
    _save(cat / "train" / "good" / "000.png", gray)
    _save(cat / "test" / "good" / "000.png", gray)
    _save(cat / "test" / "dent" / "000.png", gray[::-1].copy())
    _save(cat / "ground_truth" / "dent" / "000_mask.png", _mask(6, 8, (1, 3, 1, 3)))

    # "mixed": images of different sizes.
    cat = root / "mixed"
    _save(cat / "train" / "good" / "000.png", _rgb(8, 10, 0))
    _save(cat / "train" / "good" / "001.png", _rgb(12, 6, 1))
    _save(cat / "test" / "good" / "000.png", _rgb(8, 10, 2))
    _save(cat / "test" / "hole" / "000.png", _rgb(12, 6, 3))
    _save(cat / "ground_truth" / "hole" / "000_mask.png", _mask(12, 6, (0, 4, 0, 6)))

    # A stray file at the root must not be listed as a category.
    (root / "README.txt").write_text("not a category")
    return root


# --------------------------------------------------------------------------
# Embedded sample
# --------------------------------------------------------------------------
def test_sample_path_layout():
    root = Path(sample_path())
    assert root.is_dir()
    assert (root / "ATTRIBUTION.txt").is_file()
    assert (root / "LICENSE-MVTEC-AD.txt").is_file()
    assert (root / "bottle" / "train" / "good").is_dir()
    attribution = (root / "ATTRIBUTION.txt").read_text()
    assert "CC BY-NC-SA 4.0" in attribution
    assert "MVTec" in attribution
    # Every image shipped is listed in the attribution file.
    for png in (root / "bottle").rglob("*.png"):
        assert png.relative_to(root).as_posix() in attribution


def test_load_sample_train():
    data = load_sample()
    assert isinstance(data, Bunch)
    assert data.images.shape == (32, 224, 224, 3)
    assert data.images.dtype == np.uint8
    assert data.masks.shape == (32, 224, 224)
    assert data.masks.dtype == np.uint8
    assert not data.masks.any()
    assert data.labels.shape == (32,)
    assert np.issubdtype(data.labels.dtype, np.integer)
    assert not data.labels.any()
    assert list(data.defect_types) == ["good"] * 32
    assert len(data.filenames) == 32
    assert data.filenames == sorted(data.filenames)
    # Real photographs, not blank placeholders.
    assert data.images.std() > 10


def test_load_sample_test_labels_and_masks():
    data = load_sample("test")
    assert data.images.shape == (16, 224, 224, 3)
    assert data.masks.shape == (16, 224, 224)
    assert list(data.defect_types) == SAMPLE_TEST_TYPES
    np.testing.assert_array_equal(data.labels, [1] * 10 + [0] * 6)
    # A label is 1 exactly when its mask marks some pixel.
    np.testing.assert_array_equal(
        data.labels, data.masks.reshape(16, -1).any(axis=1).astype(int)
    )
    assert set(np.unique(data.masks)) == {0, 1}
    # Order: defect type, then file name.
    keys = [(t, os.path.basename(f)) for t, f in zip(data.defect_types, data.filenames)]
    assert keys == sorted(keys)
    for t, f in zip(data.defect_types, data.filenames):
        assert Path(f).parent.name == t


def test_load_sample_return_X_y_and_determinism():
    X, y, masks = load_sample("test", return_X_y=True)
    data = load_sample("test")
    np.testing.assert_array_equal(X, data.images)
    np.testing.assert_array_equal(y, data.labels)
    np.testing.assert_array_equal(masks, data.masks)
    again = load_sample("test")
    assert again.filenames == data.filenames
    np.testing.assert_array_equal(again.images, data.images)


def test_load_mvtec_on_sample_with_resize():
    data = load_mvtec(sample_path(), "bottle", "test", resize=(56, 40))
    assert data.images.shape == (16, 56, 40, 3)
    assert data.masks.shape == (16, 56, 40)
    assert set(np.unique(data.masks)) <= {0, 1}
    np.testing.assert_array_equal(
        data.labels, data.masks.reshape(16, -1).any(axis=1).astype(int)
    )
    square = load_mvtec(sample_path(), "bottle", "train", resize=32)
    assert square.images.shape == (32, 32, 32, 3)


def test_datasets_do_not_import_torch():
    import subprocess

    import skpatchad

    # A fresh interpreter, because other tests of the suite may have imported
    # torch into this one already.
    code = (
        "import sys; import skpatchad.datasets as d; d.load_sample('test'); "
        "print('torch' in sys.modules)"
    )
    root = str(Path(skpatchad.__file__).resolve().parent.parent)
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=root,
        check=True,
        env={**os.environ, "PYTHONPATH": root},
    )
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------
# Synthetic MVTec-layout folders
# --------------------------------------------------------------------------
def test_tiny_train_sorted(tiny_root):
    data = load_mvtec(tiny_root, "widget", "train")
    assert data.images.shape == (3, 8, 10, 3)
    assert [os.path.basename(f) for f in data.filenames] == [
        "000.png",
        "001.png",
        "002.png",
    ]
    for i in range(3):
        np.testing.assert_array_equal(data.images[i], _rgb(8, 10, i))
    assert data.masks.shape == (3, 8, 10)
    assert not data.masks.any()
    np.testing.assert_array_equal(data.labels, [0, 0, 0])


def test_tiny_test_order_labels_masks(tiny_root):
    data = load_mvtec(str(tiny_root), "widget", split="test")
    assert list(data.defect_types) == ["crack", "good", "scratch", "scratch"]
    np.testing.assert_array_equal(data.labels, [1, 0, 1, 1])
    names = [Path(f).relative_to(tiny_root).as_posix() for f in data.filenames]
    assert names == [
        "widget/test/crack/000.png",
        "widget/test/good/000.png",
        "widget/test/scratch/000.png",
        "widget/test/scratch/001.png",
    ]
    np.testing.assert_array_equal(data.images[2], _rgb(8, 10, 12))
    assert data.masks.dtype == np.uint8
    np.testing.assert_array_equal(data.masks[0], _mask(8, 10, (2, 6, 2, 6)) // 255)
    assert not data.masks[1].any()
    np.testing.assert_array_equal(data.masks[2], _mask(8, 10, (0, 2, 0, 3)) // 255)
    np.testing.assert_array_equal(data.masks[3], _mask(8, 10, (4, 8, 5, 10)) // 255)
    assert data.category == "widget" and data.split == "test"


def test_exif_oriented_photo_loaded_upright_like_check_images(tmp_path):
    # a camera photo stored 8x10 with "rotate 90" in its EXIF, its mask drawn on
    # the upright 10x8 view: the loader must agree with check_images on paths
    from skpatchad.utils import check_images

    stored = _rgb(8, 10, 5)
    pil = Image.fromarray(stored)
    exif = pil.getexif()
    exif[0x0112] = 6
    cat = tmp_path / "mvtec" / "phone"
    (cat / "train" / "good").mkdir(parents=True)
    pil.save(cat / "train" / "good" / "000.png", exif=exif)
    (cat / "test" / "dent").mkdir(parents=True)
    pil.save(cat / "test" / "dent" / "000.png", exif=exif)
    _save(cat / "ground_truth" / "dent" / "000_mask.png", _mask(10, 8, (0, 3, 0, 2)))
    upright = np.rot90(stored, -1)
    train = load_mvtec(str(tmp_path / "mvtec"), "phone", split="train")
    np.testing.assert_array_equal(train.images[0], upright)
    np.testing.assert_array_equal(check_images(list(train.filenames), min_size=1)[0], upright)
    test = load_mvtec(str(tmp_path / "mvtec"), "phone", split="test")
    assert test.images[0].shape == (10, 8, 3) and test.masks[0].shape == (10, 8)
    np.testing.assert_array_equal(test.masks[0], _mask(10, 8, (0, 3, 0, 2)) // 255)


def test_tiny_grayscale_stays_2d(tiny_root):
    data = load_mvtec(tiny_root, "gray", "test")
    assert data.images.shape == (2, 6, 8)
    assert data.images.dtype == np.uint8
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8)
    np.testing.assert_array_equal(data.images[0], gray[::-1])  # "dent" first
    np.testing.assert_array_equal(data.images[1], gray)
    np.testing.assert_array_equal(data.labels, [1, 0])
    assert data.masks.shape == (2, 6, 8)
    assert data.masks[0].sum() == 4


def test_tiny_mixed_sizes_give_lists(tiny_root):
    data = load_mvtec(tiny_root, "mixed", "train")
    assert isinstance(data.images, list) and isinstance(data.masks, list)
    assert [im.shape for im in data.images] == [(8, 10, 3), (12, 6, 3)]
    assert [m.shape for m in data.masks] == [(8, 10), (12, 6)]
    assert all(im.dtype == np.uint8 for im in data.images)

    test = load_mvtec(tiny_root, "mixed", "test")
    assert list(test.defect_types) == ["good", "hole"]
    assert [m.shape for m in test.masks] == [(8, 10), (12, 6)]
    assert test.masks[1].sum() == 4 * 6
    assert not test.masks[0].any()

    # Resizing to a common size gives arrays again.
    resized = load_mvtec(tiny_root, "mixed", "test", resize=(4, 4))
    assert resized.images.shape == (2, 4, 4, 3)
    assert resized.masks.shape == (2, 4, 4)
    np.testing.assert_array_equal(resized.labels, [0, 1])
    assert resized.masks[1].any() and not resized.masks[0].any()


def test_resize_masks_stay_binary(tiny_root):
    data = load_mvtec(tiny_root, "widget", "test", resize=(4, 5))
    assert data.images.shape == (4, 4, 5, 3)
    assert set(np.unique(data.masks)) == {0, 1}
    # Nearest-neighbour halving of the 8x10 masks keeps the defect boxes.
    expected = _mask(8, 10, (2, 6, 2, 6))[::2, ::2] // 255
    np.testing.assert_array_equal(data.masks[0], expected)


@pytest.mark.parametrize("resize", [0, -3, (4,), (4, 0), 2.5, "224", True])
def test_invalid_resize(tiny_root, resize):
    with pytest.raises(ValueError, match="resize"):
        load_mvtec(tiny_root, "widget", "train", resize=resize)


def test_missing_mask_names_file(tiny_root):
    (tiny_root / "widget" / "ground_truth" / "scratch" / "001_mask.png").unlink()
    with pytest.raises(FileNotFoundError, match="001_mask.png") as excinfo:
        load_mvtec(tiny_root, "widget", "test")
    assert "scratch" in str(excinfo.value)
    # The train split needs no masks and still loads.
    assert len(load_mvtec(tiny_root, "widget", "train").labels) == 3


def test_missing_category_lists_available(tiny_root):
    with pytest.raises(FileNotFoundError) as excinfo:
        load_mvtec(tiny_root, "carpet", "train")
    message = str(excinfo.value)
    assert str(tiny_root / "carpet") in message
    assert "gray, mixed, widget" in message
    assert "README" not in message


def test_missing_root_and_split(tiny_root, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_mvtec(missing, "widget")
    (tiny_root / "only_train" / "train" / "good").mkdir(parents=True)
    _save(tiny_root / "only_train" / "train" / "good" / "000.png", _rgb(4, 4, 0))
    with pytest.raises(FileNotFoundError, match="test"):
        load_mvtec(tiny_root, "only_train", "test")
    with pytest.raises(ValueError, match="split"):
        load_mvtec(tiny_root, "widget", "validation")


def test_empty_split(tiny_root):
    (tiny_root / "empty" / "train" / "good").mkdir(parents=True)
    with pytest.raises(ValueError, match="No images"):
        load_mvtec(tiny_root, "empty", "train")


# --------------------------------------------------------------------------
# Real MVTec AD data (only where it is available)
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_root():
    if not (REAL_ROOT / "bottle").is_dir():
        pytest.skip("MVTec AD bottle data not found at %s" % REAL_ROOT)
    return REAL_ROOT


@pytest.fixture(scope="module")
def real_test_224(real_root):
    # Decoding all 292 full-size images takes several seconds, so the test
    # split is loaded once (downscaled, as the embedded sample is) and shared.
    return load_mvtec(real_root, "bottle", "test", resize=224)


def test_real_bottle_counts_and_sizes(real_root, real_test_224):
    from skpatchad.datasets._mvtec import _collect

    # The train split is only listed (the same code path load_mvtec uses),
    # not decoded, to keep the test suite fast.
    train_paths, train_types, train_masks = _collect(real_root, "bottle", "train")
    assert len(train_paths) == 209
    assert set(train_types) == {"good"} and set(train_masks) == {None}

    test = real_test_224
    assert test.images.shape == (83, 224, 224, 3)
    assert sorted(set(test.defect_types)) == [
        "broken_large",
        "broken_small",
        "contamination",
        "good",
    ]
    assert int((test.defect_types == "good").sum()) == 20
    assert int(test.labels.sum()) == 63
    np.testing.assert_array_equal(
        test.labels, test.masks.reshape(83, -1).any(axis=1).astype(int)
    )
    for f in [str(p) for p in train_paths] + test.filenames:
        with Image.open(f) as im:  # header only
            assert im.size == (900, 900) and im.mode == "RGB"


def test_real_bottle_full_size_subset(real_root, tmp_path):
    # Load a few full-size images through a symlinked copy of the layout to
    # check the native 900x900 shapes without decoding all 292 images.
    src = real_root / "bottle"
    dst = tmp_path / "bottle"
    links = [
        "train/good/000.png",
        "train/good/208.png",
        "test/broken_small/000.png",
        "ground_truth/broken_small/000_mask.png",
        "test/good/000.png",
    ]
    for rel in links:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(src / rel, dst / rel)
    train = load_mvtec(tmp_path, "bottle", "train")
    assert train.images.shape == (2, 900, 900, 3)
    assert train.masks.shape == (2, 900, 900) and not train.masks.any()
    test = load_mvtec(tmp_path, "bottle", "test")
    assert test.images.shape == (2, 900, 900, 3)
    assert test.masks.shape == (2, 900, 900)
    np.testing.assert_array_equal(test.labels, [1, 0])
    assert set(np.unique(test.masks[0])) == {0, 1}


def test_sample_matches_real_data(real_root, real_test_224):
    # The embedded sample is the real data downscaled with the same Pillow
    # resampling as ``load_mvtec(..., resize=224)``.
    sample = load_sample("test")
    real = real_test_224
    index = {
        Path(f).relative_to(real_root).as_posix(): i
        for i, f in enumerate(real.filenames)
    }
    for i, f in enumerate(sample.filenames):
        j = index[Path(f).relative_to(sample_path()).as_posix()]
        np.testing.assert_array_equal(sample.images[i], real.images[j])
        np.testing.assert_array_equal(sample.masks[i], real.masks[j])
        assert sample.labels[i] == real.labels[j]


def test_hidden_files_and_folders_are_ignored(tiny_root):
    cat = tiny_root / "widget"
    (cat / "test" / "good" / "._000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
    _save(cat / "test" / ".ipynb_checkpoints" / "000.png", _rgb(8, 10, 5))
    (tiny_root / ".cache" / "train").mkdir(parents=True)
    data = load_mvtec(tiny_root, "widget", "test")
    assert len(data.labels) == 4 and ".ipynb_checkpoints" not in set(data.defect_types)
    with pytest.raises(FileNotFoundError) as excinfo:
        load_mvtec(tiny_root, "carpet")
    assert ".cache" not in str(excinfo.value)


@pytest.mark.parametrize("split, broken", [("train", "train/good/001.png"), ("test", "ground_truth/crack/000_mask.png")])
def test_unreadable_file_is_named(tiny_root, split, broken):
    path = tiny_root / "widget" / broken
    path.write_bytes(path.read_bytes()[:60])  # truncated: header fine, pixel data cut off
    with pytest.raises(ValueError, match="Cannot read .*%s" % path.name):
        load_mvtec(tiny_root, "widget", split)
    path.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="Cannot read .*%s" % path.name):
        load_mvtec(tiny_root, "widget", split)


def test_mask_extension_in_any_case(tiny_root):
    gt = tiny_root / "widget" / "ground_truth" / "crack"
    (gt / "000_mask.png").rename(gt / "000_mask.PNG")
    data = load_mvtec(tiny_root, "widget", "test")
    assert data.masks[data.defect_types == "crack"].sum() == 16
