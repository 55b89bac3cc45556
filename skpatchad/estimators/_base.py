"""Shared scikit-learn glue for the patch-based anomaly detectors.

Subclasses implement two hooks:

* ``_fit_images(images)``: learn from a list of validated normal images and
  return calibration anomaly scores (higher = more anomalous) for them;
* ``_score_images(images)``: yield ``(start, image_scores, grids)`` batches, with
  ``grids`` a ``(B, h, w)`` tensor of patch anomaly scores on the patch grid
  covering the network input.

Everything else (input validation, normal-only training from ``y``, the sign
convention, ``contamination`` -> ``offset_``, maps at each image's own size,
pickling without device state) lives here once.
"""

import numbers
import warnings

import numpy as np
import torch
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

from ..features._device import TorchImageEstimatorMixin, resolve_device, runtime_device
from ..features.maps import covering_mean, grid_to_maps, stack_if_same_size
from ..features.patch_encoders import COLOUR_NOISE, perturb_colours
from ..features.preprocessing import ImageGeometry, iter_image_batches
from ..metrics import labels_from_y
from ..utils import check_images, image_sizes, select_images
from ..utils._params import check_real_param


# Centred training images varying less than this (e.g. a single training image)
# are not scaled up further.
_MIN_INPUT_SPREAD = 1e-3


