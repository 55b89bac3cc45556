"""Tests for skpatchad.metrics (metrics and scorers)."""

import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer

from skpatchad.metrics import (
    SCORERS,
    get_scorer,
    image_auroc,
    image_auroc_scorer,
    labels_from_y,
    masks_from_y,
    pixel_auroc,
    pixel_auroc_scorer,
    pro_score,
    pro_scorer,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _random_masks(rng, n_images, shape, n_defect_free=0, max_regions=3):
    """Masks with a few random rectangles, the first images defect-free."""
    masks = np.zeros((n_images,) + shape, dtype=bool)
    for i in range(n_defect_free, n_images):
        for _ in range(rng.integers(1, max_regions + 1)):
            h, w = rng.integers(1, shape[0] // 3 + 1), rng.integers(1, shape[1] // 3 + 1)
            top, left = rng.integers(0, shape[0] - h + 1), rng.integers(0, shape[1] - w + 1)
            masks[i, top : top + h, left : left + w] = True
    return masks


def _reference_pro(masks, maps, fpr_limit):
    """Slow, straightforward PRO: loop over every distinct threshold.

    Written independently of the implementation: explicit region lists,
    explicit threshold loop and a segment-by-segment trapezoid.
    """
    regions = []  # list of 1-D arrays of region scores
    negatives = []
    for mask, amap in zip(masks, maps):
        mask = np.asarray(mask) != 0
        amap = np.asarray(amap, dtype=float)
        labeled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        for k in range(1, n + 1):
            regions.append(amap[labeled == k])
        negatives.append(amap[~mask])
    negatives = np.concatenate(negatives)
    all_scores = np.concatenate([negatives] + regions)

    xs, ys = [0.0], [0.0]
    for t in np.unique(all_scores)[::-1]:
        xs.append(np.mean(negatives >= t))
        ys.append(np.mean([np.mean(r >= t) for r in regions]))
    xs.append(1.0)
    ys.append(1.0)

    area = 0.0
    for x0, y0, x1, y1 in zip(xs[:-1], ys[:-1], xs[1:], ys[1:]):
        if x0 >= fpr_limit:
            break
        if x1 <= fpr_limit:
            area += 0.5 * (y0 + y1) * (x1 - x0)
        else:
            y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            area += 0.5 * (y0 + y_lim) * (fpr_limit - x0)
    return area / fpr_limit


# ---------------------------------------------------------------------------
# labels_from_y / masks_from_y
# ---------------------------------------------------------------------------


def test_labels_from_y_labels():
    np.testing.assert_array_equal(labels_from_y([0, 1, 1, 0]), [0, 1, 1, 0])
    np.testing.assert_array_equal(labels_from_y(np.array([True, False])), [1, 0])
    np.testing.assert_array_equal(labels_from_y([0.0, 1.0]), [0, 1])
    assert labels_from_y([True, False]).dtype.kind == "i"


def test_labels_from_y_masks():
    masks = np.zeros((3, 4, 5))
    masks[1, 2, 3] = 255  # MVTec masks are 0 / 255
    np.testing.assert_array_equal(labels_from_y(masks), [0, 1, 0])
    # List of masks of different sizes.
    masks = [np.zeros((2, 2)), np.ones((3, 7), dtype=np.uint8), np.eye(5, dtype=bool)]
    np.testing.assert_array_equal(labels_from_y(masks), [0, 1, 1])


@pytest.mark.parametrize("y", [[-1, 1, 1], [0, 2], [0.5, 1.0]])
def test_labels_from_y_wrong_values(y):
    with pytest.raises(ValueError, match="1 = anomalous and 0 = normal"):
        labels_from_y(y)


def test_labels_from_y_minus_one_hints_conversion():
    with pytest.raises(ValueError, match=r"\(y == -1\)"):
        labels_from_y([-1, 1])


@pytest.mark.parametrize(
    "y, match",
    [
        (np.zeros((3, 4)), "neither 1-D image labels nor masks"),
        (np.zeros((2, 3, 4, 5)), "neither 1-D image labels nor masks"),
        (["a", "b"], "numeric labels"),
        ([], "empty"),
        (None, "required"),
        ([np.zeros((2, 2)), np.zeros(3)], r"y\[1\] must be a 2-D array"),
        # masks read with a channel axis, of different sizes: numpy could not stack them
        ([np.zeros((4, 4, 3)), np.zeros((5, 6, 3))], r"y\[0\] must be a 2-D array, got shape \(4, 4, 3\) \(drop"),
        ([np.zeros((4, 4)), np.ones((5, 6, 3))], r"y\[1\] must be a 2-D array"),
        ([np.zeros((4, 4)), np.full((5, 6), np.nan)], r"y\[1\] contains NaN"),
        (np.full((2, 3, 3), np.nan), r"y\[0\] contains NaN"),
    ],
)
def test_labels_from_y_wrong_shape(y, match):
    with pytest.raises(ValueError, match=match):
        labels_from_y(y)


def test_masks_from_y():
    masks = masks_from_y([np.zeros((2, 3)), 255 * np.ones((4, 1), dtype=np.uint8)])
    assert [m.shape for m in masks] == [(2, 3), (4, 1)]
    assert all(m.dtype == bool for m in masks)
    assert masks[1].all() and not masks[0].any()
    arr = masks_from_y(np.ones((2, 3, 3)))
    assert len(arr) == 2 and arr[0].shape == (3, 3)


def test_object_array_of_masks_is_a_list_of_masks():
    # np.array(list_of_masks_of_different_sizes, dtype=object), as images may be passed
    masks = np.empty(3, dtype=object)
    masks[:] = [np.zeros((2, 3)), 255 * np.ones((4, 1), dtype=np.uint8), np.zeros((5, 5))]
    np.testing.assert_array_equal(labels_from_y(masks), [0, 1, 0])
    assert [m.shape for m in masks_from_y(masks)] == [(2, 3), (4, 1), (5, 5)]
    maps = np.empty(3, dtype=object)
    maps[:] = [np.zeros((2, 3)), np.ones((4, 1)), np.zeros((5, 5))]
    assert pixel_auroc(masks, maps) == 1.0


def test_masks_from_y_rejects_labels():
    with pytest.raises(ValueError, match=r"need ground-truth masks \(N, H, W\), got image labels"):
        masks_from_y([0, 1, 1])


@pytest.mark.parametrize("y, match", [
    ([np.zeros((4, 4)), np.zeros((5, 6, 3))], r"masks\[1\] must be a 2-D array, got shape \(5, 6, 3\)"),
    ([np.full((4, 4), np.nan)], r"masks\[0\] contains NaN"),
    ([], "y is empty"),
])
def test_masks_from_y_names_the_bad_mask(y, match):
    with pytest.raises(ValueError, match=match):
        masks_from_y(y)
    with pytest.raises(ValueError, match=match):
        pixel_auroc(y, [np.zeros((4, 4))] * len(y))


# ---------------------------------------------------------------------------
# image_auroc / pixel_auroc
# ---------------------------------------------------------------------------


def test_image_auroc_perfect_inverted_ties():
    y = [0, 0, 1, 1]
    assert image_auroc(y, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert image_auroc(y, [0.9, 0.8, 0.2, 0.1]) == 0.0
    # Pairs (pos, neg): (0.5, 0.5) tie -> 1/2, the 3 others correct: 3.5 / 4.
    assert image_auroc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.8]) == pytest.approx(0.875)
    assert image_auroc(y, [1, 1, 1, 1]) == 0.5


def test_image_auroc_accepts_masks():
    masks = [np.zeros((3, 3)), np.ones((5, 2)), np.zeros((1, 1))]
    assert image_auroc(masks, [0.0, 1.0, 0.5]) == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_image_auroc_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 200))
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    scores = rng.integers(0, 10, n).astype(float)  # many ties
    assert image_auroc(y, scores) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)


