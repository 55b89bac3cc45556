"""Tiling of large images: tile layout, seam-free stitching, and TiledDetector end to end."""

import pickle

import numpy as np
import pytest
import torch.nn.functional as F
import torch
from sklearn.base import clone

from skpatchad import PatchCore, TiledDetector
from skpatchad.features.maps import stitch_tiles, tile_boxes, tile_starts
from skpatchad.metrics import pixel_auroc


@pytest.mark.parametrize("length, tile, overlap", [(2048, 256, 0.25), (1000, 256, 0.0), (300, 256, 0.5),
                                                   (256, 256, 0.25), (100, 256, 0.25), (777, 96, 0.3)])
def test_tile_starts_cover_the_axis_with_the_requested_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    tile = min(tile, length)
    assert starts[0] == 0 and starts[-1] + tile == length
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s:s + tile] = True
    assert covered.all()
    gaps = np.diff(starts)
    assert np.all(gaps > 0)
    assert np.all(tile - gaps >= int(overlap * tile) - 1)  # overlap at least the requested one (rounding)


def _smooth_field(size, seed=0):
    rng = np.random.RandomState(seed)
    coarse = torch.from_numpy(rng.rand(1, 1, 6, 7))
    return F.interpolate(coarse, size=size, mode="bicubic", align_corners=False)[0, 0].numpy()


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
@pytest.mark.parametrize("size, tile", [((500, 700), (128, 128)), ((300, 257), (96, 160)), ((64, 900), (64, 200))])
def test_stitching_reproduces_a_field_the_tiles_agree_on(size, tile, overlap):
    """Weights are a partition of unity: tiles cut from one map stitch back into it exactly."""
    field = _smooth_field(size)
    boxes = tile_boxes(size, tile, overlap)
    tile_maps = [field[t:t + h, l:l + w] for t, l, h, w in boxes]
    np.testing.assert_allclose(stitch_tiles(tile_maps, boxes, size), field, rtol=1e-5, atol=1e-6)


def test_disagreeing_tiles_blend_without_seams():
    """Tiles that disagree by a constant meet in a ramp across the overlap, not a step."""
    size, tile, overlap = (400, 600), (128, 128), 0.25
    boxes = tile_boxes(size, tile, overlap)
    levels = np.random.RandomState(0).rand(len(boxes))
    tile_maps = [np.full(box[2:], level) for box, level in zip(boxes, levels)]
    stitched = stitch_tiles(tile_maps, boxes, size)
    assert stitched.min() >= levels.min() - 1e-6 and stitched.max() <= levels.max() + 1e-6
    spread = levels.max() - levels.min()
    min_overlap = min(128 - np.diff(tile_starts(n, 128, overlap)).max() for n in size)
    steps = max(np.abs(np.diff(stitched, axis=0)).max(), np.abs(np.diff(stitched, axis=1)).max())
    # a seam would jump by up to `spread` between two neighbouring pixels
    assert steps <= 2.0 * spread / min_overlap
    naive = np.zeros(size)
    for tile_map, (t, l, h, w) in zip(tile_maps, boxes):
        naive[t:t + h, l:l + w] = tile_map
    assert max(np.abs(np.diff(naive, axis=0)).max(), np.abs(np.diff(naive, axis=1)).max()) > 5 * steps


def _upscaled(images, factor):
    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    tensor = F.interpolate(tensor, scale_factor=factor, mode="bilinear", align_corners=False)
    return tensor.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def tiled_data(sample):
    train, test = sample
    masks = F.interpolate(torch.from_numpy(test.masks[:, None].astype(np.float32)), scale_factor=2.0)[:, 0]
    return _upscaled(train.images[:10], 2.0), _upscaled(test.images, 2.0), masks.numpy() > 0.5, test.labels


def test_tiled_patchcore_maps_at_full_size_and_localises(tiled_data):
    train, test, masks, labels = tiled_data  # 448 x 448 images, 96-pixel tiles
    model = TiledDetector(PatchCore(image_size=96, coreset=0.25, random_state=0), overlap=0.25).fit(train)
    assert model.tile_size_ == (96, 96)
    assert model.estimator_.n_train_images_ == 10 * 25  # 448 = 5 tiles of 96 per axis without overlap
    scores, maps = model.score_samples_and_maps(test)
    assert maps.shape == test.shape[:3] and maps.dtype == np.float32 and np.isfinite(maps).all()
    np.testing.assert_allclose(model.score_samples(test), scores)
    np.testing.assert_array_equal(model.predict(test), np.where(scores - model.offset_ < 0, -1, 1))
    assert pixel_auroc(masks, maps) > 0.85
    # the image score is that of the most anomalous tile
    crops = [test[0][t:t + h, l:l + w] for t, l, h, w in tile_boxes((448, 448), (96, 96), 0.25)]
    assert scores[0] == pytest.approx(model.estimator_.score_samples(crops).min())
    # a mixed-size list: each map at its own image's size
    mixed = model.predict_map([test[0], test[1][:300, :200]])
    assert [m.shape for m in mixed] == [(448, 448), (300, 200)]
    np.testing.assert_allclose(mixed[0], maps[0], rtol=1e-5, atol=1e-6)