class BaseAnomalyDetector(TorchImageEstimatorMixin, OutlierMixin, BaseEstimator):
    """Base class: sklearn outlier-detector API over per-image anomaly scores and maps."""

    _min_image_size = 16
    # Parameters that scoring reads and that offset_ / the banks were built
    # with: changing one after fit would silently mix two models, so predict
    # refuses until the model is fitted again.
    _inference_params = ()

    def _log(self, message):
        if self.verbose:
            print("[%s] %s" % (type(self).__name__, message), flush=True)

    def _geometry(self):
        return self.geometry_

    # ------------------------------------------------------------------ inputs
    def _check_images(self, X):
        return check_images(X, min_size=self._min_image_size, estimator_name=type(self).__name__)

    def _training_images(self, X, y):
        """Validated images to train on: all of X, or only the normal ones when y is given."""
        images = self._check_images(X)
        if y is None:
            return images
        labels = labels_from_y(y)
        if len(labels) != len(images):
            raise ValueError("X has %d images but y has %d entries" % (len(images), len(labels)))
        normal = select_images(images, labels == 0)
        if len(normal) == 0:
            raise ValueError(
                "y marks all %d training images as anomalous; %s trains on normal images "
                "only (label 0 / empty mask)" % (len(images), type(self).__name__)
            )
        return normal

    def _check_params(self):
        """Raise a ValueError for an invalid parameter; ``fit`` calls it before any work."""

    def _warn_single_image(self):
        """For ``_fit_images``: there is no other image to score the only one against."""
        warnings.warn("%s was fitted on a single image: offset_ uses its in-sample score, "
                      "which is optimistically low, so unseen normal images may be flagged "
                      "anomalous; fit on more normal images" % type(self).__name__)

    def _check_contamination(self):
        c = self.contamination
        if isinstance(c, str):
            if c != "auto":
                raise ValueError("contamination must be 'auto' or a float in (0, 0.5], got %r" % (c,))
        elif not isinstance(c, numbers.Real) or not 0.0 < c <= 0.5:
            raise ValueError("contamination must be 'auto' or a float in (0, 0.5], got %r" % (c,))

    # --------------------------------------------------------------------- fit
    def fit(self, X, y=None):
        """Fit on normal images.

        Parameters
        ----------
        X : array-like or list
            Images: array (N, H, W[, C]), list of arrays of any sizes, or file paths.
        y : array-like, optional
            Image labels (1 = anomalous, 0 = normal) or masks (N, H, W). When
            given, anomalous images are dropped before training, so model
            selection over mixed folds trains on normal images only.

        Returns
        -------
        self
        """
        # A fit that fails or is interrupted (e.g. stopped in a notebook) must not
        # leave new networks next to an old bank and offset_: the old model is
        # forgotten first and a failed fit's partial state afterwards, so the
        # estimator is either fitted anew or plainly unfitted.
        self._forget_fitted_state()
        try:
            self._check_contamination()
            self._check_params()
            images = self._training_images(X, y)
            calibration = np.asarray(self._fit_images(images), dtype=np.float64)
            self.inference_params_ = {name: getattr(self, name) for name in self._inference_params}
            self.n_train_images_ = len(images)
            self.train_scores_ = -calibration
            if self.contamination == "auto":
                self.offset_ = float(np.min(self.train_scores_))
            else:
                self.offset_ = float(np.percentile(self.train_scores_, 100.0 * self.contamination))
        except BaseException:  # KeyboardInterrupt included
            self._forget_fitted_state()
            raise
        return self

    def _forget_fitted_state(self):
        for name in [name for name in vars(self) if name.endswith("_") and not name.startswith("_")]:
            delattr(self, name)

    def __sklearn_is_fitted__(self):
        return hasattr(self, "offset_")

    # ----------------------------------------------------------------- predict
    def _check_inference_params(self):
        for name, fitted in getattr(self, "inference_params_", {}).items():
            current = getattr(self, name)
            if current is not fitted and current != fitted:
                raise ValueError(
                    "%s was fitted with %s=%r and it is now %r; the memory bank and offset_ "
                    "depend on it, so call fit again (or set it back)"
                    % (type(self).__name__, name, fitted, current))

    def _scores_and_maps(self, X, want_maps):
        check_is_fitted(self, "offset_")
        self._check_inference_params()
        images = self._check_images(X)
        sizes = image_sizes(images)
        scores = np.empty(len(images), dtype=np.float64)
        maps = None
        if want_maps:
            # One preallocated (N, H, W) array when sizes agree: no final stacking copy.
            # Allocated by torch, whose allocator maps fresh memory ~10x faster than
            # numpy's on this kind of VM (huge pages); numpy gets a view of it.
            if len(set(sizes)) == 1:
                maps = torch.empty((len(images),) + sizes[0], dtype=torch.float32).numpy()
            else:
                maps = [None] * len(images)
        for start, batch_scores, grids in self._score_images(images):
            stop = start + len(batch_scores)
            scores[start:stop] = batch_scores
            if want_maps:
                if isinstance(maps, np.ndarray):
                    grid_to_maps(grids, self._geometry(), sizes[start:stop], self._map_sigma(),
                                 out=maps[start:stop], alignment=self._cell_alignment())
                else:
                    maps[start:stop] = grid_to_maps(grids, self._geometry(), sizes[start:stop],
                                                    self._map_sigma(), alignment=self._cell_alignment())
        return scores, maps

    def _cell_alignment(self):
        """Where the cells of the score grids sit on the network input (see ``maps.cell_centres``)."""
        return "even"

    def _map_sigma(self):
        sigma = getattr(self, "sigma", 0.0)
        check_real_param("sigma", sigma, 0.0, allow_none=True)  # may be set after fit
        return sigma

    def score_samples(self, X):
        """Normality score of each image (higher = more normal; sklearn convention).

        Returns
        -------
        scores : ndarray of shape (n_images,)
            Minus the image anomaly score.
        """
        return -self._scores_and_maps(X, want_maps=False)[0]

    def decision_function(self, X):
        """``score_samples(X) - offset_``: negative for images predicted anomalous."""
        return self.score_samples(X) - self.offset_

    def predict(self, X):
        """+1 for normal images, -1 for anomalous ones."""
        return np.where(self.decision_function(X) < 0, -1, 1)

    def predict_map(self, X):
        """Per-pixel anomaly maps (higher = more anomalous).

        Returns
        -------
        maps : ndarray of shape (n_images, H, W) when all images share one size,
            else a list of 2-D float32 arrays, each at its own image's size.
        """
        return stack_if_same_size(self._scores_and_maps(X, want_maps=True)[1])

    def score_samples_and_maps(self, X):
        """``(score_samples(X), predict_map(X))`` with a single pass over the images."""
        scores, maps = self._scores_and_maps(X, want_maps=True)
        return -scores, stack_if_same_size(maps)


