"""What a fit leaves behind, for all three estimators: a failed or interrupted
re-fit, the user's torch random stream, random_state as a RandomState,
parameters changed after fit, fitting on one image, parameter checks."""

import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

from skpatchad import PatchCore, PatchSVDD, PEDENet

# tiny inputs and no or one epoch: each fit takes about a second
ESTIMATORS = {
    "PatchCore": lambda **kw: PatchCore(**dict(dict(image_size=64, coreset=0.25, batch_size=8, random_state=0), **kw)),
    "PatchSVDD": lambda **kw: PatchSVDD(**dict(dict(image_size=64, patch_size=32, stride_big=16, stride_small=8,
                                                    epochs=1, patches_per_image=2, batch_size=8, n_calibration=2,
                                                    random_state=0), **kw)),
    "PEDENet": lambda **kw: PEDENet(**dict(dict(image_size=80, patch_size=36, stride=4, epochs=1,
                                                patches_per_image=2, batch_size=8, n_calibration=2,
                                                random_state=0), **kw)),
}
# a parameter of each that predictions read, and another valid value for it
INFERENCE_PARAM = {"PatchCore": ("n_neighbors", 3), "PatchSVDD": ("stride_small", 4), "PEDENet": ("score", "energy")}


def _assert_unfitted(model, test):
    """No fitted attribute left, for sklearn's check as for our scoring."""
    assert not [key for key in vars(model) if key.endswith("_") and not key.startswith("_")]
    with pytest.raises(NotFittedError):
        check_is_fitted(model)
    with pytest.raises(NotFittedError):
        model.predict(test)


@pytest.fixture(scope="module")
def images(sample):
    train, test = sample
    return train.images[:4], test.images[[0, 6, 12]]


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_failed_refit_leaves_the_estimator_unfitted(name, images):
    train, test = images
    model = ESTIMATORS[name]().fit(train)
    model.decision_function(test)
    # a typo in a parameter: before, the new backbone sat next to the old bank and
    # offset_, and every image was silently predicted anomalous
    model.set_params(knn="exact ")
    with pytest.raises(ValueError, match="knn method"):
        model.fit(train)
    _assert_unfitted(model, test)
    model.set_params(knn="exact").fit(train)
    assert model.decision_function(test).shape == (3,)


@pytest.mark.parametrize("name", ["PatchSVDD", "PEDENet"])
def test_interrupted_refit_leaves_the_estimator_unfitted(name, images):
    train, test = images

    class Interrupted(type(ESTIMATORS[name]())):
        def _after_epoch(self, epoch):
            if getattr(self, "interrupt", False):
                raise KeyboardInterrupt  # the notebook's Stop button during training

    model = Interrupted(**ESTIMATORS[name]().get_params()).fit(train)
    model.interrupt = True
    with pytest.raises(KeyboardInterrupt):
        model.fit(train)
    # nothing of the new fit's first steps (encoder, device, ...) is left either
    _assert_unfitted(model, test)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_fit_leaves_the_global_torch_rng_alone(name, images):
    train, _ = images
    kwargs = {"weights": None} if name == "PatchCore" else {}  # random weights draw from torch
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "random weights"
        ESTIMATORS[name](**kwargs).fit(train)
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)


def test_random_weights_are_reproducible_with_random_state(images):
    train, test = images
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = ESTIMATORS["PatchCore"](weights=None).fit(train)
        torch.rand(5)  # whatever the global stream does in between
        b = ESTIMATORS["PatchCore"](weights=None).fit(train)
        c = ESTIMATORS["PatchCore"](weights=None, random_state=1).fit(train)
    np.testing.assert_array_equal(a.memory_bank_, b.memory_bank_)
    np.testing.assert_array_equal(a.predict_map(test), b.predict_map(test))
    assert not np.array_equal(a.memory_bank_, c.memory_bank_)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_random_state_may_be_a_random_state_instance(name, images):
    train, test = images
    a = ESTIMATORS[name](random_state=np.random.RandomState(7)).fit(train)
    b = ESTIMATORS[name](random_state=np.random.RandomState(7)).fit(train)
    np.testing.assert_array_equal(a.decision_function(test), b.decision_function(test))


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_changing_a_scoring_parameter_after_fit_is_refused(name, images):
    train, test = images
    param, other = INFERENCE_PARAM[name]
    model = ESTIMATORS[name]().fit(train)
    before = model.decision_function(test)
    fitted = model.get_params()[param]
    model.set_params(**{param: other})
    with pytest.raises(ValueError, match="fitted with %s=%r" % (param, fitted)):
        model.decision_function(test)
    with pytest.raises(ValueError, match="call fit again"):
        model.predict_map(test)
    model.set_params(**{param: fitted})
    np.testing.assert_array_equal(model.decision_function(test), before)
    # fitting with the new value is how to use it
    model.set_params(**{param: other}).fit(train)
    assert model.decision_function(test).shape == (3,)


