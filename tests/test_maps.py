"""Tests for the shared map path (features.maps) and image batching (features.preprocessing)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from skpatchad.features.maps import (_stepwise, align_levels, cell_centres, gaussian_blur, grid_to_maps,
                                    interpolation_matrix, stack_if_same_size)
from skpatchad.features.preprocessing import ImageGeometry, iter_image_batches


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _expected_peak(index, grid_len, geometry_axis, output_len):
    """Pixel index in the original image of the centre of patch ``index`` along one axis.

    ``geometry_axis`` is (resize, crop_offset, input_len).
    """
    resize, offset, input_len = geometry_axis
    centre_in_input = (index + 0.5) * input_len / grid_len  # continuous, pixel edges at integers
    centre_in_resized = centre_in_input + offset
    return centre_in_resized * output_len / resize - 0.5


def _axes(geometry):
    if geometry.crop is None:
        return ((geometry.resize[0], 0, geometry.resize[0]), (geometry.resize[1], 0, geometry.resize[1]))
    top, left, height, width = geometry.crop
    return ((geometry.resize[0], top, height), (geometry.resize[1], left, width))


# ---------------------------------------------------------------------------
# gaussian_blur
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.5, 4.0])
def test_gaussian_blur_matches_scipy(sigma):
    rng = np.random.RandomState(0)
    maps = rng.rand(3, 1, 45, 52).astype(np.float32)
    out = gaussian_blur(torch.from_numpy(maps), sigma)
    assert out.shape == maps.shape and out.dtype == torch.float32
    out = out.numpy()
    radius = int(4 * sigma + 0.5)
    for b in range(3):
        ref = gaussian_filter(maps[b, 0].astype(np.float64), sigma, mode="mirror", truncate=4.0)
        interior = (slice(radius, -radius), slice(radius, -radius))
        np.testing.assert_allclose(out[b, 0][interior], ref[interior], atol=1e-5)
        # reflect padding == scipy "mirror": the borders agree too
        np.testing.assert_allclose(out[b, 0], ref, atol=1e-5)


def test_gaussian_blur_thin_map_reflects_along_long_axis():
    rng = np.random.RandomState(1)
    maps = rng.rand(1, 1, 6, 60).astype(np.float32)  # radius 8 >= height 6, < width 60
    out = gaussian_blur(torch.from_numpy(maps), 2.0)[0, 0].numpy()
    rows = gaussian_filter(maps[0, 0].astype(np.float64), (0, 2.0), mode="mirror", truncate=4.0)
    ref = gaussian_filter(rows, (2.0, 0), mode="nearest", truncate=4.0)
    np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("sigma", [0, 0.0, None, -1.0])
def test_gaussian_blur_no_op(sigma):
    maps = torch.rand(2, 1, 20, 20)
    assert gaussian_blur(maps, sigma) is maps


@pytest.mark.parametrize("shape", [(40, 40), (10, 7), (3, 50)])
def test_gaussian_blur_keeps_constant_map(shape):
    maps = torch.full((2, 1) + shape, 3.25)
    out = gaussian_blur(maps, 4.0)
    assert out.shape == maps.shape
    torch.testing.assert_close(out, maps, rtol=1e-6, atol=1e-6)


def test_gaussian_blur_kernel_normalised_and_symmetric():
    maps = torch.zeros(1, 1, 61, 61)
    maps[0, 0, 30, 30] = 1.0
    out = gaussian_blur(maps, 3.0)[0, 0]
    assert abs(float(out.sum()) - 1.0) < 1e-5  # mass preserved away from borders
    assert tuple(np.unravel_index(int(out.argmax()), out.shape)) == (30, 30)
    torch.testing.assert_close(out, out.flip(0))
    torch.testing.assert_close(out, out.T)


# ---------------------------------------------------------------------------
# grid_to_maps
# ---------------------------------------------------------------------------


def test_grid_to_maps_sizes_and_dtype_for_mixed_sizes():
    geometry = ImageGeometry(64)
    grids = torch.rand(4, 8, 8, dtype=torch.float64)
    sizes = [(100, 80), (64, 64), (100, 80), (30, 200)]
    maps = grid_to_maps(grids, geometry, sizes, sigma=4.0)
    assert isinstance(maps, list) and len(maps) == 4
    for m, size in zip(maps, sizes):
        assert isinstance(m, np.ndarray) and m.dtype == np.float32 and m.shape == size
    # each image's map does not depend on the others in the batch
    for i, size in enumerate(sizes):
        alone = grid_to_maps(grids[i:i + 1], geometry, [size], sigma=4.0)[0]
        np.testing.assert_allclose(maps[i], alone, rtol=1e-6, atol=1e-6)


def test_grid_to_maps_values_stay_in_grid_range():
    geometry = ImageGeometry((80, 96), (64, 64))
    grids = torch.rand(2, 7, 9)
    for m in grid_to_maps(grids, geometry, [(120, 50), (33, 210)], sigma=2.0):
        assert m.min() >= float(grids.min()) - 1e-6 and m.max() <= float(grids.max()) + 1e-6


@pytest.mark.parametrize("crop", [None, 48])
def test_constant_grid_gives_constant_map(crop):
    geometry = ImageGeometry(64, crop)
    grids = torch.full((2, 6, 6), 2.5)
    for m in grid_to_maps(grids, geometry, [(90, 70), (20, 300)], sigma=4.0):
        np.testing.assert_allclose(m, 2.5, rtol=1e-6)


@pytest.mark.parametrize("sigma", [0.0, 4.0])
@pytest.mark.parametrize(
    "image_size, crop_size, patch, output_size",
    [
        (64, None, (2, 5), (128, 96)),
        ((64, 96), None, (6, 1), (64, 96)),
        (80, 64, (1, 6), (160, 120)),
        ((256, 256), (224, 224), (20, 3), (900, 700)),
    ],
)
def test_hot_patch_peaks_at_its_location(image_size, crop_size, patch, output_size, sigma):
    geometry = ImageGeometry(image_size, crop_size)
    grid_shape = (28, 28) if geometry.input_size[0] >= 224 else (8, 8)
    grids = torch.zeros((1,) + grid_shape)
    grids[0, patch[0], patch[1]] = 1.0
    m = grid_to_maps(grids, geometry, [output_size], sigma=sigma)[0]
    assert m.shape == output_size
    peak = np.unravel_index(int(np.argmax(m)), m.shape)
    axes = _axes(geometry)
    for axis in range(2):
        expected = _expected_peak(patch[axis], grid_shape[axis], axes[axis], output_size[axis])
        # the peak is a plateau one input pixel wide: allow one input pixel in output units
        tolerance = max(1.0, output_size[axis] / axes[axis][0])
        assert abs(peak[axis] - expected) <= tolerance, (axis, peak, expected)
    if sigma > 0:
        return  # near the crop border the blur's tail is extended into the margin
    # without blur the bump is symmetric: its centre of mass is at the patch centre too
    for axis in range(2):
        profile = m.sum(axis=1 - axis)
        centre = (profile * np.arange(len(profile))).sum() / profile.sum()
        expected = _expected_peak(patch[axis], grid_shape[axis], axes[axis], output_size[axis])
        assert abs(centre - expected) <= max(1.0, output_size[axis] / axes[axis][0]), (axis, centre)


def test_crop_margin_extends_border_values():
    geometry = ImageGeometry(64, 48)  # crop (8, 8, 48, 48)
    grids = torch.rand(1, 6, 6)
    m = grid_to_maps(grids, geometry, [(64, 64)], sigma=1.0)[0]  # output at the resized size
    top, left, height, width = geometry.crop
    for row in range(top):
        np.testing.assert_array_equal(m[row], m[top])
    for row in range(top + height, 64):
        np.testing.assert_array_equal(m[row], m[top + height - 1])
    for col in range(left):
        np.testing.assert_array_equal(m[:, col], m[:, left])
    # inside the crop: the blurred, upsampled grid itself
    inner = F.interpolate(grids[None], size=(48, 48), mode="bilinear", align_corners=False)
    inner = gaussian_blur(inner, 1.0)[0, 0].numpy()
    np.testing.assert_allclose(m[top:top + height, left:left + width], inner, rtol=1e-6, atol=1e-6)


def test_no_blur_no_crop_at_input_size_is_bilinear_upsampling():
    geometry = ImageGeometry((32, 48))
    grids = torch.rand(2, 4, 6)
    maps = grid_to_maps(grids, geometry, [(32, 48), (32, 48)], sigma=0)
    expected = F.interpolate(grids[:, None], size=(32, 48), mode="bilinear", align_corners=False)
    for m, e in zip(maps, expected[:, 0].numpy()):
        np.testing.assert_allclose(m, e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sigma", [0.0, 1.5, 4.0])
@pytest.mark.parametrize(
    "image_size, crop_size, grid_shape, sizes",
    [
        (64, None, (8, 8), [(100, 80), (64, 64), (30, 200)]),
        ((80, 96), (64, 64), (7, 9), [(120, 50), (80, 96)]),
        (256, 224, (28, 28), [(900, 900)]),
        (32, None, (2, 3), [(17, 300)]),  # blur radius beyond the axis: replicate
    ],
)
@pytest.mark.parametrize("alignment", ["even", "corner"])
def test_operator_path_equals_stepwise_path(image_size, crop_size, grid_shape, sizes, sigma, alignment):
    """The one-matrix-per-axis map path computes the same maps as stepping through it."""
    geometry = ImageGeometry(image_size, crop_size)
    grids = torch.rand((len(sizes),) + grid_shape, generator=torch.Generator().manual_seed(0))
    maps = grid_to_maps(grids, geometry, sizes, sigma=sigma, alignment=alignment)
    for i, size in enumerate(sizes):
        expected = _stepwise(grids[i:i + 1], geometry, size, sigma, alignment)[0].numpy()
        # float32 rounding of the two orders of summation (grid values in [0, 1])
        np.testing.assert_allclose(maps[i], expected, rtol=1e-5, atol=3e-6)


# ---------------------------------------------------------------------------
# where a backbone's cells sit on its input
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("n_cells, length", [(8, 64), (13, 100), (7, 100), (3, 17), (32, 256)])
def test_cell_centres(n_cells, length):
    even = cell_centres(n_cells, length, "even").numpy()
    np.testing.assert_allclose(even, (np.arange(n_cells) + 0.5) * length / n_cells - 0.5)
    corner = cell_centres(n_cells, length, "corner").numpy()
    stride = corner[1] - corner[0]
    assert corner[0] == 0 and stride in (4, 8, 16) and -(-length // stride) == n_cells
    with pytest.raises(ValueError, match="alignment"):
        cell_centres(n_cells, length, "centre")


def test_interpolation_matrix_is_linear_interpolation_with_border_extension():
    source = torch.tensor([0.0, 8.0, 16.0])
    matrix = interpolation_matrix(source, torch.tensor([-3.0, 0.0, 2.0, 8.0, 12.0, 16.0, 20.0]))
    expected = [[1, 0, 0], [1, 0, 0], [0.75, 0.25, 0], [0, 1, 0], [0, 0.5, 0.5], [0, 0, 1], [0, 0, 1]]
    np.testing.assert_allclose(matrix.numpy(), expected)
    np.testing.assert_allclose(interpolation_matrix(torch.tensor([5.0]), torch.arange(4.0)).numpy(), np.ones((4, 1)))


def test_even_alignment_is_bilinear_resizing():
    # the generic position-based path agrees with F.interpolate(align_corners=False)
    grid = torch.rand(1, 1, 5, 7, dtype=torch.float64)
    rows = interpolation_matrix(cell_centres(5, 40, "even"), torch.arange(40.0))
    cols = interpolation_matrix(cell_centres(7, 56, "even"), torch.arange(56.0))
    expected = F.interpolate(grid, size=(40, 56), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(rows @ grid[0, 0] @ cols.T, expected)


def test_corner_aligned_hot_cell_peaks_at_stride_times_index():
    geometry = ImageGeometry(64)
    grids = torch.zeros(1, 8, 8)
    grids[0, 2, 5] = 1.0
    even = grid_to_maps(grids, geometry, [(64, 64)], sigma=0.0)[0]
    corner = grid_to_maps(grids, geometry, [(64, 64)], sigma=0.0, alignment="corner")[0]
    assert np.unravel_index(int(np.argmax(corner)), corner.shape) == (16, 40)  # cell (i, j) at (8 i, 8 j)
    assert corner[16, 40] == pytest.approx(1.0)
    # the even layout puts the same cell 3.5 pixels further down and right
    assert np.unravel_index(int(np.argmax(even)), even.shape) in {(r, c) for r in (19, 20) for c in (43, 44)}


def test_align_levels_reads_coarse_cells_at_the_fine_cells_positions():
    # a coarse level that is linear in input position must come out linear in the
    # fine cells' positions, for either layout
    for alignment, input_len in (("even", 64), ("corner", 64), ("corner", 100)):
        fine_n, coarse_n = -(-input_len // 8), -(-input_len // 16)
        coarse_pos = cell_centres(coarse_n, input_len, alignment).float()
        fine_pos = cell_centres(fine_n, input_len, alignment).float()
        coarse = (coarse_pos[:, None] + 0 * coarse_pos[None, :]).expand(coarse_n, coarse_n)[None, None]
        fine = torch.zeros(1, 1, fine_n, fine_n)
        _, resampled = align_levels([fine, coarse], alignment, (input_len, input_len))
        inside = (fine_pos >= coarse_pos[0]) & (fine_pos <= coarse_pos[-1])
        torch.testing.assert_close(resampled[0, 0, inside, 0], fine_pos[inside])
        assert resampled.shape[-2:] == (fine_n, fine_n)


def test_out_is_filled_in_place_on_both_paths():
    for grid_shape in [(8, 8), (128, 128)]:  # operator path and the dense stepwise path
        geometry = ImageGeometry(128)
        grids = torch.rand((2,) + grid_shape)
        out = np.full((2, 50, 70), np.nan, dtype=np.float32)
        maps = grid_to_maps(grids, geometry, [(50, 70)] * 2, sigma=2.0, out=out)
        expected = _stepwise(grids, geometry, (50, 70), 2.0).numpy()
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
        for m, o in zip(maps, out):
            np.testing.assert_array_equal(m, o)


def test_stack_if_same_size():
    same = [np.full((4, 5), i, np.float32) for i in range(3)]
    stacked = stack_if_same_size(same)
    assert isinstance(stacked, np.ndarray) and stacked.shape == (3, 4, 5)
    np.testing.assert_array_equal(stacked[:, 0, 0], [0, 1, 2])
    mixed = [np.zeros((4, 5)), np.zeros((5, 4))]
    assert stack_if_same_size(mixed) is mixed
    assert stack_if_same_size([]) == []


# ---------------------------------------------------------------------------
# ImageGeometry
# ---------------------------------------------------------------------------


def test_image_geometry_sizes():
    g = ImageGeometry(256, 224)
    assert g.resize == (256, 256)
    assert g.crop == (16, 16, 224, 224)
    assert g.input_size == (224, 224)
    g = ImageGeometry((100, 81), (50, 40))
    assert g.crop == (25, 20, 50, 40)  # floor((100-50)/2), floor((81-40)/2)
    assert g.input_size == (50, 40)
    g = ImageGeometry(np.int64(64))
    assert g.resize == (64, 64) and g.crop is None and g.input_size == (64, 64)
    g = ImageGeometry([32, 48], (32, 48))  # crop equal to the image: allowed
    assert g.crop == (0, 0, 32, 48) and g.input_size == (32, 48)


@pytest.mark.parametrize(
    "image_size, crop_size, match",
    [
        (224, 256, "larger than image_size"),
        ((256, 200), (224, 224), "larger than image_size"),
        (15, None, "at least 16"),
        ((64, 8), None, "at least 16"),
        (64, 8, "at least 16"),
        (0, None, "at least 16"),
        (-32, None, "at least 16"),
        (True, None, "int or a"),
        (224.0, None, "int or a"),
        ("224", None, "image_size"),
        ((1, 2, 3), None, "int or a"),
        (None, None, "int or a"),
        (64, "big", "crop_size"),
        # pairs of floats were truncated: (63.9, 63.9) became (63, 63)
        ((63.9, 63.9), None, "pair of ints"),
        ((64, 64.0), None, "pair of ints"),
        ((True, 64), None, "pair of ints"),
        (64, (47.5, 48), "crop_size"),
        ((64,), None, "pair of ints"),
    ],
)
def test_image_geometry_errors(image_size, crop_size, match):
    with pytest.raises(ValueError, match=match):
        ImageGeometry(image_size, crop_size)


def test_image_geometry_accepts_numpy_integers():
    geometry = ImageGeometry(np.int64(64), np.array([48, 32]))
    assert geometry.resize == (64, 64) and geometry.input_size == (48, 32)
    assert geometry.crop_margins() == ((0.125, 0.125), (0.25, 0.25))


def test_image_geometry_apply():
    g = ImageGeometry(32, 16)
    batch = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    out = g.apply(batch)
    torch.testing.assert_close(out, batch[:, :, 8:24, 8:24])  # no resize needed: exact crop
    assert ImageGeometry(32).apply(batch) is batch
    resized = ImageGeometry((20, 40)).apply(torch.rand(1, 3, 64, 50))
    assert resized.shape == (1, 3, 20, 40)


# ---------------------------------------------------------------------------
# iter_image_batches
# ---------------------------------------------------------------------------


def test_iter_image_batches_mixed_sizes_and_dtypes():
    rng = np.random.RandomState(0)
    images = [
        rng.randint(0, 256, (100, 80, 3)).astype(np.uint8),
        rng.rand(30, 50, 3).astype(np.float32),
        rng.randint(0, 256, (100, 80, 3)).astype(np.uint8),
        rng.randint(0, 256, (64, 64, 3)).astype(np.uint8),
        (rng.rand(64, 64, 3) > 0.5).astype(np.float32),  # hard 0/1 edges: no overshoot
    ]
    geometry = ImageGeometry(64, 48)
    batches = list(iter_image_batches(images, geometry, batch_size=2, device="cpu"))
    assert [start for start, _ in batches] == [0, 2, 4]
    assert [len(b) for _, b in batches] == [2, 2, 1]
    for _, batch in batches:
        assert isinstance(batch, torch.Tensor) and batch.dtype == torch.float32
        assert batch.shape[1:] == (3, 48, 48)
        assert float(batch.min()) >= -1e-6 and float(batch.max()) <= 1 + 1e-6
    # each image is processed as if alone
    flat = torch.cat([b for _, b in batches])
    for i, image in enumerate(images):
        (_, alone), = iter_image_batches([image], geometry, batch_size=1, device="cpu")
        torch.testing.assert_close(flat[i:i + 1], alone, rtol=1e-6, atol=1e-6)


def test_iter_image_batches_scales_uint8_by_255_without_resize():
    rng = np.random.RandomState(1)
    u8 = rng.randint(0, 256, (3, 32, 40, 3)).astype(np.uint8)
    f32 = rng.rand(32, 40, 3).astype(np.float32)
    geometry = ImageGeometry((32, 40))  # already the right size: pure conversion
    batches = list(iter_image_batches(list(u8) + [f32], geometry, batch_size=10, device="cpu"))
    assert len(batches) == 1
    start, batch = batches[0]
    assert start == 0 and batch.shape == (4, 3, 32, 40)
    expected = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255.0
    torch.testing.assert_close(batch[:3], expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(batch[3], torch.from_numpy(f32).permute(2, 0, 1), rtol=0, atol=0)
    assert float(batch[:3].max()) <= 1.0 and float(batch[:3].min()) >= 0.0


def test_iter_image_batches_uint8_and_float_agree_after_resize():
    rng = np.random.RandomState(2)
    u8 = rng.randint(0, 256, (50, 70, 3)).astype(np.uint8)
    geometry = ImageGeometry(32, 24)
    (_, a), = iter_image_batches([u8], geometry, 4, "cpu")
    (_, b), = iter_image_batches([u8.astype(np.float32) / 255.0], geometry, 4, "cpu")
    # uint8 images are resized in uint8 (10x faster): at most one grey level apart
    torch.testing.assert_close(a, b, rtol=0, atol=1.0 / 255)


def test_iter_image_batches_batch_size_at_least_one():
    images = [np.zeros((16, 16, 3), np.uint8)] * 3
    batches = list(iter_image_batches(images, ImageGeometry(16), batch_size=0, device="cpu"))
    assert [start for start, _ in batches] == [0, 1, 2]
    assert list(iter_image_batches([], ImageGeometry(16), 2, "cpu")) == []
