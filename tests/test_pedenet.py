"""PEDENet: PE/DE/LP networks, numerically stable GMM energy, training, sklearn behaviour."""

import pickle

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV

from skpatchad import PEDENet
from skpatchad.estimators.pedenet import DensityEstimator, covariance_penalty, gmm_energy, gmm_parameters
from skpatchad.features.maps import covering_mean
from skpatchad.features.patch_encoders import HierarchicalPatchEncoder, PEDENetSmallEncoder, PositionClassifier
from skpatchad.features.preprocessing import iter_image_batches
from skpatchad.metrics import image_auroc, pixel_auroc_scorer
from skpatchad.model_selection import AnomalyStratifiedKFold

# 128-pixel images and the 36-pixel sub-patch encoder keep every fit to a few seconds
FAST = dict(image_size=128, patch_size=36, stride=4, epochs=1, patches_per_image=2, batch_size=16,
            n_calibration=4, random_state=0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small convolutions and many tiny GMM ops: one thread is faster, and on a
    loaded 2-core machine two threads contend (the file then takes 5x longer)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def fitted(sample, _one_thread):
    train, _ = sample
    return PEDENet(**FAST).fit(train.images[:12])


def _leaf_modules(module):
    return [m for m in module.modules() if not list(m.children())]


# --------------------------------------------------------------------- networks
def test_pe_network_layers_and_parameter_count():
    small = PEDENetSmallEncoder(embedding_dim=64)
    convs = [m for m in _leaf_modules(small) if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 128, 64, 64, 32, 32, 64]
    assert all(c.kernel_size == (3, 3) and c.padding == (0, 0) for c in convs)
    assert [c.stride for c in convs] == [(2, 2)] + [(1, 1)] * 8
    assert all(isinstance(m, (torch.nn.Conv2d, torch.nn.LeakyReLU)) for m in _leaf_modules(small))  # conv only
    assert all(m.negative_slope == 0.1 for m in _leaf_modules(small) if isinstance(m, torch.nn.LeakyReLU))
    assert small.patch_size == 36 and small.stride == 2
    out = small(torch.randn(3, 3, 36, 36) * 10)
    assert out.shape == (3, 64, 1, 1) and out.abs().max() <= 1.0  # 36 -> 1x1 exactly, tanh output
    # PE + DE + LP parameters, compared with the paper's 0.47 M
    pe = HierarchicalPatchEncoder(small, 64)
    nets = (pe, DensityEstimator(64, 4), PositionClassifier(64))
    n_params = sum(p.numel() for net in nets for p in net.parameters())
    print("PEDENet parameters: PE %d, total %d" % (sum(p.numel() for p in pe.parameters()), n_params))
    assert 0.44e6 < n_params < 0.50e6


def test_custom_filter_list_sets_the_patch_size():
    small = PEDENetSmallEncoder(8, filters=(4, 4, 4))
    assert small.patch_size == 16
    assert small(torch.rand(1, 3, 16, 16)).shape == (1, 8, 1, 1)
    with pytest.raises(ValueError, match="filters"):
        PEDENetSmallEncoder(8, filters=())


def test_dense_features_equal_patchwise_features():
    torch.manual_seed(0)
    encoder = HierarchicalPatchEncoder(PEDENetSmallEncoder(16, filters=(8, 16, 16, 16, 8, 8, 8, 8)), 16)
    assert encoder.patch_size == 72
    image = torch.rand(1, 3, 110, 110)
    big_map, small_map = encoder.dense(image)
    assert big_map.shape[-1] == (110 - 72) // 2 + 1 and small_map.shape[-1] == (110 - 36) // 2 + 1
    for y, x in [(0, 0), (5, 11), (19, 19)]:
        patch = image[:, :, 2 * y:2 * y + 72, 2 * x:2 * x + 72]
        torch.testing.assert_close(encoder(patch)[0], big_map[0, :, y, x], rtol=1e-4, atol=1e-5)
        sub = image[:, :, 2 * y:2 * y + 36, 2 * x:2 * x + 36]
        torch.testing.assert_close(encoder.small(sub)[0, :, 0, 0], small_map[0, :, y, x], rtol=1e-4, atol=1e-5)


def test_density_estimator_outputs_memberships():
    de = DensityEstimator(16, n_components=5)
    linears = [m for m in de.modules() if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [128, 64, 32, 5]
    gamma = de(torch.randn(7, 16))
    assert gamma.shape == (7, 5) and (gamma >= 0).all()
    torch.testing.assert_close(gamma.sum(1), torch.ones(7))


# -------------------------------------------------------------------------- GMM
def test_gmm_parameters_and_energy_match_scipy():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(30, 3)) * [1.0, 0.5, 2.0]
    gamma = rng.dirichlet(np.ones(2), size=30)
    phi, mu, sigma = gmm_parameters(torch.from_numpy(z), torch.from_numpy(gamma))
    # M-step by hand
    ref_phi = gamma.mean(0)
    ref_mu = np.stack([(gamma[:, k, None] * z).sum(0) / gamma[:, k].sum() for k in range(2)])
    ref_sigma = np.stack([np.cov(z.T, aweights=gamma[:, k], bias=True) for k in range(2)])
    np.testing.assert_allclose(phi.numpy(), ref_phi, rtol=1e-12)
    np.testing.assert_allclose(mu.numpy(), ref_mu, rtol=1e-10)
    np.testing.assert_allclose(sigma.numpy(), ref_sigma, rtol=1e-10, atol=1e-12)
    # energy = -log sum_k phi_k N(z; mu_k, Sigma_k), float64 reference by scipy
    for jitter in (0.0, 1e-4):
        energy = gmm_energy(torch.from_numpy(z), phi, mu, sigma, jitter=jitter).numpy()
        density = sum(ref_phi[k] * multivariate_normal(ref_mu[k], ref_sigma[k] + jitter * np.eye(3)).pdf(z)
                      for k in range(2))
        np.testing.assert_allclose(energy, -np.log(density), rtol=1e-9)
    # and in float32, as used for the loss if the caller does not upcast
    energy32 = gmm_energy(torch.from_numpy(z).float(), phi.float(), mu.float(), sigma.float(), jitter=1e-4)
    np.testing.assert_allclose(energy32.numpy(), -np.log(density), rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_energy_is_finite_for_singular_covariances(dtype):
    # duplicate points: one component collapses to Sigma = 0, the other is rank-1
    z = torch.tensor([[0.3, -0.2, 0.1]] * 6 + [[0.1 * i, 0.2 * i, 0.0] for i in range(4)], dtype=dtype,
                     requires_grad=True)
    gamma = torch.zeros(10, 2, dtype=dtype)
    gamma[:6, 0], gamma[6:, 1] = 1.0, 1.0
    phi, mu, sigma = gmm_parameters(z, gamma)
    assert sigma[0].abs().max() < 1e-6 and torch.linalg.matrix_rank(sigma[1], atol=1e-6) == 1
    assert (torch.linalg.cholesky_ex(sigma.detach()).info > 0).all()  # without the jitter: no Cholesky
    energy = gmm_energy(z, phi, mu, sigma)
    penalty = covariance_penalty(sigma)
    assert torch.isfinite(energy).all() and torch.isfinite(penalty)
    (energy.mean() + penalty).backward()
    assert torch.isfinite(z.grad).all()
    # far from every component the energy is large but finite (log-sum-exp, no underflow to log 0)
    assert torch.isfinite(gmm_energy(z.detach() + 50.0, phi.detach(), mu.detach(), sigma.detach())).all()


def test_empty_component_is_ignored():
    z = torch.randn(20, 2, dtype=torch.float64)
    gamma = torch.cat([torch.ones(20, 1), torch.zeros(20, 1)], 1).double()
    phi, mu, sigma = gmm_parameters(z, gamma)
    one = gmm_energy(z, phi[:1], mu[:1], sigma[:1])
    torch.testing.assert_close(gmm_energy(z, phi, mu, sigma), one)


# --------------------------------------------------------------------- training
def test_empty_component_gives_finite_gradients():
    # a DE softmax that underflows to 0 for one component must not put NaN in the weights
    z = torch.randn(30, 3, dtype=torch.float64, requires_grad=True)
    logits = torch.zeros(30, 3, dtype=torch.float64)
    logits[:, 2] = -800.0  # exp underflows: gamma[:, 2] == 0 exactly
    logits.requires_grad_(True)
    gamma = torch.softmax(logits, dim=1)
    assert (gamma[:, 2] == 0).all()
    phi, mu, sigma = gmm_parameters(z, gamma)
    energy = gmm_energy(z, phi, mu, sigma)
    energy.mean().backward()
    assert torch.isfinite(energy).all()
    assert torch.isfinite(z.grad).all() and torch.isfinite(logits.grad).all()
    # and the energy is that of the two non-empty components
    torch.testing.assert_close(energy, gmm_energy(z.detach(), phi[:2].detach(), mu[:2].detach(), sigma[:2].detach()))


def test_training_loss_stays_finite_for_hundreds_of_steps(sample):
    train, _ = sample
    # 4-patch batches in 64-D: every batch covariance is singular, lr 10x the
    # paper's, DAGMM's 100x larger energy and covariance weights; 240 steps
    # (1 per epoch) must all stay finite
    model = PEDENet(image_size=80, patch_size=36, stride=4, epochs=240, patches_per_image=1, batch_size=4,
                    learning_rate=1e-3, lambda_energy=0.1, lambda_cov=0.005, n_calibration=2,
                    random_state=0).fit(train.images[:4])
    curve = model.training_curve_
    assert len(curve) == 240 and all(c["steps"] == 1 for c in curve)
    for key in ("energy", "position", "cov", "loss"):
        assert np.isfinite([c[key] for c in curve]).all(), key
    # the 1/diag(Sigma) term does its job: components stop collapsing
    assert np.mean([c["cov"] for c in curve[-20:]]) < np.mean([c["cov"] for c in curve[:20]])
    assert np.isfinite(model.gmm_covariances_).all() and model.gmm_weights_.sum() == pytest.approx(1.0)


# ------------------------------------------------------------------- estimator
def test_fitted_attributes(fitted):
    # patch_size=36: the sub-patch encoder alone is used and trained, not the aggregation layers
    assert fitted.n_parameters_ == sum(p.numel() for net in (fitted.encoder_.small, fitted.density_, fitted.position_)
                                       for p in net.parameters())
    aggregation = sum(p.numel() for p in fitted.encoder_.parameters()) - sum(
        p.numel() for p in fitted.encoder_.small.parameters())
    assert aggregation > 0
    n = (128 - 36) // 4 + 1
    assert fitted.grid_shape_ == (n, n)
    assert fitted.nn_index_.bank_.shape == (12 * n * n, 64)
    assert fitted.gmm_weights_.shape == (4,) and fitted.gmm_means_.shape == (4, 64)
    assert fitted.gmm_covariances_.shape == (4, 64, 64)
    assert len(fitted.training_curve_) == 1 and fitted.training_curve_[0]["seconds"] > 0


def test_scores_maps_and_sign(sample, fitted):
    _, test = sample
    scores, maps = fitted.score_samples_and_maps(test.images)
    assert maps.shape == test.masks.shape and np.isfinite(maps).all() and (maps >= 0).all()
    np.testing.assert_allclose(fitted.decision_function(test.images), scores - fitted.offset_)
    assert set(fitted.predict(test.images)) <= {-1, 1}
    # image score = max of the (128 -> 224 resized) map up to interpolation
    assert np.all(-scores >= maps.reshape(len(maps), -1).max(1) * 0.95)
    assert image_auroc(test.labels, -scores) > 0.6


def test_energy_score(sample, fitted):
    _, test = sample
    model = clone(fitted).set_params(score="energy").fit(sample[0].images[:12])
    # same networks and bank as the "nn" model: only the patch score differs
    for pa, pb in zip(model.encoder_.parameters(), fitted.encoder_.parameters()):
        assert torch.equal(pa, pb)
    scores, maps = model.score_samples_and_maps(test.images)
    assert maps.shape == test.masks.shape and np.isfinite(maps).all() and np.isfinite(scores).all()
    # the patch scores are the energies of the fitted mixture, averaged over covering patches
    feats, no_small = model._dense_features(torch.rand(1, 3, 128, 128) * 2 - 1)
    assert no_small is None
    params = [torch.from_numpy(a) for a in (model.gmm_weights_, model.gmm_means_, model.gmm_covariances_)]
    energy = gmm_energy(feats.reshape(-1, 64).double(), *params).float().reshape(1, *model.grid_shape_)
    image_score, energy_map = model._scores_from_features(feats, None, None)
    torch.testing.assert_close(energy_map, covering_mean(energy, 36, 4, (128, 128)))
    assert image_score[0] == energy_map.max()
    assert not np.allclose(maps, fitted.predict_map(test.images))


def test_energy_calibration_leaves_each_image_out(sample, fitted):
    """The final mixture is fitted on every training embedding, so offset_ must come
    from each calibration image scored under the mixture re-estimated without it."""
    train = sample[0].images[:12]
    model = clone(fitted).set_params(score="energy").fit(train)
    batches = [batch for _, batch in iter_image_batches(train, model.geometry_, 16, torch.device("cpu"))]
    features = model._dense_features(model._centre(torch.cat(batches)))[0]
    bank = features.reshape(-1, 64).double()
    with torch.inference_mode():
        gamma = model.density_(bank.float()).double()
    per_image = int(np.prod(model.grid_shape_))
    chosen = model._calibration_images(len(train), model._fit_seed())
    expected = []
    for image in chosen:
        keep = torch.ones(len(bank), dtype=torch.bool)
        keep[image * per_image:(image + 1) * per_image] = False
        held_out = gmm_parameters(bank[keep], gamma[keep])
        expected.append(-model._energy_scores(features[image:image + 1], held_out)[0].item())
    np.testing.assert_allclose(model.train_scores_, expected, rtol=1e-5)
    # an image's own embeddings pull the mixture towards it: held out, it scores lower
    in_sample = model.score_samples([train[i] for i in chosen])
    assert np.all(model.train_scores_ < in_sample)


def test_same_random_state_identical_model(sample):
    train, test = sample
    a = PEDENet(**FAST).fit(train.images[:6])
    b = PEDENet(**FAST).fit(train.images[:6])
    for net in ("encoder_", "density_", "position_"):
        for pa, pb in zip(getattr(a, net).parameters(), getattr(b, net).parameters()):
            assert torch.equal(pa, pb)
    np.testing.assert_array_equal(a.gmm_covariances_, b.gmm_covariances_)
    np.testing.assert_array_equal(a.predict_map(test.images[:2]), b.predict_map(test.images[:2]))


def test_pickle_roundtrip(sample, fitted):
    _, test = sample
    restored = pickle.loads(pickle.dumps(fitted))
    np.testing.assert_array_equal(restored.predict_map(test.images[:3]), fitted.predict_map(test.images[:3]))


def test_grid_search_over_components_and_lambda(sample):
    train, test = sample
    X = list(train.images[:4]) + list(test.images)
    masks = [np.zeros((224, 224), np.uint8)] * 4 + list(test.masks)
    search = GridSearchCV(
        PEDENet(**FAST),
        {"n_components": [2, 4], "lambda_energy": [0.1, 1.0]},
        scoring=pixel_auroc_scorer, cv=AnomalyStratifiedKFold(2, random_state=0), error_score="raise",
    ).fit(X, masks)
    assert np.isfinite(search.cv_results_["mean_test_score"]).all()
    assert search.best_estimator_.n_train_images_ == 4 + int((test.labels == 0).sum())
    assert search.best_estimator_.gmm_weights_.shape == (search.best_params_["n_components"],)
    assert clone(search.best_estimator_).get_params()["lambda_energy"] in (0.1, 1.0)


@pytest.mark.parametrize("params, message", [
    ({"score": "density"}, "score"), ({"patch_size": 64}, "patch_size"), ({"lambda_energy": -1}, "lambda_energy"),
    ({"lambda_cov": float("nan")}, "lambda_cov"), ({"lambda_position": -0.5}, "lambda_position"),
    ({"n_components": 0}, "n_components"), ({"embedding_dim": 2.5}, "embedding_dim"), ({"stride": 3}, "even"),
    ({"stride": 8}, "divisible"), ({"epochs": -1}, "epochs"), ({"learning_rate": 0}, "learning_rate"),
    ({"image_size": 64}, "image_size"), ({"batch_size": 0}, "batch_size"), ({"contamination": 0.7}, "contamination"),
    ({"image_size": 124, "stride": 44}, "at most patch_size"),
    ({"subtract_mean": "no"}, "subtract_mean must be True or False"),
])
def test_invalid_parameters(sample, params, message):
    with pytest.raises(ValueError, match=message):
        PEDENet(**{**FAST, **params}).fit(sample[0].images[:2])


def test_verbose_prints_each_epoch(sample, capsys):
    PEDENet(**{**FAST, "epochs": 2, "verbose": 1}).fit(sample[0].images[:4])
    out = capsys.readouterr().out
    assert "epoch 1/2" in out and "epoch 2/2" in out


def test_stride_small_multiplies_the_sub_patch_map(sample):
    train, test = sample
    model = PEDENet(**{**FAST, "image_size": 160, "patch_size": 72, "stride": 8, "stride_small": 4}).fit(
        train.images[:6])
    n_small = (160 - 36) // 4 + 1
    assert model.small_nn_index_.bank_.shape == (6 * n_small * n_small, 64)
    single = clone(model).set_params(stride_small=None).fit(train.images[:6])
    assert single.small_nn_index_ is None
    # the map is the 72-pixel NN map times the 36-pixel one, each a mean over covering patches
    batch = torch.rand(2, 3, 160, 160) * 2 - 1
    big, small = model._dense_features(batch)
    assert small.shape == (2, n_small, n_small, 64)

    def nn_map(feats, bank, patch, stride):
        dist = torch.cdist(feats.reshape(-1, 64), torch.as_tensor(bank)).min(1).values
        return covering_mean(dist.reshape(feats.shape[:3]), patch, stride, (160, 160))

    expected = nn_map(big, model.nn_index_.bank_, 72, 8) * nn_map(small, model.small_nn_index_.bank_, 36, 4)
    image_score, anomaly_map = model._score_batch(batch)
    torch.testing.assert_close(anomaly_map, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(image_score, anomaly_map.flatten(1).max(1).values)
    # pickles with both indexes
    reloaded = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(reloaded.predict_map(test.images[:2]), model.predict_map(test.images[:2]))


@pytest.mark.parametrize("params, message", [
    ({"stride_small": 4}, "patch_size=72"),
    ({"patch_size": 72, "image_size": 160, "stride": 8, "stride_small": 4, "score": "energy"}, "score='nn'"),
    ({"patch_size": 72, "image_size": 160, "stride": 8, "stride_small": 3}, "even"),
    ({"patch_size": 72, "image_size": 160, "stride": 8, "stride_small": 6}, "stride_small"),
    ({"patch_size": 72, "image_size": 252, "stride": 4, "stride_small": 72}, "at most 36"),
])
def test_invalid_stride_small(sample, params, message):
    with pytest.raises(ValueError, match=message):
        PEDENet(**{**FAST, **params}).fit(sample[0].images[:2])
