"""Every estimator trains and predicts on any accepted kind of image list:
grayscale, RGB, RGBA and float arrays of different sizes, with one map per
image at that image's own size."""

import numpy as np
import pytest

from skpatchad import PatchCore, PatchSVDD, PEDENet

# small inputs and short schedules keep each fit to a few seconds
ESTIMATORS = {
    "PatchCore": lambda: PatchCore(image_size=96, coreset=0.25, batch_size=32, random_state=0),
    "PatchSVDD": lambda: PatchSVDD(image_size=128, patch_size=32, stride_big=16, stride_small=8, epochs=1,
                                   patches_per_image=2, batch_size=16, n_calibration=4, random_state=0),
    "PEDENet": lambda: PEDENet(image_size=128, patch_size=36, stride=4, epochs=1, patches_per_image=2,
                               batch_size=16, n_calibration=4, random_state=0),
}


@pytest.fixture(scope="module")
def mixed_inputs(sample):
    """One list of RGB, grayscale, RGBA and float images, all of different sizes,
    and the map shape each must come back at."""
    rgb = sample[0].images[0]
    gray = rgb.mean(axis=2).astype(np.uint8)[:150, :100]
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)[:, :180]
    floats = rgb[:200, :].astype(np.float32) / 255.0
    return [rgb, gray, rgba, floats], [(224, 224), (150, 100), (224, 180), (200, 224)]


@pytest.fixture(scope="module", params=sorted(ESTIMATORS))
def fitted_on_grayscale(request, sample):
    """Fitted on grayscale crops of different sizes."""
    train, _ = sample
    images = [im.mean(axis=2).astype(np.uint8)[:160 + 8 * i, :200 - 4 * i] for i, im in enumerate(train.images[:8])]
    return ESTIMATORS[request.param]().fit(images)


def test_maps_follow_each_input_size_and_format(mixed_inputs, fitted_on_grayscale):
    images, shapes = mixed_inputs
    scores, maps = fitted_on_grayscale.score_samples_and_maps(images)
    assert isinstance(maps, list) and [m.shape for m in maps] == shapes
    assert all(np.isfinite(m).all() for m in maps) and np.isfinite(scores).all()


def test_grayscale_image_scores_as_its_rgb_replica(mixed_inputs, fitted_on_grayscale):
    gray = mixed_inputs[0][1]
    replica = np.repeat(gray[..., None], 3, axis=2)
    gray_map, replica_map = fitted_on_grayscale.predict_map([gray, replica])
    np.testing.assert_allclose(gray_map, replica_map, rtol=1e-5, atol=1e-6)
