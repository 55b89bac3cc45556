"""Tests for skpatchad.features.coreset (greedy k-center coreset, random projection)."""

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist, pdist

from skpatchad.features.coreset import greedy_coreset, random_projection


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _textbook_greedy(points, n_select, start):
    """float64 numpy reference: add the farthest point (lowest index on ties)."""
    points = np.asarray(points, dtype=np.float64)
    min_dist = np.full(len(points), np.inf)
    selected = []
    current = start
    for _ in range(n_select):
        selected.append(current)
        min_dist = np.minimum(min_dist, np.sqrt(((points - points[current]) ** 2).sum(1)))
        current = int(np.argmax(min_dist))
    return np.array(selected)


def _gaussian(n=3000, d=16, seed=0):
    return np.random.RandomState(seed).randn(n, d).astype(np.float32)


def _clustered(n=4000, d=16, n_clusters=25, seed=1):
    rng = np.random.RandomState(seed)
    centres = rng.randn(n_clusters, d) * 20.0
    labels = rng.randint(0, n_clusters, size=n)
    spread = np.exp(rng.randn(n_clusters))[labels, None] * 0.3  # clusters of different radii
    return (centres[labels] + rng.randn(n, d) * spread).astype(np.float32)


def _duplicates(n_unique=300, copies=8, d=8, seed=2):
    rng = np.random.RandomState(seed)
    unique = rng.randn(n_unique, d).astype(np.float32)
    points = np.repeat(unique, copies, axis=0)
    return points[rng.permutation(len(points))]


def _grid_ties(seed=3):
    """Small-integer coordinates: many exactly equal distances, all exact in float32."""
    rng = np.random.RandomState(seed)
    return rng.randint(0, 6, size=(1500, 3)).astype(np.float32)


def _low_dim(n=5000, seed=4):
    return np.random.RandomState(seed).rand(n, 2).astype(np.float32)


DATASETS = {
    "gaussian": _gaussian,
    "clustered": _clustered,
    "duplicates": _duplicates,
    "grid_ties": _grid_ties,
    "low_dim": _low_dim,
}


@pytest.fixture(scope="module", params=sorted(DATASETS))
def dataset(request):
    return request.param, DATASETS[request.param]()


def test_pruned_equals_plain(dataset):
    name, points = dataset
    n = len(points)
    for n_select, start in [(1, 0), (2, n - 1), (50, 17), (min(600, n), 5)]:
        pruned = greedy_coreset(points, n_select, start=start, method="pruned")
        plain = greedy_coreset(points, n_select, start=start, method="plain")
        np.testing.assert_array_equal(pruned, plain, err_msg="%s n_select=%d" % (name, n_select))
        assert pruned.dtype == np.int64 and pruned.shape == (n_select,)
        assert pruned[0] == start
    assert np.array_equal(greedy_coreset(points, 300, start=3), greedy_coreset(points, 300, 3, "pruned"))


def test_pruned_equals_plain_when_selecting_everything():
    # with duplicates the farthest distance eventually drops to 0 everywhere; the tie
    # rule (lowest index) must still agree
    for points in (_duplicates(n_unique=60, copies=5), _grid_ties()[:400], _gaussian(500, 4)):
        n = len(points)
        np.testing.assert_array_equal(greedy_coreset(points, n, 7, "pruned"),
                                      greedy_coreset(points, n, 7, "plain"))


@pytest.mark.parametrize("make", [_grid_ties, _clustered, _low_dim], ids=["grid", "clusters", "2d"])
def test_matches_textbook_float64_reference(make):
    points = make()
    n_select = 200
    reference = _textbook_greedy(points, n_select, start=11)
    np.testing.assert_array_equal(greedy_coreset(points, n_select, start=11, method="plain"), reference)
    np.testing.assert_array_equal(greedy_coreset(points, n_select, start=11, method="pruned"), reference)


def test_ties_broken_by_lowest_index():
    points = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [3, 0], [0, 3]], dtype=np.float32)
    # from 0: points 4 and 5 tie at 3 -> 4; then 5; then 3 (sqrt 2); then 1 and 2 tie at 1 -> 1
    expected = [0, 4, 5, 3, 1, 2]
    swapped = points[[0, 1, 2, 3, 5, 4]]  # swap the indices of the tied pair
    for method in ("pruned", "plain", "torch"):
        np.testing.assert_array_equal(greedy_coreset(points, 6, start=0, method=method), expected,
                                      err_msg=method)
        np.testing.assert_array_equal(greedy_coreset(swapped, 6, start=0, method=method), expected,
                                      err_msg=method)


def test_selected_unique_and_first_is_start():
    points = _gaussian(2000, 8)
    for start in (0, 999, 1999):
        selected = greedy_coreset(points, 400, start=start)
        assert selected[0] == start
        assert len(np.unique(selected)) == 400
        assert selected.min() >= 0 and selected.max() < 2000