def test_image_auroc_errors():
    with pytest.raises(ValueError, match="only one class"):
        image_auroc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="only one class"):
        image_auroc([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="3 images but y_score has 2"):
        image_auroc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="1 = anomalous"):
        image_auroc([-1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        image_auroc([0, 1], [0.1, np.nan])


def test_pixel_auroc_perfect_inverted():
    rng = np.random.default_rng(0)
    masks = _random_masks(rng, 4, (16, 16), n_defect_free=1)
    perfect = masks + 0.1 * rng.random(masks.shape)  # defects in [1, 1.1)
    assert pixel_auroc(masks, perfect) == 1.0
    assert pixel_auroc(masks, -perfect) == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_pixel_auroc_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    masks = _random_masks(rng, 5, (20, 24), n_defect_free=2)
    maps = np.round(rng.random(masks.shape) + 0.3 * masks, 1)  # many ties
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    # Same with more defect than normal pixels (other code branch).
    assert pixel_auroc(~masks, maps) == pytest.approx(
        roc_auc_score(~masks.ravel(), maps.ravel()), abs=1e-12
    )


def test_pixel_auroc_list_of_different_sizes():
    rng = np.random.default_rng(1)
    shapes = [(10, 12), (7, 7), (15, 4)]
    masks = [rng.random(s) < 0.2 for s in shapes]
    maps = [rng.random(s).astype(np.float32) for s in shapes]
    expected = roc_auc_score(
        np.concatenate([m.ravel() for m in masks]),
        np.concatenate([m.ravel() for m in maps]),
    )
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_errors():
    masks = [np.zeros((4, 4)), np.ones((3, 3))]
    with pytest.raises(ValueError, match=r"maps\[1\] has shape \(3, 4\) but masks\[1\]"):
        pixel_auroc(masks, [np.zeros((4, 4)), np.zeros((3, 4))])
    with pytest.raises(ValueError, match="2 masks but 1 anomaly maps"):
        pixel_auroc(masks, [np.zeros((4, 4))])
    with pytest.raises(ValueError, match="got image labels"):
        pixel_auroc([0, 1], [np.zeros((4, 4)), np.zeros((3, 3))])
    with pytest.raises(ValueError, match="only one class"):
        pixel_auroc([np.zeros((4, 4))], [np.zeros((4, 4))])
    with pytest.raises(ValueError, match=r"maps\[0\] contains NaN"):
        pixel_auroc(masks, [np.full((4, 4), np.nan), np.zeros((3, 3))])


# ---------------------------------------------------------------------------
# pro_score
# ---------------------------------------------------------------------------


def test_pro_perfect_and_inverted():
    rng = np.random.default_rng(0)
    masks = _random_masks(rng, 6, (32, 32), n_defect_free=2)
    perfect = masks + 0.5 * rng.random(masks.shape)  # every defect > every normal
    assert pro_score(masks, perfect) == pytest.approx(1.0, abs=1e-12)
    assert pro_score(masks, -perfect) == 0.0
    assert pro_score(masks, masks.astype(float), fpr_limit=1.0) == pytest.approx(1.0)


def test_pro_random_map_is_about_fpr_limit_over_two():
    # A random map has PRO(t) ~ FPR(t): the normalised area is
    # (0.3 ** 2 / 2) / 0.3 = 0.15.
    rng = np.random.default_rng(42)
    masks = _random_masks(rng, 40, (64, 64), n_defect_free=10)
    maps = rng.random(masks.shape)
    assert pro_score(masks, maps) == pytest.approx(0.15, abs=0.02)
    assert pro_score(masks, maps, fpr_limit=1.0) == pytest.approx(0.5, abs=0.03)


def test_pro_ties_hand_computed():
    # One row: regions A = {0} and B = {2} (not 8-connected), normals 1, 3-5.
    mask = np.array([[1, 0, 1, 0, 0, 0]])
    amap = np.array([[0.9, 0.9, 0.5, 0.5, 0.1, 0.1]])
    # Thresholds: 0.9 -> (FPR 1/4, PRO 1/2) [A and a normal pixel tie],
    # 0.5 -> (2/4, 1), 0.1 -> (1, 1). Curve (0,0) (.25,.5) (.5,1) (1,1).
    # Up to 0.3: .25 * .5 / 2 + .05 * (.5 + .6) / 2 = .09 -> / .3 = 0.3.
    assert pro_score([mask], [amap]) == pytest.approx(0.3)
    # Up to 1: .0625 + .25 * 1.5 / 2 + .5 = .75.
    assert pro_score([mask], [amap], fpr_limit=1.0) == pytest.approx(0.75)
    # fpr_limit exactly on a curve point.
    assert pro_score([mask], [amap], fpr_limit=0.25) == pytest.approx(0.25)


def test_pro_regions_weigh_the_same():
    mask = np.zeros((10, 10), dtype=int)
    mask[1:5, 1:5] = 1  # big region, 16 px
    mask[8, 8] = 1  # small region, 1 px
    amap = np.full((10, 10), 0.5)
    amap[1:5, 1:5] = 1.0  # big region found first
    amap[8, 8] = 0.0  # small region missed until FPR = 1
    # PRO is 1/2 for every FPR in (0, 1): the normalised area is 0.5 (a
    # pixel-weighted overlap would give 16/17).
    assert pro_score([mask], [amap]) == pytest.approx(0.5)
    # Same when the two regions are in different images.
    mask_a, mask_b = np.zeros((10, 10), int), np.zeros((3, 3), int)
    mask_a[1:5, 1:5] = 1
    mask_b[1, 1] = 1
    map_a, map_b = np.where(mask_a, 1.0, 0.5), np.where(mask_b, 0.0, 0.5)
    assert pro_score([mask_a, mask_b], [map_a, map_b]) == pytest.approx(0.5)


def test_pro_regions_are_8_connected():
    # An L of 3 pixels touching only diagonally at (0,0)-(1,1): with the
    # official 3x3 structure it is ONE region of 3 px, of which 1 px is found
    # at FPR = 0, so PRO = 1/3 on (0, 1). With 4-connectivity it would be two
    # regions, one fully found: PRO = 1/2.
    mask = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]])
    amap = np.array([[1.0, 0.5, 0.5], [0.5, 0.0, 0.0], [0.5, 0.5, 0.5]])
    assert pro_score([mask], [amap]) == pytest.approx(1 / 3)


