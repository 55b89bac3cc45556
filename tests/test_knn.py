"""Tests for skpatchad.features.knn.NearestNeighbors (exact chunked search, pynndescent)."""

import pickle

import numpy as np
import pytest
import torch

from skpatchad.features.knn import NearestNeighbors, _block_sizes


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _brute_force(queries, bank, k, query_groups=None, bank_groups=None):
    """float64 numpy reference: sorted distances and indices of the k nearest."""
    queries = np.asarray(queries, dtype=np.float64)
    bank = np.asarray(bank, dtype=np.float64)
    d = np.sqrt(((queries[:, None, :] - bank[None, :, :]) ** 2).sum(-1))
    if query_groups is not None:
        d[np.asarray(query_groups)[:, None] == np.asarray(bank_groups)[None, :]] = np.inf
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, 1), order, d


def _assert_matches_reference(distances, indices, queries, bank, k, query_groups=None, bank_groups=None):
    ref_d, ref_i, full = _brute_force(queries, bank, k, query_groups, bank_groups)
    distances, indices = distances.cpu().numpy(), indices.cpu().numpy()
    assert distances.shape == indices.shape == (len(queries), k)
    assert distances.dtype == np.float32 and indices.dtype == np.int64
    # ascending
    assert np.all(np.diff(distances, axis=1) >= 0)
    np.testing.assert_allclose(distances, ref_d, rtol=1e-4, atol=1e-4)
    # the returned indices really are at the returned distances...
    np.testing.assert_allclose(np.take_along_axis(full, indices, 1), distances, rtol=1e-4, atol=1e-4)
    # ...no index twice per row, and (random continuous data: no near ties) the same as numpy
    assert all(len(set(row)) == k for row in indices)
    np.testing.assert_array_equal(indices, ref_i)


@pytest.fixture(scope="module")
def data():
    rng = np.random.RandomState(0)
    bank = rng.randn(300, 12).astype(np.float32)
    queries = rng.randn(70, 12).astype(np.float32)
    return bank, queries


@pytest.mark.parametrize("k", [1, 5])
def test_exact_matches_numpy_brute_force(data, k):
    bank, queries = data
    index = NearestNeighbors().fit(bank)
    distances, indices = index.kneighbors(queries, k)
    assert isinstance(distances, torch.Tensor) and isinstance(indices, torch.Tensor)
    assert distances.device.type == "cpu"
    _assert_matches_reference(distances, indices, queries, bank, k)


def test_bank_query_distances_zero_for_bank_points(data):
    bank, _ = data
    index = NearestNeighbors().fit(bank)
    distances, indices = index.kneighbors(bank[:50], 1)
    np.testing.assert_array_equal(indices[:, 0].numpy(), np.arange(50))
    # |q|^2 - 2qb + |b|^2 cancels to ~0 (float32 rounding: ~sqrt(eps) * |b|), never NaN
    norms = np.linalg.norm(bank[:50], axis=1)
    assert np.all(distances[:, 0].numpy() <= 2e-3 * norms)
    assert not torch.isnan(distances).any()


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("max_block_bytes", [4, 64, 1000, 4 * 300 * 7])
def test_chunking_does_not_change_results(data, k, max_block_bytes):
    bank, queries = data
    n_query, n_bank = len(queries), len(bank)
    query_block, bank_block = _block_sizes(n_query, n_bank, k, max_block_bytes)
    # the small budgets really split the search into several blocks
    if max_block_bytes <= 1000:
        assert bank_block < n_bank
    if max_block_bytes <= 64:
        assert query_block < n_query
    full_d, full_i = NearestNeighbors(max_block_bytes=2**30).fit(bank).kneighbors(queries, k)
    small_d, small_i = NearestNeighbors(max_block_bytes=max_block_bytes).fit(bank).kneighbors(queries, k)
    torch.testing.assert_close(small_i, full_i, rtol=0, atol=0)
    # gemm vs gemv kernels may round the last bit differently; nothing more
    torch.testing.assert_close(small_d, full_d, rtol=1e-5, atol=1e-5)
    _assert_matches_reference(small_d, small_i, queries, bank, k)


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("max_block_bytes", [64, 2**30])
@pytest.mark.parametrize("grouped", [False, True])
def test_distances_only_equal_full_search(data, k, max_block_bytes, grouped):
    bank, queries = data
    groups = {}
    if grouped:
        rng = np.random.RandomState(2)
        groups = dict(query_groups=rng.randint(0, 6, size=len(queries)),
                      bank_groups=rng.randint(0, 6, size=len(bank)))
    index = NearestNeighbors(max_block_bytes=max_block_bytes).fit(bank)
    distances, _ = index.kneighbors(queries, k, **groups)
    only = index.kneighbors(queries, k, return_indices=False, **groups)
    assert isinstance(only, torch.Tensor) and only.shape == (len(queries), k)
    torch.testing.assert_close(only, distances, rtol=1e-6, atol=1e-6)
    ref_d = _brute_force(queries, bank, k, groups.get("query_groups"), groups.get("bank_groups"))[0]
    np.testing.assert_allclose(only.numpy(), ref_d, rtol=1e-4, atol=1e-4)


