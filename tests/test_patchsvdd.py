"""PatchSVDD: encoder hierarchy, training, scoring, sklearn behaviour."""

import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV

from skpatchad import PatchSVDD
from skpatchad.features.maps import covering_mean
from skpatchad.features.patch_encoders import (NEIGHBOUR_OFFSETS, HierarchicalPatchEncoder, PEDENetSmallEncoder,
                                              PositionClassifier, SmallPatchEncoder, neighbour_pair_corners)
from skpatchad.metrics import image_auroc, pixel_auroc_scorer
from skpatchad.model_selection import AnomalyStratifiedKFold

# 128-pixel images and K=32 keep every fit to a few seconds
FAST = dict(image_size=128, patch_size=32, epochs=2, patches_per_image=2, batch_size=16, n_calibration=4,
            stride_big=16, stride_small=8, random_state=0)


@pytest.fixture(scope="module")
def fitted(sample):
    train, _ = sample
    return PatchSVDD(**FAST).fit(train.images[:12])


def test_small_encoder_reduces_a_patch_to_one_vector():
    encoder = SmallPatchEncoder(embedding_dim=16, patch_size=32, width=8)
    out = encoder(torch.rand(3, 3, 32, 32))
    assert out.shape == (3, 16, 1, 1)
    assert out.abs().max() <= 1.0  # tanh output
    layers = [m for m in encoder.modules() if isinstance(m, torch.nn.Module) and not list(m.children())]
    assert all(isinstance(m, (torch.nn.Conv2d, torch.nn.LeakyReLU)) for m in layers)  # conv only
    assert all(m.negative_slope == 0.1 for m in layers if isinstance(m, torch.nn.LeakyReLU))


def test_dense_features_equal_patchwise_features():
    torch.manual_seed(0)
    encoder = HierarchicalPatchEncoder(SmallPatchEncoder(16, 32, 8), 16)
    image = torch.rand(1, 3, 100, 100)
    big_map, small_map = encoder.dense(image)
    for y, x in [(0, 0), (5, 11), (18, 18)]:
        patch = image[:, :, 2 * y:2 * y + 64, 2 * x:2 * x + 64]
        torch.testing.assert_close(encoder(patch)[0], big_map[0, :, y, x], rtol=1e-4, atol=1e-5)
        sub = image[:, :, 2 * y:2 * y + 32, 2 * x:2 * x + 32]
        torch.testing.assert_close(encoder.small(sub)[0, :, 0, 0], small_map[0, :, y, x], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spacing, low, high", [("reference", 48, 63), ("jittered", 56, 72)])
def test_neighbour_pairs_lie_in_the_labelled_direction_inside_the_image(spacing, low, high):
    generator = torch.Generator().manual_seed(0)
    label = torch.arange(8).repeat(500)
    first, second = neighbour_pair_corners(label, 64, 256, generator, spacing)
    assert first.min() >= 0 and second.min() >= 0 and max(first.max(), second.max()) <= 256 - 64
    offset, direction = second - first, NEIGHBOUR_OFFSETS[label]
    displaced = direction != 0
    assert torch.equal(torch.sign(offset[displaced]), direction[displaced])
    assert offset[displaced].abs().min() == low and offset[displaced].abs().max() == high
    if spacing == "reference":
        assert (offset[~displaced] == 0).all()  # the reference code moves along displaced axes only
    # every part of the image can hold the first crop, also next to the borders
    assert first.min() == 0 and first.max() == 256 - 64
    with pytest.raises(ValueError, match="too small"):
        neighbour_pair_corners(label, 64, 100, generator, spacing)


def test_svdd_pairs_are_shifted_by_a_small_non_zero_jitter(sample):
    model = PatchSVDD(**FAST)
    model.schedule_ = {"batch_size": 4000, "patches_per_image": 1}
    data = torch.arange(64.0 * 64).view(1, 1, 64, 64).expand(4000, 3, 64, 64)  # pixel value = 64 y + x
    first, second, label = model._sample_pairs(data, 32, torch.Generator().manual_seed(0), neighbours=False)
    shift = second[:, 0, 0, 0] - first[:, 0, 0, 0]
    dy, dx = torch.round(shift / 64), shift - 64 * torch.round(shift / 64)
    assert label is None and (shift != 0).all()
    assert set(zip(dy.tolist(), dx.tolist())) == {(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)} - {(0, 0)}


def test_each_step_draws_batch_size_pairs_also_from_few_images(sample, monkeypatch):
    # sampling is with replacement: two images still give batches of batch_size
    # pairs (the reference code's loader draws patches_per_image per image)
    sizes = []
    original = PatchSVDD._sample_pairs

    def recording(self, *args, **kwargs):
        first, second, label = original(self, *args, **kwargs)
        sizes.append(len(first))
        return first, second, label

    monkeypatch.setattr(PatchSVDD, "_sample_pairs", recording)
    PatchSVDD(**{**FAST, "epochs": 1, "patches_per_image": 8, "batch_size": 8}).fit(sample[0].images[:2])
    assert sizes and set(sizes) == {8}  # 2 steps x 2 scales x 2 tasks
    assert len(sizes) == 8
    sizes.clear()
    # fewer pairs in an epoch than batch_size: one step with all of them
    PatchSVDD(**{**FAST, "epochs": 1, "patches_per_image": 3, "batch_size": 16}).fit(sample[0].images[:2])
    assert set(sizes) == {6} and len(sizes) == 4


@pytest.mark.parametrize("make", [lambda: HierarchicalPatchEncoder(SmallPatchEncoder(64, 32, 32), 64),
                                  lambda: HierarchicalPatchEncoder(PEDENetSmallEncoder(64), 64)])
def test_initial_features_depend_on_the_input(make):
    # PyTorch's default initialisation made these deep stacks near-constant (spatial std ~1e-4)
    torch.manual_seed(0)
    big, small = make().dense(torch.randn(2, 3, 160, 160))
    assert big.std(dim=(0, 2, 3)).mean() > 0.05 and small.std(dim=(0, 2, 3)).mean() > 0.05


def test_default_initialisation_is_pytorchs_own():
    torch.manual_seed(0)
    encoder = PEDENetSmallEncoder(64, init="default")
    torch.manual_seed(0)
    reference = [torch.nn.Conv2d(a, b, 3, stride=2 if i == 0 else 1)
                 for i, (a, b) in enumerate(zip([3, 32, 64, 128, 128, 64, 64, 32, 32],
                                                [32, 64, 128, 128, 64, 64, 32, 32, 64]))]
    convs = [m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias) for a, b in zip(convs, reference))
    with pytest.raises(ValueError, match="init"):
        SmallPatchEncoder(64, 32, 8, init="xavier")