def test_pro_defect_free_images_count_as_normal_pixels():
    mask_a, map_a = np.array([[1, 0]]), np.array([[0.5, 0.2]])
    assert pro_score([mask_a], [map_a], fpr_limit=1.0) == 1.0
    # A defect-free image adds normal pixels, one of them above the defect:
    # curve (0,0) (1/3,0) (1/3,1) (1,1).
    mask_b, map_b = np.zeros((1, 2)), np.array([[0.9, 0.1]])
    assert pro_score([mask_a, mask_b], [map_a, map_b], fpr_limit=1.0) == pytest.approx(2 / 3)
    assert pro_score([mask_a, mask_b], [map_a, map_b]) == 0.0
    assert pixel_auroc([mask_a, mask_b], [map_a, map_b]) == pytest.approx(2 / 3)


def test_pro_invariant_to_strictly_monotone_transforms():
    rng = np.random.default_rng(3)
    masks = _random_masks(rng, 6, (24, 24), n_defect_free=2)
    maps = rng.random(masks.shape) + 0.4 * masks
    expected = pro_score(masks, maps)
    assert 0.3 < expected < 1.0
    for transformed in (np.exp(maps), 3.0 * maps + 2.0, np.log(maps + 1e-3), maps**3):
        assert pro_score(masks, transformed) == pytest.approx(expected, abs=1e-12)
        assert pixel_auroc(masks, transformed) == pytest.approx(pixel_auroc(masks, maps), abs=1e-12)
    # Only the order matters: integer ranks (no ties here) give the same value.
    ranks = np.argsort(np.argsort(maps, axis=None)).reshape(maps.shape)
    assert pro_score(masks, ranks) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_pro_matches_reference(seed, fpr_limit):
    rng = np.random.default_rng(seed)
    masks = _random_masks(rng, 4, (12, 15), n_defect_free=1, max_regions=4)
    maps = rng.random(masks.shape) + 0.3 * masks
    if seed % 2:
        maps = np.round(maps, 1)  # many ties between defect and normal pixels
    assert pro_score(masks, maps, fpr_limit=fpr_limit) == pytest.approx(
        _reference_pro(masks, maps, fpr_limit), abs=1e-10
    )


