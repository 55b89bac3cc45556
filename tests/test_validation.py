"""Tests for skpatchad.utils.check_images, the one input-validation path."""

import pathlib
import re

import numpy as np
import pytest
from PIL import Image

from skpatchad.utils import ImageList, check_images, image_sizes, read_image


def _rgb(rng, shape=(20, 24, 3)):
    return rng.randint(0, 256, size=shape).astype(np.uint8)


@pytest.fixture
def rng():
    return np.random.RandomState(0)


def _check_output(images, n, dtype=None):
    # image files come back as a lazily decoded ImageList; materialise it
    assert isinstance(images, (list, ImageList, np.ndarray))
    images = list(images)
    assert len(images) == n
    for image in images:
        assert isinstance(image, np.ndarray)
        assert image.ndim == 3 and image.shape[2] == 3
        assert image.dtype in (np.uint8, np.float32)
        if dtype is not None:
            assert image.dtype == dtype


def _raises(exc, *patterns):
    """pytest.raises whose message must contain all regex patterns (any order)."""
    pattern = "".join("(?=.*%s)" % p for p in patterns)
    return pytest.raises(exc, match=re.compile(pattern, re.S))


# ---------------------------------------------------------------------------
# Accepted inputs: arrays
# ---------------------------------------------------------------------------


def test_uint8_nhwc_array_passes_through_unchanged(rng):
    X = _rgb(rng, (4, 20, 24, 3))
    images = check_images(X)
    assert images is X  # no copy when nothing must change: batches slice the input
    _check_output(list(images), 4, np.uint8)


def test_float_nhwc_array_in_unit_range(rng):
    X = rng.rand(3, 16, 18, 3)  # float64
    images = check_images(X)
    _check_output(images, 3, np.float32)
    for image, original in zip(images, X):
        np.testing.assert_allclose(image, original, rtol=1e-6)


def test_float_boundaries_zero_and_one_accepted():
    X = np.zeros((2, 16, 16, 3), dtype=np.float32)
    X[1] = 1.0
    images = check_images(X)
    assert images[0].max() == 0.0 and images[1].min() == 1.0


def test_nhw_grayscale_array_replicated_to_three_channels(rng):
    X = rng.randint(0, 256, size=(2, 17, 19)).astype(np.uint8)
    images = check_images(X)
    _check_output(images, 2, np.uint8)
    for image, original in zip(images, X):
        assert image.shape == (17, 19, 3)
        for c in range(3):
            np.testing.assert_array_equal(image[:, :, c], original)


def test_single_channel_nhwc_array(rng):
    X = rng.rand(2, 16, 16, 1).astype(np.float32)
    images = check_images(X)
    _check_output(images, 2, np.float32)
    for image, original in zip(images, X):
        np.testing.assert_array_equal(image, np.repeat(original, 3, axis=2))


def test_rgba_alpha_channel_dropped(rng):
    X = _rgb(rng, (2, 16, 20, 4))
    images = check_images(X)
    _check_output(images, 2, np.uint8)
    for image, original in zip(images, X):
        np.testing.assert_array_equal(image, original[:, :, :3])


def test_uint16_array_scaled_to_unit_float(rng):
    X = rng.randint(0, 65536, size=(2, 16, 16, 3)).astype(np.uint16)
    X[0, 0, 0, 0], X[0, 0, 0, 1] = 0, 65535
    images = check_images(X)
    _check_output(images, 2, np.float32)
    np.testing.assert_allclose(images[0], X[0] / 65535.0, rtol=1e-6)
    assert images[0][0, 0, 0] == 0.0 and images[0][0, 0, 1] == 1.0


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.int64, np.uint32])
def test_other_integer_dtypes_in_8bit_range_become_uint8(rng, dtype):
    X = rng.randint(0, 256, size=(1, 16, 16, 3)).astype(dtype)
    images = check_images(X)
    _check_output(images, 1, np.uint8)
    np.testing.assert_array_equal(images[0], X[0])