def test_position_classifier_uses_the_feature_difference():
    classifier = PositionClassifier(embedding_dim=8)
    a, b = torch.rand(4, 8), torch.rand(4, 8)
    torch.testing.assert_close(classifier(a, b), classifier(a + 1.0, b + 1.0))
    assert classifier(a, b).shape == (4, 8)
    hidden = [m for m in classifier.modules() if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in hidden] == [128, 128, 8]


def test_covering_mean_by_hand():
    scores = torch.tensor([[[1.0, 3.0]]])  # two 4-pixel patches, stride 2, on a 1x6 strip... in 2-D
    scores = torch.tensor([[[1.0, 3.0], [5.0, 7.0]]])
    out = covering_mean(scores, patch_size=4, stride=2, out_size=(6, 6))[0]
    # pixel (0,0): only patch (0,0); pixel (2,2): all four patches; pixel (0,3): patches (0,0),(0,1)
    assert out[0, 0] == 1.0 and out[5, 5] == 7.0
    assert out[2, 2] == pytest.approx(4.0)
    assert out[0, 3] == pytest.approx(2.0)


def test_training_reduces_the_position_loss(sample):
    train, _ = sample
    model = PatchSVDD(**{**FAST, "epochs": 12, "patches_per_image": 4, "learning_rate": 1e-3}).fit(train.images[:8])
    curve = model.training_curve_
    assert len(curve) == 12 and curve[-1]["seconds"] > 0
    assert np.mean([c["ssl"] for c in curve[-3:]]) < np.mean([c["ssl"] for c in curve[:3]])
    assert all(np.isfinite([c["svdd"], c["ssl"]]).all() for c in curve)


def test_scores_maps_and_sign(sample, fitted):
    _, test = sample
    scores, maps = fitted.score_samples_and_maps(test.images)
    assert maps.shape == test.masks.shape and np.isfinite(maps).all()
    np.testing.assert_allclose(fitted.decision_function(test.images), scores - fitted.offset_)
    # image score = max of the (128 -> 224 resized) map up to interpolation
    assert np.all(-scores >= maps.reshape(len(maps), -1).max(1) * 0.95)
    assert image_auroc(test.labels, -scores) > 0.6


@pytest.mark.parametrize("encoder", ["random", "raw"])
def test_baselines(sample, encoder):
    train, test = sample
    model = PatchSVDD(**{**FAST, "encoder": encoder}).fit(train.images[:6])
    assert model.training_curve_ == []
    assert (model.encoder_ is None) == (encoder == "raw")
    if encoder == "raw":  # f(p) = p: bank rows are flattened pixels
        assert model.nn_indexes_[1].bank_.shape[1] == 3 * 16 * 16
    assert model.predict_map(test.images[:2]).shape == (2, 224, 224)


def test_same_random_state_identical_model(sample):
    train, test = sample
    a = PatchSVDD(**FAST).fit(train.images[:6])
    b = PatchSVDD(**FAST).fit(train.images[:6])
    for pa, pb in zip(a.encoder_.parameters(), b.encoder_.parameters()):
        assert torch.equal(pa, pb)
    np.testing.assert_array_equal(a.predict_map(test.images[:2]), b.predict_map(test.images[:2]))


