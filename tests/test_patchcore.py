"""Behaviour of the PatchCore estimator (sklearn API, scoring, fitting from y, pickling)."""

import pickle
import subprocess
import sys
import textwrap
import warnings

import joblib
import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer

from skpatchad import PatchCore
from skpatchad.metrics import (
    image_auroc,
    image_auroc_scorer,
    pixel_auroc,
    pixel_auroc_scorer,
    pro_score,
    pro_scorer,
)
from skpatchad.model_selection import AnomalyStratifiedKFold


def test_detects_and_localises_defects_on_the_real_sample(sample, fitted_patchcore):
    _, test = sample
    normality, maps = fitted_patchcore.score_samples_and_maps(test.images)
    assert maps.shape == test.masks.shape
    assert maps.dtype == np.float32
    assert image_auroc(test.labels, -normality) >= 0.95
    assert pixel_auroc(test.masks, maps) >= 0.93
    assert pro_score(test.masks, maps) >= 0.75
    # anomalous images score lower (less normal) than normal ones on average
    assert normality[test.labels == 1].mean() < normality[test.labels == 0].mean()


def test_sign_conventions(sample, fitted_patchcore):
    _, test = sample
    scores = fitted_patchcore.score_samples(test.images)
    decision = fitted_patchcore.decision_function(test.images)
    np.testing.assert_allclose(decision, scores - fitted_patchcore.offset_)
    predicted = fitted_patchcore.predict(test.images)
    np.testing.assert_array_equal(predicted, np.where(decision < 0, -1, 1))
    assert set(np.unique(predicted)) <= {-1, 1}
    # the single-pass helper agrees with the separate methods
    both_scores, both_maps = fitted_patchcore.score_samples_and_maps(test.images)
    np.testing.assert_allclose(both_scores, scores)
    np.testing.assert_allclose(both_maps, fitted_patchcore.predict_map(test.images))


def test_file_paths_give_the_same_result_as_arrays(tmp_path, sample, fitted_patchcore):
    from PIL import Image

    _, test = sample
    paths = []
    for i in range(3):
        path = tmp_path / ("img%d.png" % i)
        Image.fromarray(test.images[i]).save(path)
        paths.append(str(path))
    np.testing.assert_array_equal(fitted_patchcore.predict_map(paths), fitted_patchcore.predict_map(test.images[:3]))


def test_memory_bank_size_follows_coreset(sample, small_patchcore_params):
    train, _ = sample
    images = train.images[:6]
    full = PatchCore(**{**small_patchcore_params, "coreset": 1.0}).fit(images)
    n_patches = 6 * full.grid_shape_[0] * full.grid_shape_[1]
    assert len(full.memory_bank_) == n_patches
    part = PatchCore(**{**small_patchcore_params, "coreset": 0.1}).fit(images)
    assert len(part.memory_bank_) == round(0.1 * n_patches)
    # every bank entry is one of the full bank's patches
    full_rows = {row.tobytes() for row in full.memory_bank_}
    assert all(row.tobytes() in full_rows for row in part.memory_bank_)


def test_same_random_state_gives_identical_models(sample, small_patchcore_params):
    train, test = sample
    a = PatchCore(**small_patchcore_params).fit(train.images[:8])
    b = PatchCore(**small_patchcore_params).fit(train.images[:8])
    np.testing.assert_array_equal(a.memory_bank_, b.memory_bank_)
    np.testing.assert_array_equal(a.predict_map(test.images[:2]), b.predict_map(test.images[:2]))
    c = PatchCore(**{**small_patchcore_params, "random_state": 1}).fit(train.images[:8])
    assert not np.array_equal(a.memory_bank_, c.memory_bank_)


def test_eq7_reweighting_and_plain_max(sample, small_patchcore_params):
    train, test = sample
    plain = PatchCore(**{**small_patchcore_params, "n_neighbors": 1}).fit(train.images[:8])
    weighted = clone(plain).set_params(n_neighbors=9).fit(train.images[:8])
    np.testing.assert_array_equal(plain.memory_bank_, weighted.memory_bank_)
    # b = 1: image score is the largest nearest-neighbour patch distance
    embeddings = next(plain._embed(test.images[:3], torch.device("cpu")))[1]
    queries = embeddings.reshape(-1, embeddings.shape[-1]).numpy().astype(np.float64)
    bank = plain.memory_bank_.astype(np.float64)
    nn_dist = np.sqrt(((queries[:, None, :] - bank[None]) ** 2).sum(-1)).min(1).reshape(3, -1)
    np.testing.assert_allclose(-plain.score_samples(test.images[:3]), nn_dist.max(1), rtol=1e-4)
    # Eq. 7 scales the max by a weight in [0, 1]
    weighted_scores = -weighted.score_samples(test.images[:3])
    assert np.all(weighted_scores <= nn_dist.max(1) * (1 + 1e-5))
    assert np.all(weighted_scores > 0)