def test_tiled_detector_params_clone_and_pickle(tiled_data):
    train, test, _, _ = tiled_data
    model = TiledDetector(PatchCore(image_size=64, coreset=0.5, random_state=0), tile_size=128, overlap=0.5)
    assert clone(model).get_params()["estimator__coreset"] == 0.5
    model.set_params(estimator__coreset=0.25)
    model.fit(train[:3])
    assert model.estimator_.coreset == 0.25 and model.estimator.coreset == 0.25
    restored = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(restored.predict_map(test[:2]), model.predict_map(test[:2]))
    with pytest.raises(ValueError, match="overlap"):
        clone(model).set_params(overlap=0.9).fit(train[:2])
    with pytest.raises(ValueError, match="tile_size must be an int or a .* pair of ints"):
        clone(model).set_params(tile_size=(127.5, 128)).fit(train[:2])


def test_grid_search_over_the_wrapped_detector_trains_on_normal_tiles(tiled_data):
    from sklearn.model_selection import GridSearchCV

    from skpatchad.metrics import pro_scorer
    from skpatchad.model_selection import AnomalyStratifiedKFold

    _, test, masks, labels = tiled_data
    search = GridSearchCV(TiledDetector(PatchCore(image_size=96, random_state=0)),
                          {"estimator__coreset": [0.1, 0.25]}, scoring=pro_scorer,
                          cv=AnomalyStratifiedKFold(2)).fit(test, masks)
    scores = search.cv_results_["mean_test_score"]
    assert np.all(np.isfinite(scores)) and np.all(scores > 0.5)
    # the refit saw the normal images only: 25 tiles of 96 pixels per 448x448 image
    assert search.best_estimator_.estimator_.n_train_images_ == 25 * int(np.sum(labels == 0))


@pytest.mark.parametrize("length, tile, overlap, margin", [(1000, 256, 0.0, (16, 16)), (777, 96, 0.3, (12, 13)),
                                                           (300, 128, 0.5, (32, 32)), (129, 128, 0.0, (8, 8))])
def test_tile_starts_with_margins_leave_no_unseen_band(length, tile, overlap, margin):
    starts = tile_starts(length, tile, overlap, margin)
    assert starts[0] == 0 and starts[-1] + tile == length
    seen = np.zeros(length, bool)
    for s in starts:
        seen[s + margin[0]:s + tile - margin[1]] = True
    assert seen[margin[0]:length - margin[1]].all()
    seen_length = tile - sum(margin)
    gaps = np.diff(starts)
    assert np.all(seen_length - gaps >= int(overlap * seen_length) - 1)


@pytest.mark.parametrize("overlap", [0.0, 0.25])
def test_stitching_takes_nothing_from_cropped_margins_inside_the_image(overlap):
    """A tile's map outside its crop only extends border values: neighbours that saw those pixels decide."""
    size, tile, margins = (300, 420), (64, 64), ((0.125, 0.125), (0.125, 0.125))  # a 64 -> 48 crop
    boxes = tile_boxes(size, tile, overlap, margins)
    field = _smooth_field(size)
    tile_maps = []
    for t, l, h, w in boxes:
        tile_map = np.full((h, w), 1000.0)  # what the detector never saw
        tile_map[8:-8, 8:-8] = field[t + 8:t + h - 8, l + 8:l + w - 8]
        tile_maps.append(tile_map)
    stitched = stitch_tiles(tile_maps, boxes, size, margins)
    np.testing.assert_allclose(stitched[8:-8, 8:-8], field[8:-8, 8:-8], rtol=1e-5, atol=1e-6)
    # the image border, which no tile saw, keeps the detector's own margin values
    assert np.all(stitched[:8] == 1000.0) and np.all(stitched[:, -8:] == 1000.0)


def _texture(rng, size):
    noise = torch.from_numpy(rng.rand(1, 3, size // 4, size // 4).astype(np.float32))
    smooth = F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)[0]
    return (smooth.permute(1, 2, 0).numpy() * 200 + 20).astype(np.uint8)


def test_tiled_detector_with_a_centre_crop_sees_the_band_between_tiles():
    """With PatchCore cropping 64 -> 48, tiles 128 apart would never see rows 56..72 of a 128-pixel image."""
    rng = np.random.RandomState(0)
    train = np.stack([_texture(rng, 128) for _ in range(6)])
    normal = np.stack([_texture(rng, 128) for _ in range(4)])
    defect = _texture(rng, 128)
    defect[58:70, 40:90] = (250, 0, 250)  # on the seam between the 2x2 tiles of 64
    detector = PatchCore(image_size=64, crop_size=48, coreset=0.5, embedding_dim=64, random_state=0)
    model = TiledDetector(detector, overlap=0.0).fit(train)
    assert model.crop_margins_ == ((0.125, 0.125), (0.125, 0.125))
    scores, maps = model.score_samples_and_maps(np.concatenate([normal, defect[None]]))
    assert scores[-1] < scores[:-1].min()
    peak = np.unravel_index(np.argmax(maps[-1]), maps[-1].shape)
    assert 50 <= peak[0] <= 76 and 34 <= peak[1] <= 96