def test_pickle_roundtrip(sample, fitted):
    _, test = sample
    restored = pickle.loads(pickle.dumps(fitted))
    np.testing.assert_array_equal(restored.predict_map(test.images[:3]), fitted.predict_map(test.images[:3]))


def test_grid_search_over_lambda_and_dimension(sample):
    train, test = sample
    X = list(train.images[:4]) + list(test.images)
    masks = [np.zeros((224, 224), np.uint8)] * 4 + list(test.masks)
    search = GridSearchCV(
        PatchSVDD(**{**FAST, "epochs": 1}),
        {"lambda_svdd": [1e-3, 1.0], "embedding_dim": [16, 32]},
        scoring=pixel_auroc_scorer, cv=AnomalyStratifiedKFold(2, random_state=0), error_score="raise",
    ).fit(X, masks)
    assert np.isfinite(search.cv_results_["mean_test_score"]).all()
    assert search.best_estimator_.n_train_images_ == 4 + int((test.labels == 0).sum())
    assert clone(search.best_estimator_).get_params()["lambda_svdd"] in (1e-3, 1.0)


@pytest.mark.parametrize("params, message", [
    ({"encoder": "vgg"}, "encoder"), ({"patch_size": 48}, "patch_size"), ({"lambda_svdd": -1}, "lambda_svdd"),
    ({"stride_small": 3}, "even"), ({"embedding_dim": 0}, "embedding_dim"),
    ({"schedule": "gpu"}, "schedule"), ({"width": 0}, "width"), ({"epochs": -1}, "epochs"),
    ({"image_size": 160, "stride_big": 64}, "at most the patch size"),
    ({"image_size": 160, "stride_small": 24}, "at most the patch size"),
    ({"subtract_mean": "no"}, "subtract_mean must be True or False"),
])
def test_invalid_parameters(sample, params, message):
    with pytest.raises(ValueError, match=message):
        PatchSVDD(**{**FAST, **params}).fit(sample[0].images[:2])


def test_verbose_prints_each_epoch(sample, capsys):
    PatchSVDD(**{**FAST, "verbose": 1}).fit(sample[0].images[:4])
    out = capsys.readouterr().out
    assert "epoch 1/2" in out and "epoch 2/2" in out


def test_subtract_mean_removes_what_all_images_share(sample):
    """Raw patches of centred images: adding one fixed pattern to every image changes nothing."""
    train, test = sample
    rng = np.random.RandomState(0)
    images = list(train.images[:6]) + list(test.images[:3])
    to_float = [np.asarray(image, dtype=np.float32)[:128, :128] / 255.0 * 0.8 for image in images]
    pattern = (0.2 * rng.rand(128, 128, 3)).astype(np.float32)
    shifted = [image + pattern for image in to_float]
    params = dict(FAST, encoder="raw", n_calibration=2)
    plain = PatchSVDD(subtract_mean=True, **params).fit(to_float[:6])
    moved = PatchSVDD(subtract_mean=True, **params).fit(shifted[:6])
    np.testing.assert_allclose(moved.mean_image_, plain.mean_image_ + pattern.transpose(2, 0, 1), atol=1e-5)
    # centred training images are scaled to unit standard deviation
    centred = np.stack(to_float[:6]).transpose(0, 3, 1, 2) - plain.mean_image_
    assert abs(centred.std(ddof=1) * plain.input_scale_ - 1.0) < 1e-3
    reference = plain.predict_map(to_float[6:])
    np.testing.assert_allclose(moved.predict_map(shifted[6:]), reference, rtol=1e-3, atol=1e-5 * reference.max())
    # without centring the shared pattern is part of every patch and the maps change
    plain = PatchSVDD(subtract_mean=False, **params).fit(to_float[:6])
    moved = PatchSVDD(subtract_mean=False, **params).fit(shifted[:6])
    reference = plain.predict_map(to_float[6:])
    assert np.abs(moved.predict_map(shifted[6:]) - reference).max() > 1e-2 * reference.max()
    # the user's float arrays are read, never centred in place
    np.testing.assert_array_equal(shifted[0], to_float[0] + pattern)


def test_schedule_sets_the_parameters_left_at_none(sample):
    train = sample[0]
    small = dict(image_size=128, patch_size=32, stride_big=16, stride_small=8, n_calibration=2, random_state=0)
    model = PatchSVDD(schedule="paper", epochs=0, **small).fit(train.images[:2])
    assert model.schedule_ == dict(width=64, epochs=0, patches_per_image=100, batch_size=64)
    assert model.encoder_.small.net[0].out_channels == 64
    assert model.get_params()["width"] is None  # parameters stay as given
    model = PatchSVDD(epochs=1, batch_size=4, **small).fit(train.images[:2])
    assert model.schedule_ == dict(width=32, epochs=1, patches_per_image=10, batch_size=4)
    assert len(model.training_curve_) == 1