def test_list_of_arrays_with_different_sizes_and_dtypes(rng):
    items = [
        _rgb(rng, (16, 16, 3)),
        rng.rand(40, 30).astype(np.float64),  # grayscale float
        _rgb(rng, (25, 17, 4)),  # RGBA
        rng.randint(0, 65536, size=(18, 22, 1)).astype(np.uint16),
    ]
    images = check_images(items)
    _check_output(images, 4)
    assert image_sizes(images) == [(16, 16), (40, 30), (25, 17), (18, 22)]
    assert [im.dtype for im in images] == [np.uint8, np.float32, np.uint8, np.float32]
    np.testing.assert_array_equal(images[0], items[0])
    np.testing.assert_allclose(images[1][:, :, 2], items[1], rtol=1e-6)
    np.testing.assert_array_equal(images[2], items[2][:, :, :3])
    np.testing.assert_allclose(images[3][:, :, 0], items[3][:, :, 0] / 65535.0, rtol=1e-6)


def test_tuple_and_nested_lists_accepted(rng):
    a = _rgb(rng, (16, 16, 3))
    images = check_images((a, a.tolist()))
    _check_output(images, 2)
    np.testing.assert_array_equal(images[1], a)


def test_min_size_is_inclusive_and_configurable(rng):
    check_images([_rgb(rng, (16, 16, 3))])
    check_images([_rgb(rng, (4, 5, 3))], min_size=4)
    with _raises(ValueError, "image 0", "4x5", "too small"):
        check_images([_rgb(rng, (4, 5, 3))], min_size=5)


# ---------------------------------------------------------------------------
# Accepted inputs: files
# ---------------------------------------------------------------------------


@pytest.fixture
def png_files(tmp_path, rng):
    rgb = _rgb(rng, (20, 24, 3))
    gray = rng.randint(0, 256, size=(18, 16)).astype(np.uint8)
    rgba = _rgb(rng, (16, 17, 4))
    palette_source = _rgb(rng, (16, 16, 3)) // 64 * 64  # few colours: exact palette
    gray16 = rng.randint(0, 65536, size=(17, 19)).astype(np.uint16)
    files = {
        "rgb": tmp_path / "rgb.png",
        "gray": tmp_path / "gray.png",
        "rgba": tmp_path / "rgba.png",
        "palette": tmp_path / "palette.png",
        "gray16": tmp_path / "gray16.png",
    }
    Image.fromarray(rgb, "RGB").save(files["rgb"])
    Image.fromarray(gray, "L").save(files["gray"])
    Image.fromarray(rgba, "RGBA").save(files["rgba"])
    palette = Image.fromarray(palette_source, "RGB").convert("P", palette=Image.ADAPTIVE, colors=64)
    assert palette.mode == "P"
    palette.save(files["palette"])
    Image.fromarray(gray16).save(files["gray16"])
    assert Image.open(files["gray16"]).mode == "I;16"
    expected = {
        "rgb": rgb,
        "gray": np.repeat(gray[:, :, None], 3, axis=2),
        "rgba": rgba[:, :, :3],
        "palette": np.asarray(palette.convert("RGB")),
        "gray16": np.repeat(gray16[:, :, None] / 65535.0, 3, axis=2),
    }
    return files, expected


@pytest.mark.parametrize("kind", ["rgb", "gray", "rgba", "palette", "gray16"])
@pytest.mark.parametrize("as_str", [True, False])
def test_read_png_modes(png_files, kind, as_str):
    files, expected = png_files
    path = str(files[kind]) if as_str else pathlib.Path(files[kind])
    images = check_images([path])
    _check_output(images, 1)
    if kind == "gray16":
        assert images[0].dtype == np.float32
        np.testing.assert_allclose(images[0], expected[kind], rtol=1e-6)
    else:
        assert images[0].dtype == np.uint8
        np.testing.assert_array_equal(images[0], expected[kind])


def test_palette_png_quantised_colours_exact(png_files):
    files, expected = png_files
    # the source image had only multiples of 64, so the palette holds them exactly
    image = check_images([files["palette"]])[0]
    assert set(np.unique(image)) <= {0, 64, 128, 192}


def test_mixed_list_of_arrays_and_paths(png_files, rng):
    files, expected = png_files
    array = rng.rand(30, 20, 3).astype(np.float32)
    images = check_images([files["rgb"], array, str(files["gray16"]), files["rgba"]])
    _check_output(images, 4)
    np.testing.assert_array_equal(images[0], expected["rgb"])
    np.testing.assert_array_equal(images[1], array)
    np.testing.assert_allclose(images[2], expected["gray16"], rtol=1e-6)
    np.testing.assert_array_equal(images[3], expected["rgba"])