def test_pro_list_of_different_sizes_matches_reference():
    rng = np.random.default_rng(7)
    shapes = [(10, 12), (7, 9), (15, 4), (5, 5)]
    masks, maps = [], []
    for s in shapes:
        m = _random_masks(rng, 1, s)[0]
        masks.append(m.astype(np.uint8) * 255)
        maps.append(np.round(rng.random(s) + 0.3 * m, 2).astype(np.float32))
    assert pro_score(masks, maps) == pytest.approx(_reference_pro(masks, maps, 0.3), abs=1e-6)
    # The stacked array of a single size gives the same as its list.
    stacked = np.stack([maps[0], maps[0]])
    stacked_masks = np.stack([masks[0], masks[0]])
    assert pro_score(stacked_masks, stacked) == pytest.approx(
        pro_score(list(stacked_masks), list(stacked))
    )


def test_pro_errors():
    with pytest.raises(ValueError, match="without ground-truth defect regions"):
        pro_score([np.zeros((3, 3))], [np.zeros((3, 3))])
    with pytest.raises(ValueError, match="without normal pixels"):
        pro_score([np.ones((3, 3))], [np.zeros((3, 3))])
    masks = [np.eye(3), np.eye(4)]
    with pytest.raises(ValueError, match=r"maps\[1\] has shape \(3, 4\)"):
        pro_score(masks, [np.zeros((3, 3)), np.zeros((3, 4))])
    with pytest.raises(ValueError, match="got image labels"):
        pro_score([0, 1], [np.zeros((3, 3)), np.zeros((4, 4))])
    for bad in (0, -0.1, 1.5, True, "0.3"):
        with pytest.raises(ValueError, match="fpr_limit"):
            pro_score(masks, [np.zeros((3, 3)), np.zeros((4, 4))], fpr_limit=bad)
    with pytest.raises(ValueError, match=r"maps must have shape \(N, H, W\)"):
        pro_score(np.eye(3)[None], np.eye(3))