class PatchEmbeddingDetector(BaseAnomalyDetector):
    """Shared by detectors that learn their own patch encoder (PatchSVDD, PEDENet).

    Subclasses set ``geometry_``/``device_`` in ``_fit_images`` and implement
    ``_models()`` (the torch modules and kNN indexes to move to the run device)
    and ``_score_batch(batch)`` -> ``(image_scores, maps)`` for a normalised
    batch; maps are per-pixel means over covering patches, so no smoothing.
    """

    def _map_sigma(self):
        return 0.0

    def _after_epoch(self, epoch):
        """Hook called after each training epoch (benchmarks snapshot the networks here)."""

    def _fit_seed(self):
        """The int seed that ``fit`` derives from ``random_state`` (patch sampling, kNN, calibration)."""
        return int(check_random_state(self.random_state).randint(2**31 - 1))

    def _start_fit(self, images):
        """Resolve device and seeds, load the images (``fit`` has checked the parameters).

        Returns ``(seed, generator, data)``: an int seed derived from
        ``random_state``, a torch generator for patch sampling, and the
        centred (N, 3, S, S) training tensor (see :meth:`_centre`).
        """
        seed = self._fit_seed()
        generator = torch.Generator().manual_seed(seed)
        self.device_ = resolve_device(self.device)
        self.geometry_ = ImageGeometry(self.image_size)
        batches = [batch for _, batch in iter_image_batches(images, self.geometry_, 16, self.device_)]
        data = torch.cat(batches)
        if self.subtract_mean:
            self.mean_image_ = data.mean(0).cpu().numpy()
        else:
            self.mean_image_ = np.full((3, 1, 1), 0.5, dtype=np.float32)
        spread = float((data - torch.as_tensor(self.mean_image_, device=data.device)).std())
        self.input_scale_ = 1.0 / max(spread, _MIN_INPUT_SPREAD)
        return seed, generator, self._centre(data)

    def _centre(self, batch):
        """Network input: ``(images in [0, 1] - mean_image_) * input_scale_``.

        With ``subtract_mean`` the mean is the per-pixel mean of the resized
        training images, as in the reference Patch SVDD code, which feeds
        ``(x - mean_image) / 255``: what all normal images share (an aligned
        object's shape, a texture's colour) is removed, so the patch encoders
        describe deviations from it. Otherwise the mean is mid-grey. The
        centred training images are then scaled to unit standard deviation:
        centred aligned objects vary little (MVTec bottle: std 0.042 in [0, 1]
        units, textures far more), and with inputs that small the encoders,
        whose biases then dominate, learn several times slower per step.
        """
        mean = torch.as_tensor(self.mean_image_, device=batch.device)
        # out of place: a float batch at the input size can be a view of the user's array
        return ((batch - mean) * self.input_scale_).contiguous()

    def _perturb(self, patches, generator):
        """Colour perturbation of relative-position crops, in [0, 1] intensity units."""
        return perturb_colours(patches, generator, scale=COLOUR_NOISE * self.input_scale_)

    def _calibration_images(self, n_images, seed):
        """Sorted indices of the training images scored leave-one-image-out for ``offset_``."""
        n_cal = min(int(self.n_calibration), n_images)
        return np.sort(np.random.RandomState(seed).choice(n_images, n_cal, replace=False))

    @staticmethod
    def _nearest_distances(index, features, image_ids=None):
        """(B, h, w) distance of each patch feature (B, h, w, D) to its nearest bank feature.

        With ``image_ids`` (the training index of each image in the batch), the
        bank features of that same image are excluded: leave-one-image-out.
        """
        batch, n_h, n_w, dim = features.shape
        groups = bank_groups = None
        if image_ids is not None:
            groups = np.repeat(np.asarray(image_ids), n_h * n_w)
            bank_groups = np.repeat(np.arange(len(index.bank_) // (n_h * n_w)), n_h * n_w)
        # distances only: not tracking where each minimum is halves the exact search's time
        distances = index.kneighbors(features.reshape(-1, dim), 1, groups, bank_groups, return_indices=False)
        return distances[:, 0].reshape(batch, n_h, n_w)

    def _nn_map(self, scales, image_ids=None):
        """Product over scales of the per-pixel mean NN distance of covering patches.

        ``scales``: ``(features (B, h, w, D), index, patch, stride)`` per scale.
        Returns ``(image scores = map maxima, (B, S, S) map)``.
        """
        anomaly_map = None
        for features, index, patch, stride in scales:
            scores = self._nearest_distances(index, features, image_ids)
            scale_map = covering_mean(scores, patch, stride, self.geometry_.input_size)
            anomaly_map = scale_map if anomaly_map is None else anomaly_map * scale_map
        return anomaly_map.flatten(1).max(1).values, anomaly_map

    def _score_images(self, images):
        device = runtime_device(self.device_)
        for model in self._models():
            if model is not None:
                model.to(device)
        for start, batch in iter_image_batches(images, self.geometry_, 8, device):
            scores, maps = self._score_batch(self._centre(batch))
            yield start, scores.cpu().numpy(), maps