def test_object_array_of_paths(png_files):
    files, expected = png_files
    X = np.array([str(files["rgb"]), str(files["gray"])], dtype=object)
    images = check_images(X)
    np.testing.assert_array_equal(images[0], expected["rgb"])
    np.testing.assert_array_equal(images[1], expected["gray"])


def test_numpy_string_array_of_paths(png_files):
    # np.array(list_of_paths) is a '<U..' array, e.g. what cross_val_score indexes
    files, expected = png_files
    images = check_images(np.array([str(files["rgb"]), str(files["gray"])]))
    np.testing.assert_array_equal(images[0], expected["rgb"])
    np.testing.assert_array_equal(images[1], expected["gray"])


def test_float_tiff_read_as_float_not_black(tmp_path, rng):
    # mode "F" converted to RGB truncates [0, 1] to 0: a silently black image
    values = rng.rand(20, 24).astype(np.float32)
    path = tmp_path / "float.tiff"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "F"
    image = check_images([path])[0]
    assert image.dtype == np.float32
    np.testing.assert_array_equal(image[:, :, 0], values)
    np.testing.assert_array_equal(image[:, :, 2], values)
    Image.fromarray(values * 255).save(path)
    with _raises(ValueError, "image 0", r"\[0, 1\]"):
        list(check_images([path]))


@pytest.mark.parametrize("orientation, turn", [(1, 0), (3, 2), (6, -1), (8, 1)])
def test_exif_orientation_applied_to_files(tmp_path, orientation, turn):
    # a phone photo stored 20x40 with "rotate 90" in its EXIF is shown 40x20:
    # maps and masks drawn on the shown image must line up with it
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:6, :10] = 255
    pil = Image.fromarray(stored)
    exif = pil.getexif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.png"
    pil.save(path, exif=exif)
    upright = np.rot90(stored, turn)
    images = check_images([path])
    assert image_sizes(images) == [upright.shape[:2]]  # from the header, before decoding
    np.testing.assert_array_equal(images[0], upright)


def test_big_endian_uint16_array(rng):
    values = rng.randint(0, 65536, size=(2, 20, 24)).astype(np.uint16)
    images = check_images(values.astype(">u2"))
    np.testing.assert_allclose(images[1][:, :, 0], values[1] / 65535.0)


def test_read_image_returns_raw_uint16(png_files):
    files, expected = png_files
    raw = read_image(files["gray16"])
    assert raw.dtype == np.uint16
    np.testing.assert_allclose(raw / 65535.0, expected["gray16"][:, :, 0])


def test_32bit_integer_file_in_16bit_range_read_as_uint16(tmp_path):
    values = np.arange(20 * 20, dtype=np.int32).reshape(20, 20) * 100  # up to 39900
    path = tmp_path / "int32.tif"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I"
    image = check_images([path])[0]
    np.testing.assert_allclose(image[:, :, 0], values / 65535.0, rtol=1e-6)


@pytest.mark.parametrize("value", [70000, -5])
def test_32bit_integer_file_outside_16bit_range_rejected(tmp_path, rng, value):
    # used to wrap around silently when cast to uint16
    values = np.full((20, 20), value, dtype=np.int32)
    path = tmp_path / "int32.tif"
    Image.fromarray(values).save(path)
    with _raises(ValueError, "image 1", str(value)):
        list(check_images([_rgb(rng), path]))  # decoded lazily: fails on access


# ---------------------------------------------------------------------------
# Rejections
# ---------------------------------------------------------------------------


def test_none_rejected():
    with _raises(ValueError, "X is None"):
        check_images(None)


@pytest.mark.parametrize(
    "X", [np.empty((0, 16, 16, 3), np.uint8), np.empty((0, 16, 16), np.uint8), [], ()],
    ids=["empty-4d", "empty-3d", "empty-list", "empty-tuple"],
)
def test_empty_rejected(X):
    with _raises(ValueError, "empty"):
        check_images(X)


