"""Patch SVDD (Yi & Yoon, ACCV 2020, "Patch SVDD: Patch-level SVDD for Anomaly
Detection and Segmentation")."""

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..features._device import seeded_cpu_rng
from ..features.knn import NearestNeighbors, check_knn_method
from ..features.patch_encoders import (HierarchicalPatchEncoder, PositionClassifier, SmallPatchEncoder,
                                       min_pair_image_size, neighbour_pair_corners, pair_corners)
from ..utils._params import check_bool_param, check_int_choice, check_int_param, check_real_param
from ._base import PatchEmbeddingDetector

_ENCODERS = ("trained", "random", "raw")
EPOCHS_CPU = 40
# Principal components of the lower bound that prunes the raw-patch baseline's exact search.
_RAW_PRUNING_DIM = 64
# Values of width, epochs, patches_per_image and batch_size left at None.
SCHEDULES = {
    "cpu": dict(width=32, epochs=EPOCHS_CPU, patches_per_image=10, batch_size=32),
    # the reference implementation's: 100 crops per image and task per epoch, batches of 64
    "paper": dict(width=64, epochs=300, patches_per_image=100, batch_size=64),
}


class PatchSVDD(PatchEmbeddingDetector):
    """Patch SVDD: self-supervised hierarchical patch encoder + nearest-neighbour maps.

    A K=64 patch encoder built hierarchically on a K=32 encoder is trained with
    ``L = lambda_svdd * L_SVDD' + L_SSL`` at both scales: L_SVDD' pulls together
    the features of a patch and of the same patch jittered by a few pixels;
    L_SSL is the cross-entropy of an MLP that predicts, from the feature
    difference, which of the 8 neighbours in a 3x3 grid the second patch came
    from (colours randomly perturbed so they cannot be a shortcut). At test
    time every patch (stride ``stride_big`` for K=64, ``stride_small`` for K=32)
    scores its L2 distance to the nearest training-patch feature; each pixel
    takes the mean score of the patches covering it; the two maps are
    multiplied; the image score is the map's maximum.

    Parameters
    ----------
    lambda_svdd : float, default=1e-3
        Weight of L_SVDD' (the paper's lambda). 1e-3 is the value of the
        reference code's example command; its command-line default, 1,
        collapsed the encoder with the CPU schedule on MVTec bottle:
        L_SVDD' fell below 1e-3 within 2 epochs while the position loss stayed
        at chance (log 8), and every patch got the same feature (image and
        pixel AUROC 0.5).
    embedding_dim : int, default=64
        Feature dimension D.
    patch_size : {32, 64}, default=64
        K of the big encoder; the small one sees K/2.
    stride_big, stride_small : int, default=16, 4
        Inference strides of the K and K/2 patches (paper, at 256x256); even
        and at most the patch size of their scale, so that every pixel is
        covered.
    encoder : {"trained", "random", "raw"}, default="trained"
        The paper's method, or its two baselines: a randomly initialised
        encoder (no training) and raw patches (f(p) = p, flattened pixels).
    schedule : {"cpu", "paper"}, default="cpu"
        Training schedule the four parameters below default to. "cpu":
        ``width=32, epochs=40, patches_per_image=10, batch_size=32``,
        which fits MVTec bottle (209 images, 256x256) within 20 minutes on two
        CPU cores. "paper": the reference code's ``width=64, epochs=300,
        patches_per_image=100, batch_size=64`` (about 190x more steps; use a
        GPU, which ``device="auto"`` picks).
    width : int or None, default=None
        Base filter count of the small encoder (None: from ``schedule``).
    epochs : int or None, default=None
        Training epochs of ``ceil(n_images * patches_per_image / batch_size)``
        Adam steps; each step draws one batch per task (SVDD', position) and
        scale. None: from ``schedule``.
    patches_per_image : int or None, default=None
        Samples drawn per training image per epoch (None: from ``schedule``).
    batch_size : int or None, default=None
        Crop pairs per task and scale in each step (None: from ``schedule``).
    learning_rate : float, default=1e-4
        Adam.
    image_size : int, default=256
        Side of the square network input. Training a position pair needs
        ``2K - 1`` pixels (127 for K=64, 63 for K=32); the random and raw
        baselines need ``K``.
    subtract_mean : bool, default=False
        Subtract the per-pixel mean of the resized training images from every
        input, as the reference Patch SVDD code does (``(x - mean) / 255``),
        instead of mid-grey; the mean image is ``mean_image_``. Off by default:
        with the CPU schedule it lowered MVTec bottle to image / pixel AUROC
        0.922 / 0.888 (40 epochs, measured with PyTorch's default
        initialisation, before He initialisation); the reference schedule is
        190x longer.
        Either way the centred training images are scaled to unit standard
        deviation.
    n_calibration : int, default=16
        Training images scored leave-one-image-out to set ``offset_``.
    knn : {"exact", "pynndescent"}, default="exact"
    contamination : "auto" or float in (0, 0.5], default="auto"
    device : "auto", "cpu" or "cuda", default="auto"
    random_state : int, RandomState or None, default=None
        Seeds weight initialisation, patch sampling and calibration: the same
        int on CPU gives an identical fitted model. None draws the seed from
        numpy's global generator, as scikit-learn does.
    verbose : int, default=0
        Print the loss per epoch.

    Attributes
    ----------
    encoder_ : HierarchicalPatchEncoder or None
    inference_params_ : dict
        ``patch_size``, ``stride_big`` and ``stride_small`` as fitted. Scoring raises a
        ValueError if one of them was changed with ``set_params`` since ``fit`` (the
        bank and ``offset_`` depend on it).
    schedule_ : dict
        The width, epochs, patches_per_image and batch_size used.
    training_curve_ : list of dict
        Per epoch: epoch, seconds, mean losses.
    mean_image_ : ndarray of shape (3, image_size, image_size) or (3, 1, 1)
        Subtracted from every resized input image.
    input_scale_ : float
        Then multiplied in: 1 / standard deviation of the centred training images.
    offset_ : float

    Examples
    --------
    >>> from skpatchad import PatchSVDD
    >>> from skpatchad.datasets import load_sample
    >>> train = load_sample("train")
    >>> model = PatchSVDD(epochs=2, random_state=0).fit(train.images)  # doctest: +SKIP
    """

    _inference_params = ("patch_size", "stride_big", "stride_small")

    def __init__(self, lambda_svdd=1e-3, embedding_dim=64, patch_size=64, stride_big=16, stride_small=4,
                 encoder="trained", schedule="cpu", width=None, epochs=None, patches_per_image=None, batch_size=None,
                 learning_rate=1e-4,
                 image_size=256, subtract_mean=False,
                 n_calibration=16, knn="exact", contamination="auto", device="auto", random_state=None,
                 verbose=0):
        self.lambda_svdd = lambda_svdd
        self.embedding_dim = embedding_dim
        self.patch_size = patch_size
        self.stride_big = stride_big
        self.stride_small = stride_small
        self.encoder = encoder
        self.schedule = schedule
        self.width = width
        self.epochs = epochs
        self.patches_per_image = patches_per_image
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.image_size = image_size
        self.subtract_mean = subtract_mean
        self.n_calibration = n_calibration
        self.knn = knn
        self.contamination = contamination
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    # ------------------------------------------------------------------ utils
    def _check_params(self):
        check_bool_param("subtract_mean", self.subtract_mean)
        if self.encoder not in _ENCODERS:
            raise ValueError("encoder must be one of %s, got %r" % (_ENCODERS, self.encoder))
        check_int_choice("patch_size", self.patch_size, (32, 64))
        check_int_param("image_size", self.image_size)
        check_knn_method(self.knn)
        check_real_param("lambda_svdd", self.lambda_svdd, 0.0)
        check_real_param("learning_rate", self.learning_rate, 0.0, low_inclusive=False)
        if not isinstance(self.schedule, str) or self.schedule not in SCHEDULES:
            raise ValueError("schedule must be one of %s, got %r" % (tuple(SCHEDULES), self.schedule))
        self.schedule_ = {name: default if getattr(self, name) is None else getattr(self, name)
                          for name, default in SCHEDULES[self.schedule].items()}
        values = dict(self.schedule_, embedding_dim=self.embedding_dim, stride_big=self.stride_big,
                      stride_small=self.stride_small, n_calibration=self.n_calibration)
        for name, value in values.items():
            check_int_param(name, value, minimum=0 if name == "epochs" else 1)
        # training crops a patch and a neighbour up to K - 1 pixels away on both axes
        minimum = self.patch_size
        if self.encoder == "trained" and self.schedule_["epochs"] > 0:
            minimum = min_pair_image_size(self.patch_size, "reference")
        if self.image_size < minimum:
            raise ValueError("image_size must be at least %d for patch_size %d%s, got %d"
                             % (minimum, self.patch_size, " with a trained encoder" if minimum > self.patch_size
                                else "", self.image_size))
        small = self.patch_size // 2
        if self.stride_small % 2 or self.stride_big % 2:
            raise ValueError("strides must be even (the dense encoder map has stride 2)")
        if (self.image_size - small) % self.stride_small or (self.image_size - self.patch_size) % self.stride_big:
            raise ValueError("(image_size - K) must be divisible by the stride of each scale")
        # a stride beyond the patch leaves pixels that no patch covers (score 0: "normal")
        if self.stride_big > self.patch_size or self.stride_small > small:
            raise ValueError("strides must be at most the patch size of their scale (stride_big <= %d, "
                             "stride_small <= %d) so that patches cover every pixel, got %d and %d"
                             % (self.patch_size, small, self.stride_big, self.stride_small))

    # --------------------------------------------------------------- training
    def _sample_pairs(self, data, patch, generator, neighbours):
        """Crops for one task at one scale: (first, second, labels).

        As in the reference code: SVDD' pairs are a patch and the same patch
        shifted by a non-zero jitter of at most K/32 pixels per axis; position
        pairs are a patch and its neighbour ``3K/4 + U[0, K/4)`` away along
        each displaced axis (see :func:`neighbour_pair_corners`).
        """
        # an epoch draws patches_per_image pairs per image (as the reference
        # code's data loader does), in batches of batch_size or fewer
        batch = min(self.schedule_["batch_size"], len(data) * self.schedule_["patches_per_image"])
        size = data.shape[-1]
        image_index = torch.randint(len(data), (batch,), generator=generator)
        if neighbours:
            label = torch.randint(8, (batch,), generator=generator)
            first, second = neighbour_pair_corners(label, patch, size, generator, "reference")
        else:
            jit = max(1, patch // 32)
            # one of the (2 jit + 1)^2 - 1 non-zero shifts, uniformly
            side = 2 * jit + 1
            code = torch.randint(side * side - 1, (batch,), generator=generator)
            code = code + (code >= side * side // 2).long()  # skip the zero shift
            shift = torch.stack([code // side, code % side], 1) - jit
            first, second = pair_corners(shift, patch, size, generator)
            label = None
        y, x = first.unbind(1)
        y2, x2 = second.unbind(1)
        first = torch.stack([data[i, :, a:a + patch, b:b + patch] for i, a, b in zip(image_index, y, x)])
        second = torch.stack([data[i, :, a:a + patch, b:b + patch] for i, a, b in zip(image_index, y2, x2)])
        if neighbours:
            first, second = self._perturb(first, generator), self._perturb(second, generator)
            label = label.to(first.device)
        return first, second, label

    def _train(self, data, generator, classifiers):
        big, small = self.encoder_, self.encoder_.small
        optimizer = torch.optim.Adam(list(big.parameters()) + list(classifiers.parameters()), lr=self.learning_rate)
        # the paper's data pipeline draws ``patches_per_image`` samples per image per epoch
        epochs, batch_size = int(self.schedule_["epochs"]), self.schedule_["batch_size"]
        steps = max(1, math.ceil(len(data) * self.schedule_["patches_per_image"] / batch_size))
        scales = [(big, self.patch_size, classifiers[0]),
                  (lambda p: small(p).flatten(1), self.patch_size // 2, classifiers[1])]
        self.training_curve_ = []
        start = time.perf_counter()
        big.train()
        big.to(memory_format=torch.channels_last)
        for epoch in range(1, epochs + 1):
            totals = np.zeros(2)
            for _ in range(steps):
                loss = 0.0
                for encode, patch, classifier in scales:
                    jittered = self._sample_pairs(data, patch, generator, neighbours=False)[:2]
                    *neighbours, label = self._sample_pairs(data, patch, generator, neighbours=True)
                    # one forward over all four crop sets (the encoder has no batch
                    # statistics, so this is the same function) in channels-last
                    # layout: ~1.5x faster per step on CPU than four small calls
                    crops = torch.cat(list(jittered) + neighbours).contiguous(memory_format=torch.channels_last)
                    a, b, c, d = encode(crops).split([len(x) for x in list(jittered) + neighbours])
                    svdd = (a - b).norm(dim=1).mean()  # the paper's sum of L2 distances
                    ssl = F.cross_entropy(classifier(c, d), label)
                    loss = loss + self.lambda_svdd * svdd + ssl
                    totals += (svdd.item(), ssl.item())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            record = dict(epoch=epoch, seconds=time.perf_counter() - start,
                          svdd=totals[0] / (2 * steps), ssl=totals[1] / (2 * steps))
            self.training_curve_.append(record)
            self._log("epoch %d/%d  L_SVDD' %.4f  L_SSL %.4f  (%.0fs)" % (
                epoch, epochs, record["svdd"], record["ssl"], record["seconds"]))
            self._after_epoch(epoch)
        big.to(memory_format=torch.contiguous_format)
        big.eval()

    # ------------------------------------------------------------------ fit
    def _fit_images(self, images):
        seed, generator, data = self._start_fit(images)
        device = self.device_
        self.training_curve_ = []
        if self.encoder == "raw":
            self.encoder_ = None
        else:
            train = self.encoder == "trained" and self.schedule_["epochs"] > 0
            with seeded_cpu_rng(seed):  # weight initialisation; training samples from `generator`
                small = SmallPatchEncoder(self.embedding_dim, self.patch_size // 2, int(self.schedule_["width"]))
                self.encoder_ = HierarchicalPatchEncoder(small, self.embedding_dim).to(device)
                if train:  # one relative-position classifier per scale
                    classifiers = torch.nn.ModuleList([PositionClassifier(self.embedding_dim) for _ in range(2)])
            if train:
                self._train(data, generator, classifiers.to(device))
        for parameter in (self.encoder_.parameters() if self.encoder_ is not None else []):
            parameter.requires_grad_(False)
        return self._fit_bank(data, seed)

    def _fit_bank(self, data, seed):
        """Training-patch features -> kNN indexes; returns calibration scores."""
        device = self.device_
        big = small = None
        for i in range(0, len(data), 8):
            big_part, small_part = self._dense_features(data[i:i + 8])
            if big is None:  # filled in place: raw-patch banks are gigabytes, a list + cat doubles that
                big = big_part.new_empty((len(data),) + big_part.shape[1:])
                small = small_part.new_empty((len(data),) + small_part.shape[1:])
            big[i:i + 8], small[i:i + 8] = big_part, small_part
        self.grid_shapes_ = (tuple(big.shape[1:3]), tuple(small.shape[1:3]))
        self.nn_indexes_ = []
        # raw patches (3,072 and 12,288 values) are searched exactly with lower-bound pruning
        pruning_dim = _RAW_PRUNING_DIM if self.encoder_ is None else None
        for feats in (big, small):
            index = NearestNeighbors(self.knn, device=device, random_state=int(seed), pruning_dim=pruning_dim)
            self.nn_indexes_.append(index.fit(feats.reshape(-1, feats.shape[-1])))

        # leave-one-image-out scores of a few training images set the threshold
        chosen = self._calibration_images(len(data), seed)
        if len(data) == 1:
            self._warn_single_image()
            return self._scores_from_features(big[:1], small[:1], None)[0].cpu().numpy()
        return self._scores_from_features(big[chosen], small[chosen], chosen)[0].cpu().numpy()

    # --------------------------------------------------------------- scoring
    @torch.inference_mode()
    def _dense_features(self, batch):
        """(B, n, n, D) features of K patches at stride_big and K/2 patches at stride_small."""
        small_patch = self.patch_size // 2
        if self.encoder_ is None:  # raw patches: f(p) = p
            big = F.unfold(batch, self.patch_size, stride=self.stride_big)
            small = F.unfold(batch, small_patch, stride=self.stride_small)
            n_big = (batch.shape[-1] - self.patch_size) // self.stride_big + 1
            n_small = (batch.shape[-1] - small_patch) // self.stride_small + 1
            return (big.transpose(1, 2).reshape(len(batch), n_big, n_big, -1),
                    small.transpose(1, 2).reshape(len(batch), n_small, n_small, -1))
        big_map, small_map = self.encoder_.dense(batch)
        step_big, step_small = self.stride_big // 2, self.stride_small // 2
        big_map = big_map[:, :, ::step_big, ::step_big]
        small_map = small_map[:, :, ::step_small, ::step_small]
        return big_map.permute(0, 2, 3, 1).contiguous(), small_map.permute(0, 2, 3, 1).contiguous()

    @torch.inference_mode()
    def _scores_from_features(self, big, small, image_ids):
        """Image scores and (B, S, S) maps; image_ids excludes each image's own patches."""
        return self._nn_map([(big, self.nn_indexes_[0], self.patch_size, self.stride_big),
                             (small, self.nn_indexes_[1], self.patch_size // 2, self.stride_small)], image_ids)

    def _models(self):
        return [self.encoder_] + list(self.nn_indexes_)

    def _score_batch(self, batch):
        big, small = self._dense_features(batch)
        return self._scores_from_features(big, small, None)