def test_threshold_uses_leave_one_image_out_scores(sample, fitted_patchcore, small_patchcore_params):
    train, _ = sample
    in_sample = fitted_patchcore.score_samples(train.images)
    # without their own patches in the bank, training images look less normal
    assert np.all(fitted_patchcore.train_scores_ <= in_sample + 1e-6)
    assert np.mean(fitted_patchcore.train_scores_ < in_sample - 1e-6) > 0.9
    assert fitted_patchcore.offset_ == pytest.approx(fitted_patchcore.train_scores_.min())
    model = PatchCore(**{**small_patchcore_params, "contamination": 0.2}).fit(train.images)
    assert model.offset_ == pytest.approx(np.percentile(model.train_scores_, 20))


def _eq7_leave_one_out_reference(model, images):
    """Eq. 7 in float64 for each training image against the bank without its own patches."""
    embeddings = next(model._embed(images, torch.device("cpu")))[1]
    embeddings = embeddings.reshape(len(images), -1, embeddings.shape[-1]).numpy().astype(np.float64)
    bank, owner = model.memory_bank_.astype(np.float64), model.bank_image_index_
    scores, support_sizes = [], []
    for i, patches in enumerate(embeddings):
        others = bank[owner != i]
        dist = np.linalg.norm(patches[:, None] - others[None], axis=2)
        worst = dist.min(1).argmax()
        m_star = others[dist[worst].argmin()]
        b = min(model.n_neighbors, len(others))
        support = np.argsort(np.linalg.norm(others - m_star, axis=1), kind="stable")[:b]
        to_worst = np.linalg.norm(others[support] - patches[worst], axis=1)
        weight = 1.0 - np.exp(to_worst[0]) / np.exp(to_worst).sum() if b > 1 else 1.0
        scores.append(-weight * dist[worst].min())
        support_sizes.append(len(others))
    return np.array(scores), np.array(support_sizes)