def test_block_sizes_respect_budget_for_large_bank():
    mib = 2**20
    query_block, bank_block = _block_sizes(20_000, 200_000, 1, 16 * mib)
    assert query_block * bank_block * 4 <= 16 * mib
    assert query_block >= 1 and bank_block >= 1
    # and do not waste the budget: at least a quarter of it is used per block
    assert query_block * bank_block * 4 >= 4 * mib


def test_block_sizes_bounded():
    for n_query in (1, 7, 1000, 1024, 1500, 20_000, 10**6):
        for n_bank in (1, 10, 4096, 200_000, 10**6):
            for k in (1, 3, 10):
                k = min(k, n_bank)
                for max_block_bytes in (2**16, 2**20, 16 * 2**20, 256 * 2**20):
                    case = (n_query, n_bank, k, max_block_bytes)
                    query_block, bank_block = _block_sizes(n_query, n_bank, k, max_block_bytes)
                    assert 1 <= query_block <= n_query, case
                    assert k <= bank_block <= n_bank, case
                    assert query_block * bank_block * 4 <= max_block_bytes, case
                    # whole problem fits: a single block
                    if n_query * n_bank * 4 <= max_block_bytes and n_query <= 1024:
                        assert (query_block, bank_block) == (n_query, n_bank), case


def test_block_sizes_minimum_is_one_row_of_k():
    # below one row of k distances the budget cannot be met; the search still runs
    assert _block_sizes(100, 1000, 5, 4) == (1, 5)
    assert _block_sizes(0, 1000, 5, 4096)[1] == 1000


def test_empty_query_set(data):
    bank, _ = data
    distances, indices = NearestNeighbors().fit(bank).kneighbors(np.empty((0, 12), np.float32), 3)
    assert distances.shape == indices.shape == (0, 3)


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("max_block_bytes", [64, 2**30])
def test_group_exclusion_matches_numpy(data, k, max_block_bytes):
    bank, queries = data
    rng = np.random.RandomState(1)
    bank_groups = rng.randint(0, 6, size=len(bank))
    query_groups = rng.randint(0, 6, size=len(queries))
    index = NearestNeighbors(max_block_bytes=max_block_bytes).fit(bank)
    distances, indices = index.kneighbors(queries, k, query_groups, bank_groups)
    _assert_matches_reference(distances, indices, queries, bank, k, query_groups, bank_groups)
    assert not np.any(bank_groups[indices.numpy()] == query_groups[:, None])


def test_leave_one_image_out_on_bank_itself(data):
    """Bank vectors queried with their own group never find themselves."""
    bank, _ = data
    groups = np.repeat(np.arange(30), 10)
    index = NearestNeighbors(max_block_bytes=8192).fit(bank)
    distances, indices = index.kneighbors(bank, 2, groups, groups)
    assert not np.any(groups[indices.numpy()] == groups[:, None])
    assert float(distances.min()) > 0.0
    _assert_matches_reference(distances, indices, bank, bank, 2, groups, groups)


def test_groups_accept_torch_tensors_and_lists(data):
    bank, queries = data
    bank_groups = np.arange(len(bank)) % 3
    query_groups = np.arange(len(queries)) % 3
    index = NearestNeighbors().fit(bank)
    expected = index.kneighbors(queries, 2, query_groups, bank_groups)
    got = index.kneighbors(queries, 2, torch.from_numpy(query_groups), list(bank_groups))
    torch.testing.assert_close(got, expected)


def test_fully_excluded_query_gets_infinite_distance(data):
    bank, queries = data
    index = NearestNeighbors().fit(bank[:10])
    distances, _ = index.kneighbors(queries[:3], 1, np.zeros(3, int), np.zeros(10, int))
    assert torch.isinf(distances).all()