def test_empty_1d_array_rejected():
    with _raises(ValueError, "shape"):
        check_images(np.array([]))


@pytest.mark.parametrize("shape", [(16, 16), (2, 16, 16, 3, 1), (5,)])
def test_wrong_ndim_array_rejected(shape):
    with _raises(ValueError, r"\(N, H, W\)", re.escape(str(shape))):
        check_images(np.zeros(shape, dtype=np.uint8))


@pytest.mark.parametrize("ndim_shape", [(16,), (2, 16, 16, 3)])
def test_wrong_ndim_item_in_list_rejected(rng, ndim_shape):
    with _raises(ValueError, "image 1", "2-D", re.escape(str(ndim_shape))):
        check_images([_rgb(rng), np.zeros(ndim_shape, np.uint8)])


@pytest.mark.parametrize("channels", [2, 5])
def test_bad_channel_count_rejected(rng, channels):
    X = [_rgb(rng), _rgb(rng), np.zeros((16, 16, channels), np.uint8)]
    with _raises(ValueError, "image 2", "channel count", "got %d" % channels):
        check_images(X)


@pytest.mark.parametrize("channels", [2, 5])
def test_bad_channel_count_in_4d_array_rejected(channels):
    with _raises(ValueError, "image 0", "channel count"):
        check_images(np.zeros((3, 16, 16, channels), np.uint8))


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_channels_first_hint(channels):
    with _raises(ValueError, "image 0", "channels-first", r"\(H, W, C\)"):
        check_images(np.zeros((2, channels, 32, 32), np.uint8))
    with _raises(ValueError, "image 1", "channels-first"):
        check_images([np.zeros((32, 32, 3), np.uint8), np.zeros((channels, 32, 32), np.float32)])