@pytest.mark.parametrize("n_images, coreset", [(3, 0.05), (2, 0.1), (2, 0.016), (4, 0.02)])
def test_leave_one_out_eq7_uses_only_other_images_entries(n_images, coreset):
    # with a small bank the other images hold fewer than b = 9 entries; the
    # calibrated image's own patches must not fill the rest of Eq. 7's sum
    rng = np.random.RandomState(n_images)
    images = (rng.rand(n_images, 64, 64, 3) * 255).astype(np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PatchCore(backbone="resnet18", weights=None, image_size=64, embedding_dim=32,
                          coreset=coreset, random_state=0, device="cpu").fit(images)
    expected, others = _eq7_leave_one_out_reference(model, images)
    assert np.any(others < model.n_neighbors), others  # the case under test occurs
    np.testing.assert_allclose(model.train_scores_, expected, rtol=2e-5)
    assert model.offset_ == pytest.approx(expected.min(), rel=2e-5)


def test_fit_with_y_trains_on_normal_images_only(sample, small_patchcore_params):
    train, test = sample
    mixed = np.concatenate([train.images[:6], test.images[test.labels == 1][:3]])
    labels = np.array([0] * 6 + [1] * 3)
    masks = np.concatenate([np.zeros((6, 224, 224), np.uint8), test.masks[test.labels == 1][:3]])
    reference = PatchCore(**small_patchcore_params).fit(train.images[:6])
    for y in (labels, masks, labels.astype(bool)):
        model = PatchCore(**small_patchcore_params).fit(mixed, y)
        assert model.n_train_images_ == 6
        np.testing.assert_array_equal(model.memory_bank_, reference.memory_bank_)
    with pytest.raises(ValueError, match="anomalous"):
        PatchCore(**small_patchcore_params).fit(mixed[6:], labels[6:])
    with pytest.raises(ValueError, match="9 images but y has 3"):
        PatchCore(**small_patchcore_params).fit(mixed, labels[:3])
    with pytest.raises(ValueError):
        PatchCore(**small_patchcore_params).fit(mixed, np.where(labels == 1, -1, 1))


def test_grid_search_with_pro_scorer_on_mixed_folds(sample, small_patchcore_params):
    train, test = sample
    X = list(train.images[:6]) + list(test.images)
    masks = [np.zeros((224, 224), np.uint8)] * 6 + list(test.masks)
    search = GridSearchCV(
        PatchCore(**{**small_patchcore_params, "image_size": 64}),
        {"patch_size": [1, 3], "coreset": [0.1, 0.25]},
        scoring=pro_scorer,
        cv=AnomalyStratifiedKFold(2, random_state=0),
        error_score="raise",
    ).fit(X, masks)
    assert np.isfinite(search.cv_results_["mean_test_score"]).all()
    assert search.best_params_["patch_size"] in (1, 3)
    # the refit used the normal images only
    assert search.best_estimator_.n_train_images_ == 6 + int((test.labels == 0).sum())


def test_grid_search_runs_in_parallel_workers(sample, small_patchcore_params):
    train, test = sample
    X = list(train.images[:6]) + list(test.images)
    y = np.array([0] * 6 + list(test.labels))
    search = GridSearchCV(
        PatchCore(**small_patchcore_params),
        {"n_neighbors": [1, 9]},
        scoring=image_auroc_scorer,
        cv=AnomalyStratifiedKFold(2, random_state=0),
        n_jobs=2,
        error_score="raise",
    ).fit(X, y)
    assert np.isfinite(search.cv_results_["mean_test_score"]).all()


def test_pipeline_composition(sample, small_patchcore_params):
    train, test = sample
    to_float = FunctionTransformer(lambda X: np.asarray(X, dtype=np.float32) / 255.0)
    pipe = Pipeline([("scale", to_float), ("patchcore", PatchCore(**small_patchcore_params))])
    pipe.fit(train.images[:8])
    assert pipe.predict(test.images).shape == (len(test.images),)
    value = pixel_auroc_scorer(pipe, test.images, test.masks)
    assert 0.8 < value <= 1.0


def test_pickle_roundtrip_and_fresh_process_offline(tmp_path, sample, fitted_patchcore):
    _, test = sample
    expected = fitted_patchcore.predict_map(test.images[:4])
    restored = pickle.loads(pickle.dumps(fitted_patchcore))
    np.testing.assert_array_equal(restored.predict_map(test.images[:4]), expected)

    model_path, data_path, out_path = tmp_path / "model.joblib", tmp_path / "x.npy", tmp_path / "maps.npy"
    joblib.dump(fitted_patchcore, model_path)
    np.save(data_path, test.images[:4])
    script = textwrap.dedent(
        """
        import socket, sys
        def _no_network(*args, **kwargs):
            raise OSError("network disabled in this test")
        socket.socket.connect = _no_network
        socket.create_connection = _no_network
        import joblib, numpy as np, torch
        torch.set_num_threads(%d)
        model = joblib.load(sys.argv[1])
        np.save(sys.argv[3], model.predict_map(np.load(sys.argv[2])))
        """ % torch.get_num_threads()
    )
    subprocess.run([sys.executable, "-c", script, str(model_path), str(data_path), str(out_path)],
                   check=True, timeout=300)
    np.testing.assert_array_equal(np.load(out_path), expected)


def test_pickle_contains_no_cuda_state(fitted_patchcore):
    state = fitted_patchcore.__getstate__()
    tensors = [t for t in state["backbone_"].state_dict().values()]
    assert all(not t.is_cuda for t in tensors)
    assert isinstance(state["memory_bank_"], np.ndarray)


def test_clone_and_params_are_untouched(sample, small_patchcore_params):
    train, _ = sample
    model = PatchCore(**small_patchcore_params)
    params = model.get_params()
    model.fit(train.images[:4])
    assert model.get_params() == params
    fresh = clone(model)
    assert not hasattr(fresh, "memory_bank_")
    assert fresh.get_params() == params


def test_verbose_reports_progress(sample, small_patchcore_params, capsys):
    train, _ = sample
    PatchCore(**{**small_patchcore_params, "verbose": 1}).fit(train.images[:4])
    out = capsys.readouterr().out
    assert "features" in out and "coreset" in out


@pytest.mark.parametrize(
    "params, message",
    [
        ({"coreset": 0.0}, "coreset"),
        ({"coreset": 1.5}, "coreset"),
        ({"patch_size": 0}, "patch_size"),
        ({"n_neighbors": 0}, "n_neighbors"),
        ({"contamination": 0.9}, "contamination"),
        ({"contamination": "bad"}, "contamination"),
        ({"backbone": "not_a_model"}, "unknown backbone"),
        ({"layers": ["no_such_layer"]}, "no_such_layer"),
        ({"image_size": 8}, "image_size"),
        ({"knn": "faiss"}, "knn"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_invalid_parameters_raise_in_fit(sample, small_patchcore_params, params, message):
    train, _ = sample
    with pytest.raises(ValueError, match=message):
        PatchCore(**{**small_patchcore_params, **params}).fit(train.images[:2])


def test_unfitted_model_raises(sample):
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        PatchCore().predict_map(sample[1].images)


def test_offline_weights_error_explains_the_fix(monkeypatch, tmp_path):
    from urllib.error import URLError

    import torch.hub

    def refuse(*args, **kwargs):
        raise URLError("no network")

    calls = []

    def refuse_and_record(*args, **kwargs):
        calls.append(args)
        refuse()

    # torchvision binds load_state_dict_from_url at import, so patch the download
    # underneath it, and point the hub cache at an empty folder so no cached file is found
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse_and_record)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(RuntimeError, match="efficientnet_lite0") as info:
        PatchCore(backbone="resnet18", weights="DEFAULT").fit(np.zeros((2, 32, 32, 3), np.uint8))
    assert "weights=" in str(info.value)
    assert calls, "the download was not attempted through torch.hub, so the patch did not intercept it"


def test_local_state_dict_and_torchvision_backbone(tmp_path, sample):
    from skpatchad.features._torchvision import torchvision_models

    train, test = sample
    weights_path = tmp_path / "resnet18.pth"
    torch.manual_seed(0)
    torch.save(torchvision_models().resnet18(weights=None).state_dict(), weights_path)
    model = PatchCore(backbone="resnet18", weights=str(weights_path), image_size=64, coreset=0.5,
                      random_state=0).fit(train.images[:4])
    assert model.backbone_.layers == ("layer2", "layer3")
    # layer4 and the classifier were never run, so they are not kept
    assert isinstance(model.backbone_.model.layer4, torch.nn.Identity)
    assert model.memory_bank_.shape[1] == 128 + 256
    assert model.predict_map(test.images[:2]).shape == (2, 224, 224)


def test_crop_size_maps_cover_the_whole_image(sample, small_patchcore_params):
    train, test = sample
    model = PatchCore(**{**small_patchcore_params, "image_size": 112, "crop_size": 96}).fit(train.images[:6])
    maps = model.predict_map(test.images[:2])
    assert maps.shape == (2, 224, 224)
    assert np.isfinite(maps).all()


def test_pynndescent_search_matches_exact_on_small_banks(sample, small_patchcore_params):
    train, test = sample
    exact = PatchCore(**{**small_patchcore_params, "coreset": 0.05}).fit(train.images[:6])
    approx = clone(exact).set_params(knn="pynndescent").fit(train.images[:6])
    np.testing.assert_array_equal(exact.memory_bank_, approx.memory_bank_)
    a, b = exact.score_samples(test.images), approx.score_samples(test.images)
    assert np.corrcoef(a, b)[0, 1] > 0.99


def test_fit_from_file_paths_decodes_lazily_and_matches_arrays(tmp_path, sample, small_patchcore_params):
    from PIL import Image

    from skpatchad.utils import ImageList, check_images

    train, test = sample
    paths = []
    for i, image in enumerate(train.images[:6]):
        paths.append(tmp_path / ("train%d.png" % i))
        Image.fromarray(image).save(paths[-1])
    checked = check_images(paths)
    assert isinstance(checked, ImageList) and checked.sizes == [(224, 224)] * 6
    labels = np.zeros(6, int)
    from_files = PatchCore(**small_patchcore_params).fit(paths, labels)
    from_arrays = PatchCore(**small_patchcore_params).fit(train.images[:6])
    np.testing.assert_array_equal(from_files.memory_bank_, from_arrays.memory_bank_)


@pytest.mark.skipif(torch.cuda.is_available(), reason="simulates a CPU-only machine")
def test_model_fitted_on_cuda_runs_on_a_cpu_only_machine(sample, fitted_patchcore):
    _, test = sample
    expected = fitted_patchcore.predict_map(test.images[:2])
    moved = pickle.loads(pickle.dumps(fitted_patchcore))
    moved.device_ = torch.device("cuda")  # as recorded by a fit on a GPU
    moved.nn_index_.device = torch.device("cuda")
    restored = pickle.loads(pickle.dumps(moved))
    with pytest.warns(UserWarning, match="not available here; running on CPU"):
        maps = restored.predict_map(test.images[:2])
    np.testing.assert_array_equal(maps, expected)


def test_streamed_fit_without_full_embeddings_gives_the_same_model(sample, small_patchcore_params, monkeypatch):
    """Keeping only the projection (second pass for the bank) changes nothing but memory."""
    import skpatchad.features.patchcore as patchcore_features

    train, test = sample
    params = {**small_patchcore_params, "projection_dim": 16, "n_calibration": 5}
    kept = PatchCore(**params).fit(train.images[:12])
    recorded = {}
    original_gather = patchcore_features.StreamedEmbeddings.gather

    def spy_gather(self, selected, batches):
        recorded["full_kept"] = self.full is not None
        recorded["calibration_rows"] = len(self.calibration_embeddings())
        return original_gather(self, selected, batches)

    monkeypatch.setattr(patchcore_features, "KEEP_FULL_BYTES", 0)
    monkeypatch.setattr(patchcore_features.StreamedEmbeddings, "gather", spy_gather)
    streamed = PatchCore(**params).fit(train.images[:12])
    assert recorded == {"full_kept": False, "calibration_rows": 5}
    np.testing.assert_array_equal(streamed.bank_image_index_, kept.bank_image_index_)
    np.testing.assert_allclose(streamed.memory_bank_, kept.memory_bank_, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(streamed.train_scores_, kept.train_scores_, rtol=1e-6)
    np.testing.assert_allclose(streamed.predict_map(test.images[:2]), kept.predict_map(test.images[:2]),
                               rtol=1e-5, atol=1e-6)


def test_n_calibration_bounds_the_leave_one_out_images(sample, small_patchcore_params):
    train, _ = sample
    full = PatchCore(**small_patchcore_params).fit(train.images[:10])
    sub = PatchCore(**{**small_patchcore_params, "n_calibration": 4}).fit(train.images[:10])
    assert full.train_scores_.shape == (10,) and sub.train_scores_.shape == (4,)
    # evenly spread images 0, 3, 6, 9, scored exactly as in the full calibration
    np.testing.assert_allclose(sub.train_scores_, full.train_scores_[[0, 3, 6, 9]], rtol=1e-6)
    with pytest.raises(ValueError, match="n_calibration"):
        PatchCore(n_calibration=0).fit(train.images[:2])


def test_half_precision_backbone_and_knn_close_to_float32(sample, small_patchcore_params):
    """bfloat16 (8-bit mantissa, the coarser half format) changes scores by a few percent at most."""
    train, test = sample
    reference = PatchCore(**small_patchcore_params).fit(train.images[:8])
    half = PatchCore(**{**small_patchcore_params, "precision": "bfloat16"}).fit(train.images[:8])
    assert next(half.backbone_.parameters()).dtype == torch.bfloat16
    assert half.nn_index_._device_bank()[0].dtype == torch.bfloat16
    scores, maps = half.score_samples_and_maps(test.images[:4])
    ref_scores, ref_maps = reference.score_samples_and_maps(test.images[:4])
    assert maps.dtype == np.float32 and np.isfinite(maps).all()
    np.testing.assert_allclose(scores, ref_scores, rtol=0.1)
    assert np.corrcoef(maps.ravel(), ref_maps.ravel())[0, 1] > 0.95
    with pytest.raises(ValueError, match="precision"):
        PatchCore(precision="int8").fit(train.images[:2])


def test_resnet_map_is_registered_on_the_defect():
    # torchvision ResNets centre cell j at stride * j (see maps.cell_centres);
    # read as evenly tiled, the map of a 4x4 defect sat 4.6-4.9 px down-right
    # (1.0-1.4 px now: the features keep the official, evenly tiled resizing of layer3)
    rng = np.random.RandomState(0)
    normal = (0.5 + 0.02 * rng.randn(3, 96, 96, 3)).clip(0, 1).astype(np.float32)
    model = PatchCore(backbone="resnet18", weights=None, image_size=96, embedding_dim=256, coreset=1.0,
                      sigma=0.0, random_state=0, device="cpu").fit(normal)
    corners = [(r, c) for r in (36, 44, 52) for c in (36, 44, 52)]
    tests = []
    for r, c in corners:
        image = (0.5 + 0.02 * rng.randn(96, 96, 3)).clip(0, 1).astype(np.float32)
        image[r:r + 4, c:c + 4] = 1.0
        tests.append(image)
    rows, cols = np.mgrid[:96, :96]
    offsets = []
    for (r, c), anomaly_map in zip(corners, model.predict_map(tests)):
        weight = np.clip(anomaly_map - np.median(anomaly_map), 0, None) ** 2
        offsets.append(((weight * rows).sum() / weight.sum() - (r + 1.5),
                        (weight * cols).sum() / weight.sum() - (c + 1.5)))
    assert np.all(np.abs(np.mean(offsets, 0)) < 2.0), np.mean(offsets, 0)