def test_groups_must_come_together_with_matching_lengths(data):
    bank, queries = data
    index = NearestNeighbors().fit(bank)
    with pytest.raises(ValueError, match="together"):
        index.kneighbors(queries, 1, query_groups=np.zeros(len(queries)))
    with pytest.raises(ValueError, match="together"):
        index.kneighbors(queries, 1, bank_groups=np.zeros(len(bank)))
    with pytest.raises(ValueError, match="one entry per query"):
        index.kneighbors(queries, 1, np.zeros(len(queries) - 1), np.zeros(len(bank)))
    with pytest.raises(ValueError, match="one entry per query"):
        index.kneighbors(queries, 1, np.zeros(len(queries)), np.zeros(len(bank) + 1))


def test_numpy_and_torch_inputs_agree(data):
    bank, queries = data
    from_numpy = NearestNeighbors().fit(bank)
    from_torch = NearestNeighbors().fit(torch.from_numpy(bank))
    assert isinstance(from_torch.bank_, np.ndarray) and from_torch.bank_.dtype == np.float32
    expected = from_numpy.kneighbors(queries, 3)
    for index in (from_numpy, from_torch):
        for q in (queries, torch.from_numpy(queries), queries.astype(np.float64),
                  torch.from_numpy(queries).double(), np.asfortranarray(queries), queries.tolist()):
            torch.testing.assert_close(index.kneighbors(q, 3), expected)


def test_float64_bank_is_stored_as_float32(data):
    bank, _ = data
    index = NearestNeighbors().fit(bank.astype(np.float64))
    assert index.bank_.dtype == np.float32 and index.bank_.flags.c_contiguous


def test_refit_replaces_bank(data):
    bank, queries = data
    index = NearestNeighbors().fit(bank)
    index.kneighbors(queries, 1)  # fills the device cache
    index.fit(bank[:20])
    _, indices = index.kneighbors(queries, 1)
    assert int(indices.max()) < 20


def test_errors(data):
    bank, queries = data
    with pytest.raises(ValueError, match="knn method"):
        NearestNeighbors(method="faiss")
    index = NearestNeighbors().fit(bank)
    with pytest.raises(ValueError, match=r"n_neighbors must be in \[1, 300\]"):
        index.kneighbors(queries, len(bank) + 1)
    with pytest.raises(ValueError, match="n_neighbors"):
        index.kneighbors(queries, 0)
    with pytest.raises(ValueError, match=r"queries must have shape \(n, 12\)"):
        index.kneighbors(queries[:, :5], 1)
    with pytest.raises(ValueError, match="queries must have shape"):
        index.kneighbors(queries[0], 1)
    for bad_bank in (np.zeros((0, 4)), np.zeros(5), np.zeros((2, 3, 4))):
        with pytest.raises(ValueError, match="non-empty 2-D"):
            NearestNeighbors().fit(bad_bank)


def test_k_equal_bank_size_returns_permutation(data):
    bank, queries = data
    small = bank[:8]
    distances, indices = NearestNeighbors(max_block_bytes=32).fit(small).kneighbors(queries[:5], 8)
    for row in indices.numpy():
        np.testing.assert_array_equal(np.sort(row), np.arange(8))
    _assert_matches_reference(distances, indices, queries[:5], small, 8)


def test_pickle_round_trip(data):
    bank, queries = data
    index = NearestNeighbors(max_block_bytes=1000).fit(bank)
    before = index.kneighbors(queries, 3)  # cache filled: must not break pickling
    clone = pickle.loads(pickle.dumps(index))
    assert clone._cache is None
    assert clone.device == torch.device("cpu") and isinstance(clone.device, torch.device)
    assert clone.max_block_bytes == 1000
    np.testing.assert_array_equal(clone.bank_, index.bank_)
    after = clone.kneighbors(queries, 3)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_unpickle_cuda_index_without_cuda_falls_back_to_cpu(data):
    bank, queries = data
    index = NearestNeighbors().fit(bank)
    state = index.__getstate__()
    state["device"] = "cuda:0"
    clone = NearestNeighbors.__new__(NearestNeighbors)
    clone.__setstate__(state)
    if not torch.cuda.is_available():
        assert clone.device == torch.device("cpu")
        torch.testing.assert_close(clone.kneighbors(queries, 2), index.kneighbors(queries, 2))


def test_to_device_resets_cache(data):
    bank, queries = data
    index = NearestNeighbors().fit(bank)
    index.kneighbors(queries, 1)
    assert index._cache is not None
    assert index.to("cpu") is index and index._cache is not None  # same device: cache kept
    index.device = torch.device("meta")  # pretend another device was used
    index.to("cpu")
    assert index._cache is None and index.device == torch.device("cpu")


