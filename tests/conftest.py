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