def test_patchcore_sigma_may_change_after_fit(images):
    # only the maps depend on it: offset_ and the image scores do not
    train, test = images
    model = ESTIMATORS["PatchCore"]().fit(train)
    scores, maps = model.score_samples_and_maps(test)
    model.set_params(sigma=0.0)
    sharp_scores, sharp_maps = model.score_samples_and_maps(test)
    np.testing.assert_array_equal(sharp_scores, scores)
    assert sharp_maps.std() > maps.std()
    model.set_params(sigma=-1.0)  # checked when used, not silently "no smoothing"
    with pytest.raises(ValueError, match="sigma"):
        model.predict_map(test)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_fitting_on_one_image_warns_about_the_threshold(name, images):
    train, _ = images
    model = ESTIMATORS[name]() if name == "PatchCore" else ESTIMATORS[name](epochs=0)
    with pytest.warns(UserWarning, match="fitted on a single image"):
        model.fit(train[:1])


@pytest.mark.parametrize("params, match", [
    (dict(coreset=True), "coreset"),
    (dict(coreset=0.0), "coreset"),
    (dict(coreset="0.1"), "coreset"),
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=None), "batch_size"),
    (dict(batch_size=2.5), "batch_size"),
    (dict(batch_size=8.0), "batch_size"),  # a float size fails later as a slice bound
    (dict(projection_dim=0), "projection_dim"),
    (dict(sigma="a"), "sigma"),
    (dict(sigma=float("nan")), "sigma"),
    (dict(patch_size=True), "patch_size"),
    (dict(n_neighbors=0), "n_neighbors"),
    (dict(knn="faiss"), "knn method"),
])
def test_patchcore_rejects_bad_parameters_before_any_work(params, match):
    # X=None would fail its own check: the parameter error must come first
    with pytest.raises(ValueError, match=match):
        ESTIMATORS["PatchCore"](**params).fit(None)


def test_numpy_scalars_from_a_search_grid_are_accepted(images):
    train, test = images
    model = ESTIMATORS["PatchCore"](coreset=np.float32(0.25), patch_size=np.int64(3), projection_dim=None)
    assert model.fit(train).decision_function(test).shape == (3,)


@pytest.mark.parametrize("name", ["PatchSVDD", "PEDENet"])
@pytest.mark.parametrize("param, value", [("learning_rate", 0), ("epochs", -1), ("batch_size", 0),
                                          ("n_calibration", True), ("embedding_dim", 2.5),
                                          ("embedding_dim", 16.0), ("batch_size", 8.0), ("knn", "faiss")])
def test_learned_encoders_reject_bad_parameters_before_any_work(name, param, value):
    with pytest.raises(ValueError, match=param if param != "knn" else "knn method"):
        ESTIMATORS[name](**{param: value}).fit(None)


@pytest.mark.parametrize("name, params, match", [
    # 64.0 == 64 passed the membership test and failed later inside torch.randint
    ("PatchSVDD", {"patch_size": 64.0}, "patch_size"), ("PEDENet", {"patch_size": 36.0}, "patch_size"),
    ("PatchSVDD", {"image_size": (64, 64)}, "image_size"), ("PatchSVDD", {"image_size": None}, "image_size"),
    ("PEDENet", {"image_size": (80, 80)}, "image_size"), ("PatchSVDD", {"schedule": ["cpu"]}, "schedule"),
    # the position task needs a neighbour up to K - 1 pixels away: 96 < 127 failed in the first step
    ("PatchSVDD", {"patch_size": 64, "image_size": 96}, "image_size must be at least 127"),
    ("PatchSVDD", {"patch_size": 32, "image_size": 48, "stride_big": 16, "stride_small": 8},
     "image_size must be at least 63"),
])
def test_learned_encoders_reject_bad_sizes_before_any_work(name, params, match):
    with pytest.raises(ValueError, match=match):
        ESTIMATORS[name](**params).fit(None)


def test_patchsvdd_baselines_only_need_one_patch(images):
    """Without training there are no position pairs, so image_size = patch_size is enough."""
    train, test = images
    for encoder in ("random", "raw"):
        model = ESTIMATORS["PatchSVDD"](encoder=encoder, patch_size=32, image_size=48, stride_big=16,
                                        stride_small=8, random_state=0).fit(train)
        assert np.isfinite(model.decision_function(test)).all()
