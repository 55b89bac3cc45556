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
