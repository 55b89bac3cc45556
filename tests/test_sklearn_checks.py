"""scikit-learn's estimator checks, and image versions of those that need tabular X.

PatchCore declares ``input_tags.two_d_array = False`` (it takes images, not
tables), and scikit-learn then skips its whole check suite. To run the checks
anyway, the estimator is checked under a tag set that claims 2-D support:
every check that then fails is listed below with its reason (all fail because
tabular X is rejected), the others must pass, and the behaviour the failing
checks guard is re-tested on images further down.
"""

import pickle

import numpy as np
import pytest
from sklearn.base import clone, is_outlier_detector
from sklearn.utils.estimator_checks import parametrize_with_checks

from skpatchad import PatchCore

FAST = dict(image_size=32, coreset=0.5, batch_size=64, random_state=0)

_TABULAR = "takes images (N, H, W[, C]); tabular 2-D X is rejected by design with a ValueError"
EXPECTED_FAILURES_ON_TABULAR_X = {
    name: _TABULAR
    for name in [
        "check_fit_score_takes_y", "check_estimators_overwrite_params", "check_dont_overwrite_parameters",
        "check_estimators_fit_returns_self", "check_readonly_memmap_input", "check_n_features_in_after_fitting",
        "check_positive_only_tag_during_fit", "check_estimators_dtypes", "check_complex_data",
        "check_dtype_object", "check_estimators_empty_data_messages", "check_pipeline_consistency",
        "check_estimators_nan_inf", "check_estimators_pickle", "check_f_contiguous_array_estimator",
        "check_outliers_fit_predict", "check_outliers_train", "check_classifier_data_not_an_array",
        "check_methods_sample_order_invariance", "check_methods_subset_invariance", "check_fit2d_1sample",
        "check_fit2d_1feature", "check_dict_unchanged", "check_fit_idempotent", "check_fit_check_is_fitted",
        "check_n_features_in", "check_fit2d_predict1d",
    ]
}


class _ClaimsTabularInput(PatchCore):
    """PatchCore under sklearn's default input tags, to list what tabular X breaks."""

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = True
        tags.input_tags.three_d_array = False
        return tags


@parametrize_with_checks(
    [_ClaimsTabularInput(**FAST)],
    expected_failed_checks=lambda est: EXPECTED_FAILURES_ON_TABULAR_X,
)
def test_sklearn_checks_on_tabular_input_fail_only_as_listed(estimator, check):
    check(estimator)


# ----------------------------------------------------------------------------
# Image versions of the checks above.


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    base = rng.integers(90, 110, size=(1, 40, 40, 3))
    noise = rng.integers(-8, 8, size=(10, 40, 40, 3))
    return (base + noise).clip(0, 255).astype(np.uint8)


def test_fit_returns_self_and_is_idempotent(images):
    model = PatchCore(**FAST)
    assert model.fit(images) is model
    first = model.predict_map(images)
    np.testing.assert_array_equal(model.fit(images).predict_map(images), first)


def test_does_not_modify_inputs_or_params(images):
    original = images.copy()
    model = PatchCore(**FAST)
    params = model.get_params()
    model.fit(images)
    model.predict(images)
    np.testing.assert_array_equal(images, original)
    assert model.get_params() == params


def test_readonly_and_fortran_ordered_inputs(images):
    readonly = images.copy()
    readonly.setflags(write=False)
    fortran = np.asfortranarray(images)
    reference = PatchCore(**FAST).fit(images)
    for variant in (readonly, fortran):
        np.testing.assert_array_equal(PatchCore(**FAST).fit(variant).predict_map(images), reference.predict_map(images))


def test_sample_order_and_subset_invariance(images):
    model = PatchCore(**FAST).fit(images)
    scores = model.score_samples(images)
    order = np.random.default_rng(1).permutation(len(images))
    np.testing.assert_allclose(model.score_samples(images[order]), scores[order], rtol=1e-6)
    np.testing.assert_allclose(model.score_samples(images[:3]), scores[:3], rtol=1e-6)
    np.testing.assert_allclose(model.predict_map(images[order])[0], model.predict_map(images)[order[0]], rtol=1e-6)


def test_nan_inf_and_dtype_handling(images):
    floats = images.astype(np.float64) / 255.0
    PatchCore(**FAST).fit(floats)  # float [0, 1] accepted
    bad = floats.copy()
    bad[2, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="image 2.*NaN"):
        PatchCore(**FAST).fit(bad)
    with pytest.raises(TypeError, match="sparse"):
        from scipy import sparse

        PatchCore(**FAST).fit(sparse.csr_matrix(np.ones((4, 4))))


def test_pickle_and_clone(images):
    model = PatchCore(**FAST).fit(images)
    restored = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(restored.predict_map(images), model.predict_map(images))
    assert not hasattr(clone(model), "offset_")


def test_outlier_detector_contract(images):
    model = PatchCore(**{**FAST, "contamination": 0.2}).fit(images)
    predictions = model.predict(images)
    assert set(np.unique(predictions)) <= {-1, 1}
    decision = model.decision_function(images)
    np.testing.assert_array_equal(predictions == -1, decision < 0)
    assert is_outlier_detector(model)
