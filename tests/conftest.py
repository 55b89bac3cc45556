import os

import numpy as np
import pytest
import torch

# Keep the suite predictable on 2-core CI machines.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def sample():
    from skpatchad.datasets import load_sample

    return load_sample("train"), load_sample("test")


@pytest.fixture(scope="session")
def small_patchcore_params():
    """Fast settings for tests: small input, few patches, deterministic."""
    return dict(image_size=96, coreset=0.25, random_state=0, batch_size=32)


@pytest.fixture(scope="session")
def fitted_patchcore(sample, small_patchcore_params):
    from skpatchad import PatchCore

    train, _ = sample
    return PatchCore(**small_patchcore_params).fit(train.images)


@pytest.fixture(scope="session")
def mixed_inputs(sample):
    """One list of every accepted kind of array (RGB, grayscale, RGBA, float; all
    different sizes) and the map shape each must come back at."""
    rgb = sample[0].images[0]
    gray = (rgb.mean(axis=2)).astype(np.uint8)[:150, :100]
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)[:, :180]
    floats = rgb[:200, :].astype(np.float32) / 255.0
    return [rgb, gray, rgba, floats], [(224, 224), (150, 100), (224, 180), (200, 224)]


@pytest.fixture()
def rng():
    return np.random.default_rng(0)


@pytest.fixture()
def one_torch_thread():
    """Many tiny torch ops: one thread is faster than several on a loaded machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