def test_selection_is_a_prefix_of_larger_selections():
    points = _clustered(1500)
    longest = greedy_coreset(points, 300, start=4)
    for n_select in (1, 2, 10, 99, 299):
        np.testing.assert_array_equal(greedy_coreset(points, n_select, start=4), longest[:n_select])


@pytest.mark.parametrize("make", [_gaussian, _clustered, _low_dim], ids=["gaussian", "clusters", "2d"])
def test_coverage_radius(make):
    """The covering radius never grows, and the next point is chosen at exactly that radius."""
    points = make()[:1500]
    selected = greedy_coreset(points, 120, start=0)
    dist = cdist(points.astype(np.float64), points[selected].astype(np.float64))
    # radius[n] = max over points of the distance to the nearest of the first n+1 selected
    nearest = np.minimum.accumulate(dist, axis=1)
    radius = nearest.max(axis=0)
    assert np.all(np.diff(radius) <= 1e-5 * radius[:-1])
    # point n+1 is the farthest from the first n+1: its distance to them is the radius
    chosen_at = nearest[selected[1:], np.arange(len(selected) - 1)]
    np.testing.assert_allclose(chosen_at, radius[:-1], rtol=1e-5)
    # distinct points: the radius stays positive while points remain uncovered
    assert radius[-1] > 0


def test_select_all_returns_a_permutation():
    points = _gaussian(400, 6)
    for method in ("pruned", "plain", "torch"):
        selected = greedy_coreset(points, len(points), start=5, method=method)
        np.testing.assert_array_equal(np.sort(selected), np.arange(len(points)))
        assert selected[0] == 5


def test_single_point():
    points = np.ones((1, 4), np.float32)
    for method in ("auto", "pruned", "plain", "torch"):
        np.testing.assert_array_equal(greedy_coreset(points, 1, method=method), [0])


def test_input_types_agree():
    points = _gaussian(1000, 8)
    expected = greedy_coreset(points, 100, start=2, method="pruned")
    for variant in (torch.from_numpy(points), points.astype(np.float64), np.asfortranarray(points),
                    torch.from_numpy(points).double()):
        np.testing.assert_array_equal(greedy_coreset(variant, 100, start=2), expected)
    # numpy integer arguments are fine
    np.testing.assert_array_equal(greedy_coreset(points, np.int64(100), start=np.int32(2)), expected)


def test_torch_method_equals_plain():
    for points in (_gaussian(2000, 16), _clustered(1000)):
        plain = greedy_coreset(points, 150, start=3, method="plain")
        np.testing.assert_array_equal(greedy_coreset(points, 150, start=3, method="torch"), plain)
        np.testing.assert_array_equal(greedy_coreset(torch.from_numpy(points), 150, 3, "torch"), plain)


def test_errors():
    points = _gaussian(50, 4)
    for n_select in (0, -1, 51):
        with pytest.raises(ValueError, match=r"n_select must be in \[1, 50\]"):
            greedy_coreset(points, n_select)
    for start in (-1, 50, 1000):
        with pytest.raises(ValueError, match=r"start must be in \[0, 50\)"):
            greedy_coreset(points, 5, start=start)
    with pytest.raises(ValueError, match="unknown coreset method"):
        greedy_coreset(points, 5, method="fast")


# ---------------------------------------------------------------------------
# random_projection
# ---------------------------------------------------------------------------


def test_random_projection_deterministic_and_seeded():
    features = torch.from_numpy(_gaussian(200, 64))
    a = random_projection(features, 16, random_state=0)
    b = random_projection(features, 16, random_state=0)
    c = random_projection(features, 16, random_state=1)
    assert a.shape == (200, 16) and a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    # a linear map: projecting a subset gives the subset of the projection
    torch.testing.assert_close(random_projection(features[50:60], 16, 0), a[50:60])


def test_random_projection_identity_when_not_reducing():
    features = torch.from_numpy(_gaussian(10, 32))
    assert random_projection(features, None, 0) is features
    assert random_projection(features, 32, 0) is features
    assert random_projection(features, 100, 0) is features


def test_random_projection_preserves_distances():
    """Johnson-Lindenstrauss: 1024 -> 128 keeps pairwise distances to ~10 %."""
    rng = np.random.RandomState(0)
    features = rng.randn(150, 1024).astype(np.float32) * np.linspace(0.1, 3, 1024).astype(np.float32)
    projected = random_projection(torch.from_numpy(features), 128, random_state=42).numpy()
    before, after = pdist(features.astype(np.float64)), pdist(projected.astype(np.float64))
    relative = np.abs(after / before - 1.0)
    # each ratio is ~ sqrt(chi2_128 / 128): standard deviation ~ 1 / sqrt(256) = 0.0625
    assert relative.mean() < 0.08
    assert np.median(relative) < 0.07
    assert relative.max() < 0.4
    # unbiased for squared distances
    assert abs(np.mean(after**2 / before**2) - 1.0) < 0.05