def test_pynndescent_recall_and_interface():
    """One test only: pynndescent compiles numba code (~20 s) on first use."""
    rng = np.random.RandomState(0)
    bank = rng.randn(2000, 16).astype(np.float32)
    queries = rng.randn(300, 16).astype(np.float32)
    exact = NearestNeighbors().fit(bank)
    # numba's threading would reset torch's thread count to all cores (a Dask
    # worker's set_num_threads(1) lost): building and querying must keep it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        approx = NearestNeighbors("pynndescent", random_state=0).fit(bank)
        approx.kneighbors(queries, 1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    for k in (1, 5):
        ref_d, ref_i = exact.kneighbors(queries, k)
        d, i = approx.kneighbors(torch.from_numpy(queries), k)
        assert d.shape == i.shape == (len(queries), k)
        assert d.dtype == torch.float32 and i.dtype == torch.int64
        assert torch.all(d[:, 1:] >= d[:, :-1])
        recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(i.numpy(), ref_i.numpy())])
        assert recall >= 0.95, (k, recall)
        # distances are true Euclidean distances of the returned indices
        true = np.linalg.norm(queries[:, None, :] - bank[i.numpy()], axis=2)
        np.testing.assert_allclose(d.numpy(), true, rtol=1e-4, atol=1e-4)
        assert np.all(d.numpy() >= ref_d.numpy() - 1e-4)
    # numpy queries give the same answer as torch ones
    torch.testing.assert_close(approx.kneighbors(queries, 3), approx.kneighbors(torch.from_numpy(queries), 3))
    # group exclusion falls back to the exact search
    groups_q, groups_b = np.arange(300) % 4, np.arange(2000) % 4
    torch.testing.assert_close(approx.kneighbors(queries, 2, groups_q, groups_b),
                               exact.kneighbors(queries, 2, groups_q, groups_b))
    with pytest.raises(ValueError):
        approx.kneighbors(queries[:, :8], 1)
    clone = pickle.loads(pickle.dumps(approx))
    torch.testing.assert_close(clone.kneighbors(queries, 5), approx.kneighbors(queries, 5), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_search_close_to_float32(data, dtype):
    bank, queries = data
    exact_d, exact_i = NearestNeighbors().fit(bank).kneighbors(queries, 3)
    half = NearestNeighbors(dtype=dtype).fit(bank)
    distances, indices = half.kneighbors(queries, 3)
    assert distances.dtype == torch.float32 and half._device_bank()[0].dtype == dtype
    torch.testing.assert_close(distances, exact_d, rtol=0.03, atol=0.03)
    # half-precision rounding may swap near ties, but the nearest is almost always the same
    assert (indices[:, 0] == exact_i[:, 0]).float().mean() > 0.9
    restored = pickle.loads(pickle.dumps(half))
    torch.testing.assert_close(restored.kneighbors(queries, 3)[0], distances)


def _patch_like(n, dim, rng):
    """Correlated vectors (smooth 1-D signals), where a few components hold most of the variance."""
    base = rng.randn(n, 8) @ rng.randn(8, dim)
    return (base + 0.3 * rng.randn(n, dim)).astype(np.float32)


@pytest.mark.parametrize("kind", ["patch_like", "white"])
@pytest.mark.parametrize("grouped", [False, True])
def test_pruned_search_is_exact(kind, grouped):
    rng = np.random.RandomState(0)
    make = _patch_like if kind == "patch_like" else (lambda n, d, r: r.randn(n, d).astype(np.float32))
    bank, queries = make(3000, 96, rng), make(200, 96, rng)
    groups = (rng.randint(0, 5, len(queries)), rng.randint(0, 5, len(bank))) if grouped else (None, None)
    index = NearestNeighbors("exact", pruning_dim=8, random_state=0).fit(bank)
    assert index.pruning_["reduced_bank"].shape == (3000, 9)
    searched = []  # dimensions of the banks searched by brute force
    brute = index._brute
    index._brute = lambda b, *args: searched.append(b.shape[1]) or brute(b, *args)
    refined = []  # queries the pruning candidates left undecided
    refine = index._refine
    index._refine = lambda q, q_sq, r, undecided, *args: (refined.append(len(undecided))
                                                           or refine(q, q_sq, r, undecided, *args))
    d, i = index.kneighbors(queries, 1, *groups)
    # only the reduced bank is searched by brute force; the rest is the bounded re-rank
    assert searched == [9]
    if kind == "white":  # 8 of 96 white-noise dimensions bound little: most queries need the re-rank
        assert refined and refined[0] > len(queries) // 2
    index._brute, index._refine = brute, refine
    d_only = index.kneighbors(queries, 1, *groups, return_indices=False)
    full = np.sqrt(((queries[:, None, :] - bank[None]) ** 2).sum(-1))
    if grouped:
        full[groups[0][:, None] == groups[1][None]] = np.inf
    np.testing.assert_array_equal(i[:, 0].numpy(), full.argmin(1))
    np.testing.assert_allclose(d[:, 0].numpy(), full.min(1), rtol=1e-5)
    np.testing.assert_allclose(d_only.numpy(), d.numpy())
    # k > 1 falls back to brute force and still agrees
    d3, _ = index.kneighbors(queries, 3, *groups)
    np.testing.assert_allclose(d3.numpy(), np.sort(full, 1)[:, :3], rtol=1e-5)


def test_pruning_bound_never_exceeds_the_distance():
    from skpatchad.features.knn import _reduce
    rng = np.random.RandomState(1)
    bank = _patch_like(500, 64, rng)
    index = NearestNeighbors("exact", pruning_dim=4).fit(bank)
    mean, components = (torch.from_numpy(index.pruning_[k]) for k in ("mean", "components"))
    a, b = torch.from_numpy(bank[:250]), torch.from_numpy(bank[250:])
    torch.testing.assert_close(_reduce(a, mean, components), torch.from_numpy(index.pruning_["reduced_bank"][:250]))
    bound = (_reduce(a, mean, components) - _reduce(b, mean, components)).norm(dim=1)
    assert (bound <= (a - b).norm(dim=1) * (1 + 1e-5)).all()
    assert (bound >= 0.5 * (a - b).norm(dim=1)).float().mean() > 0.5  # and is not trivially small on such data


def test_pruned_index_pickles():
    rng = np.random.RandomState(2)
    bank = _patch_like(800, 48, rng)
    index = NearestNeighbors("exact", pruning_dim=6).fit(bank)
    index.kneighbors(bank[:5], 1)
    clone = pickle.loads(pickle.dumps(index))
    assert clone._pruning_cache is None
    torch.testing.assert_close(clone.kneighbors(bank[:50], 1)[0], index.kneighbors(bank[:50], 1)[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_search_with_large_norms(dtype):
    """Features far from the origin (PatchCore's are non-negative, |b| ~ 100): the squared
    norms exceed float16's range and |q|^2 - 2 q.b + |b|^2 cancels, so half-precision
    distances must not come from that expansion."""
    rng = np.random.RandomState(0)
    bank = (40.0 + rng.randn(2000, 64)).astype(np.float32)  # |b| ~ 320, |b|^2 ~ 10^5
    queries = bank[:300] + 0.3 * rng.randn(300, 64).astype(np.float32)
    true = np.sqrt(((queries.astype(np.float64)[:, None] - bank[None]) ** 2).sum(-1))
    true_i = np.argsort(true, 1)[:, :3]
    true_d = np.take_along_axis(true, true_i, 1)
    half = NearestNeighbors(dtype=dtype).fit(bank)
    distances, indices = half.kneighbors(queries, 3)
    assert torch.isfinite(distances).all()
    np.testing.assert_allclose(distances.numpy(), true_d, rtol=0.02)
    assert (indices.numpy() == true_i).mean() > 0.99
    # leave-one-group-out in half precision agrees with float32
    groups_q, groups_b = np.arange(300) % 5, np.arange(2000) % 5
    exact_d, exact_i = NearestNeighbors().fit(bank).kneighbors(queries, 2, groups_q, groups_b)
    d, i = half.kneighbors(queries, 2, groups_q, groups_b)
    assert not np.any(groups_b[i.numpy()] == groups_q[:, None])
    np.testing.assert_allclose(d.numpy(), exact_d.numpy(), rtol=0.02)
    # bank vectors come back uncentred, in float32
    vectors = half.bank_vectors(torch.tensor([0, 5]))
    assert vectors.dtype == torch.float32
    np.testing.assert_allclose(vectors.numpy(), bank[[0, 5]], rtol=0.01)


def test_half_precision_rejects_pruning():
    with pytest.raises(ValueError, match="pruning_dim"):
        NearestNeighbors(dtype=torch.float16, pruning_dim=4).fit(np.zeros((10, 8), np.float32))
