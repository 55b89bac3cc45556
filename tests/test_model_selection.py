"""Tests for skpatchad.model_selection."""

import numpy as np
import pytest
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_validate

from skpatchad.metrics import image_auroc_scorer, labels_from_y, pixel_auroc_scorer, pro_scorer
from skpatchad.model_selection import AnomalyStratifiedKFold


def _images_and_masks(n_normal=9, n_anomalous=6, seed=0):
    """Images of different sizes; anomalous ones have a bright square."""
    rng = np.random.default_rng(seed)
    X, masks = [], []
    for i in range(n_normal + n_anomalous):
        h, w = int(rng.integers(10, 16)), int(rng.integers(10, 16))
        img = rng.random((h, w))
        mask = np.zeros((h, w), dtype=np.uint8)
        if i >= n_normal:
            mask[1:5, 1:5] = 255
            img[mask > 0] += 1.0
        X.append(img)
        masks.append(mask)
    return X, masks


def _assert_valid_folds(cv, X, y, n_splits):
    labels = labels_from_y(y)
    folds = list(cv.split(X, y))
    assert len(folds) == n_splits == cv.get_n_splits(X, y)
    seen = []
    for train, test in folds:
        assert set(labels[test]) == {0, 1}, "test fold lacks a class"
        assert set(labels[train]) == {0, 1}
        assert not set(train) & set(test)
        assert len(train) + len(test) == len(X)
        seen.extend(test)
    # The test folds partition all the images.
    assert sorted(seen) == list(range(len(X)))
    return folds


@pytest.mark.parametrize("n_splits", [2, 3])
def test_folds_have_both_classes_for_labels_and_masks(n_splits):
    X, masks = _images_and_masks()
    labels = labels_from_y(masks)
    cv = AnomalyStratifiedKFold(n_splits=n_splits, random_state=0)
    folds_labels = _assert_valid_folds(cv, X, labels, n_splits)
    folds_masks = _assert_valid_folds(cv, X, masks, n_splits)
    # Masks and the labels they imply give the same folds.
    for (tr_a, te_a), (tr_b, te_b) in zip(folds_labels, folds_masks):
        np.testing.assert_array_equal(te_a, te_b)
    # An (N, H, W) mask array works too.
    stacked = np.stack([np.resize(m, (8, 8)) for m in masks])
    _assert_valid_folds(cv, np.zeros((len(X), 8, 8)), stacked, n_splits)


def test_anomalies_last_unlike_plain_kfold():
    # Datasets are often sorted (all normal images first): a plain unshuffled
    # split would give test folds with one class only.
    X, masks = _images_and_masks(n_normal=9, n_anomalous=3)
    labels = labels_from_y(masks)
    cv = AnomalyStratifiedKFold(n_splits=3, shuffle=False)
    for _, test in cv.split(X, masks):
        assert labels[test].sum() == 1 and (1 - labels[test]).sum() == 3


def test_defaults_and_reproducibility():
    cv = AnomalyStratifiedKFold()
    assert cv.n_splits == 3 and cv.shuffle is True and cv.random_state is None
    assert isinstance(cv, StratifiedKFold)
    assert cv.get_n_splits() == 3
    assert "AnomalyStratifiedKFold(n_splits=3" in repr(cv)
    X, masks = _images_and_masks()
    a = [te for _, te in AnomalyStratifiedKFold(random_state=1).split(X, masks)]
    b = [te for _, te in AnomalyStratifiedKFold(random_state=1).split(X, masks)]
    for ta, tb in zip(a, b):
        np.testing.assert_array_equal(ta, tb)


def test_split_errors():
    X, masks = _images_and_masks()
    cv = AnomalyStratifiedKFold(n_splits=3)
    with pytest.raises(ValueError, match="both normal"):
        list(cv.split(X[:9], masks[:9]))
    with pytest.raises(ValueError, match="15 images but y describes 14"):
        list(cv.split(X, masks[:-1]))
    with pytest.raises(ValueError, match="1 = anomalous"):
        list(cv.split(X, np.where(labels_from_y(masks) == 1, -1, 1)))
    with pytest.raises(ValueError, match="required"):
        list(cv.split(X, None))


@pytest.mark.parametrize("n_normal, n_anomalous", [(9, 2), (2, 6)])
def test_too_few_images_of_a_class_for_the_folds_raise(n_normal, n_anomalous):
    """StratifiedKFold would only warn and yield a test fold without anomalies (NaN AUROC)."""
    X, masks = _images_and_masks(n_normal, n_anomalous)
    with pytest.raises(ValueError, match="got %d normal and %d anomalous" % (n_normal, n_anomalous)):
        list(AnomalyStratifiedKFold(n_splits=3).split(X, masks))
    assert len(list(AnomalyStratifiedKFold(n_splits=2).split(X, masks))) == 2


class _MeanDetector(OutlierMixin, BaseEstimator):
    """Fake detector: image mean = anomaly score, image = anomaly map."""

    def __init__(self, invert=False):
        self.invert = invert

    def fit(self, X, y=None):
        self.n_images_ = len(X)
        return self

    def decision_function(self, X):
        sign = -1.0 if self.invert else 1.0
        return np.array([-sign * float(np.mean(x)) for x in X])

    def predict(self, X):
        return np.where(self.decision_function(X) < 0, -1, 1)

    def predict_map(self, X):
        sign = -1.0 if self.invert else 1.0
        return [sign * np.asarray(x, dtype=float) for x in X]


def test_grid_search_with_masks_as_y():
    X, masks = _images_and_masks(seed=3)
    search = GridSearchCV(
        _MeanDetector(),
        {"invert": [True, False]},
        scoring=pro_scorer,
        cv=AnomalyStratifiedKFold(n_splits=3, random_state=0),
        error_score="raise",
    )
    search.fit(X, masks)
    assert search.best_params_ == {"invert": False}
    scores = search.cv_results_["mean_test_score"]
    assert not np.isnan(scores).any()
    assert scores[1] > 0.9 > 0.1 > scores[0]


def test_cross_validate_multiple_scorers():
    X, masks = _images_and_masks(seed=4)
    result = cross_validate(
        _MeanDetector(),
        X,
        masks,
        cv=AnomalyStratifiedKFold(n_splits=3, random_state=0),
        scoring={"image_auroc": image_auroc_scorer, "pixel_auroc": pixel_auroc_scorer, "pro": pro_scorer},
        error_score="raise",
    )
    for key in ("test_image_auroc", "test_pixel_auroc", "test_pro"):
        assert result[key].shape == (3,)
        assert np.all(result[key] > 0.9)