def test_metrics_do_not_import_torch():
    code = (
        "import sys; import skpatchad.metrics, skpatchad.model_selection; "
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]; "
        "assert not bad, bad"
    )
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------
# Scorers
# ---------------------------------------------------------------------------


class _MeanDetector(OutlierMixin, BaseEstimator):
    """Fake detector: the image mean is the anomaly score, the image the map.

    Follows the outlier convention of the real estimators:
    ``decision_function`` is higher for more normal images.
    """

    def __init__(self, invert=False):
        self.invert = invert

    def fit(self, X, y=None):
        self.n_images_ = len(X)
        return self

    def _sign(self):
        return -1.0 if self.invert else 1.0

    def decision_function(self, X):
        return np.array([-self._sign() * float(np.mean(x)) for x in X])

    def predict(self, X):
        return np.where(self.decision_function(X) < 0, -1, 1)

    def predict_map(self, X):
        return [self._sign() * np.asarray(x, dtype=float) for x in X]


def _toy_data(seed=0, n_normal=6, n_anomalous=6):
    """Images of different sizes; anomalous ones have a bright rectangle."""
    rng = np.random.default_rng(seed)
    X, masks = [], []
    for i in range(n_normal + n_anomalous):
        h, w = int(rng.integers(12, 20)), int(rng.integers(12, 20))
        img = rng.random((h, w))
        mask = np.zeros((h, w), dtype=bool)
        if i >= n_normal:
            mask[2:6, 3:8] = True
            img[mask] += 0.8
        X.append(img)
        masks.append(mask)
    return X, masks