def test_no_channels_first_hint_for_plain_bad_channels():
    with pytest.raises(ValueError) as info:
        check_images(np.zeros((2, 16, 16, 5), np.uint8))
    assert "channels-first" not in str(info.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_float_rejected(rng, bad):
    image = rng.rand(16, 16, 3)
    image[3, 4, 1] = bad
    with _raises(ValueError, "image 1", "NaN or infinite"):
        check_images([rng.rand(16, 16, 3), image])


@pytest.mark.parametrize("lo, hi", [(-0.1, 0.5), (0.0, 1.5), (0.0, 255.0)])
def test_float_outside_unit_range_rejected(lo, hi):
    image = np.full((16, 16, 3), 0.5, np.float32)
    image[0, 0, 0], image[1, 1, 1] = lo, hi
    with _raises(ValueError, "image 0", r"\[0, 1\]", "divide by 255"):
        check_images(image[None])


@pytest.mark.parametrize("dtype, value", [(np.int16, -1), (np.int32, 256), (np.int64, 1000)])
def test_integer_outside_8bit_range_rejected(rng, dtype, value):
    image = rng.randint(0, 256, size=(16, 16, 3)).astype(dtype)
    image[5, 5, 0] = value
    with _raises(ValueError, "image 2", r"\[0, 255\]", str(value)):
        check_images([_rgb(rng), _rgb(rng), image])


def test_bool_array_rejected():
    with _raises(TypeError, "image 0", "boolean", "mask"):
        check_images(np.zeros((2, 16, 16), dtype=bool))


def test_complex_dtype_rejected():
    with _raises(TypeError, "image 0", "dtype"):
        check_images(np.zeros((1, 16, 16, 3), dtype=np.complex64))


@pytest.mark.parametrize(
    "item, name",
    [(None, "NoneType"), (3, "int"), (2.5, "float"), ({"a": 1}, "dict"), (object(), "object"),
     (b"bytes", "bytes")],
    ids=["None", "int", "float", "dict", "object", "bytes"],
)
def test_garbage_items_rejected(rng, item, name):
    with _raises(TypeError, "image 1", name):
        check_images([_rgb(rng), item])


def test_object_array_item_rejected(rng):
    item = np.array([None, 1, "a"], dtype=object)
    with _raises(TypeError, "image 1", "object array"):
        check_images([_rgb(rng), item])


def test_ragged_nested_list_item_rejected(rng):
    with _raises(TypeError, "image 0", "converted"):
        check_images([[[0, 1], [2]]])


@pytest.mark.parametrize("X", [5, 3.0, object()], ids=["int", "float", "object"])
def test_non_collection_X_rejected(X):
    with _raises(TypeError, "X must be"):
        check_images(X)


def test_missing_file_rejected(tmp_path, rng):
    missing = tmp_path / "does_not_exist.png"
    with _raises(ValueError, "image 1", "not found", "does_not_exist"):
        check_images([_rgb(rng), missing])


def test_directory_instead_of_file_rejected(tmp_path):
    with _raises(ValueError, "image 0", "not found"):
        check_images([tmp_path])


@pytest.mark.parametrize("content", [b"this is not a png" * 10, b""], ids=["garbage", "empty"])
def test_unreadable_file_rejected(tmp_path, rng, content):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with _raises(ValueError, "image 1", "cannot read", "broken.png"):
        check_images([_rgb(rng), str(path)])


def test_truncated_png_rejected(tmp_path, rng):
    good = tmp_path / "good.png"
    Image.fromarray(_rgb(rng, (64, 64, 3))).save(good)
    data = good.read_bytes()
    path = tmp_path / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    with _raises(ValueError, "image 0", "cannot read", "truncated.png"):
        list(check_images([path, good]))  # decoded lazily: fails on access


def test_too_small_image_rejected(rng):
    with _raises(ValueError, "image 1", "15x20", "too small", "MyEstimator", "16x16"):
        check_images([_rgb(rng), _rgb(rng, (15, 20, 3))], estimator_name="MyEstimator")
    with _raises(ValueError, "image 0", "20x3"):
        check_images([_rgb(rng, (20, 3, 3))])


def test_too_small_file_rejected(tmp_path, rng):
    path = tmp_path / "tiny.png"
    Image.fromarray(_rgb(rng, (8, 8, 3))).save(path)
    with _raises(ValueError, "image 0", "8x8", "too small"):
        check_images([path])


@pytest.mark.parametrize("as_path", [False, True])
def test_single_path_instead_of_list_rejected(tmp_path, rng, as_path):
    path = tmp_path / "one.png"
    Image.fromarray(_rgb(rng)).save(path)
    X = path if as_path else str(path)
    with _raises(TypeError, "single path", r"wrap it in a list"):
        check_images(X)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_single_image_as_X_suggests_newaxis(rng, channels):
    image = _rgb(rng, (32, 40, channels))
    with _raises(ValueError, re.escape("X[np.newaxis]"), "single"):
        check_images(image)
    # and the suggestion works
    assert len(check_images(image[np.newaxis])) == 1


def test_no_torch_exception_leaks(tmp_path, rng):
    """Every failure is a ValueError or TypeError, never a torch/PIL internal error."""
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    bad_inputs = [
        None, [], np.zeros((16, 16)), np.zeros((1, 16, 16, 2)), np.zeros((1, 3, 16, 16)),
        np.full((1, 16, 16), np.nan), np.full((1, 16, 16), 2.0), np.full((1, 16, 16), 300),
        np.zeros((1, 16, 16), bool), [None], [1], [{}], [tmp_path / "missing.png"], [garbage],
        [np.zeros((4, 4, 3))], "x.png", np.zeros((32, 32, 3), np.uint8), 7,
        [np.zeros((16, 16, 3), np.complex128)], [[[1, 2], [3]]],
    ]
    for X in bad_inputs:
        with pytest.raises((ValueError, TypeError)) as info:
            check_images(X)
        assert type(info.value) in (ValueError, TypeError), (X, info.value)
        assert type(info.value).__module__ == "builtins"


@pytest.mark.parametrize("kind", ["set", "frozenset", "dict"])
def test_unordered_collection_rejected(tmp_path, rng, kind):
    # scores come back in input order; a set or dict of paths has none to keep
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / ("%d.png" % i)))
        Image.fromarray(_rgb(rng)).save(paths[-1])
    X = {"set": set, "frozenset": frozenset, "dict": dict.fromkeys}[kind](paths)
    with _raises(TypeError, "ordered", type(X).__name__, "sorted"):
        check_images(X)
    assert len(check_images(sorted(X))) == 3