def test_scorers_negate_decision_function():
    X, masks = _toy_data()
    labels = labels_from_y(masks)
    est = _MeanDetector().fit(X)
    expected = image_auroc(labels, [np.mean(x) for x in X])
    assert image_auroc_scorer(est, X, labels) == pytest.approx(expected)
    assert image_auroc_scorer(est, X, masks) == pytest.approx(expected)
    assert pixel_auroc_scorer(est, X, masks) == pytest.approx(pixel_auroc(masks, X))
    assert pro_scorer(est, X, masks) == pytest.approx(pro_score(masks, X))
    assert pro_scorer(est, X, masks) > 0.9
    # An estimator that gets it backwards scores low, not high.
    bad = _MeanDetector(invert=True).fit(X)
    assert image_auroc_scorer(bad, X, labels) == pytest.approx(1 - expected)
    assert pro_scorer(bad, X, masks) < 0.1


def test_pixel_scorers_need_masks():
    X, masks = _toy_data()
    est = _MeanDetector().fit(X)
    for scorer in (pixel_auroc_scorer, pro_scorer):
        with pytest.raises(ValueError, match="need ground-truth masks"):
            scorer(est, X, labels_from_y(masks))


def test_scorers_with_pipeline():
    X, masks = _toy_data(1)
    # The transformer inverts the images, so the pipeline must be scored on
    # the transformed images: scores drop to the inverted values.
    negate = FunctionTransformer(lambda imgs: [-x for x in imgs])
    pipe = Pipeline([("pass", "passthrough"), ("neg", negate), ("det", _MeanDetector())])
    pipe.fit(X)
    neg_X = [-x for x in X]
    assert image_auroc_scorer(pipe, X, masks) == pytest.approx(
        image_auroc(masks, [np.mean(x) for x in neg_X])
    )
    assert pixel_auroc_scorer(pipe, X, masks) == pytest.approx(pixel_auroc(masks, neg_X))
    assert pro_scorer(pipe, X, masks) == pytest.approx(pro_score(masks, neg_X))
    assert pro_scorer(pipe, X, masks) < 0.1
    # Nested pipelines are unwrapped too.
    nested = Pipeline([("inner", Pipeline([("neg", negate)])), ("p", pipe)]).fit(X)
    assert pro_scorer(nested, X, masks) == pytest.approx(pro_score(masks, X))


def test_scorer_errors_without_predict_map():
    X, masks = _toy_data()
    with pytest.raises(TypeError, match="predict_map"):
        pro_scorer(FunctionTransformer().fit(X), X, masks)
    with pytest.raises(TypeError, match="decision_function"):
        image_auroc_scorer(FunctionTransformer().fit(X), X, masks)


def test_get_scorer():
    assert get_scorer("image_auroc") is image_auroc_scorer
    assert get_scorer("pixel_auroc") is pixel_auroc_scorer
    assert get_scorer("pro") is pro_scorer
    assert set(SCORERS) == {"image_auroc", "pixel_auroc", "pro"}
    assert get_scorer(pro_scorer) is pro_scorer
    with pytest.raises(ValueError, match="valid names are"):
        get_scorer("roc_auc")


def test_grid_search_with_pro_scorer():
    from skpatchad.model_selection import AnomalyStratifiedKFold

    X, masks = _toy_data(2)
    search = GridSearchCV(
        _MeanDetector(),
        {"invert": [True, False]},
        scoring={"pro": pro_scorer, "image_auroc": image_auroc_scorer},
        refit="pro",
        cv=AnomalyStratifiedKFold(n_splits=3, random_state=0),
        error_score="raise",
    )
    search.fit(X, masks)
    assert search.best_params_ == {"invert": False}
    assert not np.isnan(search.cv_results_["mean_test_pro"]).any()
    assert search.cv_results_["mean_test_pro"][1] > 0.9
    # Scoring a fitted search object unwraps best_estimator_.
    assert pro_scorer(search, X, masks) == pytest.approx(pro_score(masks, X))
