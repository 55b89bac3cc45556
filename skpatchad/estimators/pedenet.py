"""PEDENet (Zhang, Wang & Kuo, "PEDENet: Image Anomaly Localization via Patch
Embedding and Density Estimation").

No public implementation exists; this one is written to be read next to the
paper. Three networks are trained jointly:

* PE (patch embedding): the hierarchical conv encoder of Patch SVDD with the
  PEDENet filter list (:class:`~skpatchad.features.patch_encoders.PEDENetSmallEncoder`
  wrapped by :class:`~skpatchad.features.patch_encoders.HierarchicalPatchEncoder`);
* DE (density estimation): an MLP giving each embedding its membership in K
  Gaussian components, from which a batch's Gaussian mixture and the energy
  ``E(z) = -log sum_k phi_k N(z; mu_k, Sigma_k)`` follow (as in DAGMM);
* LP (location prediction): an MLP that predicts, from the difference of two
  neighbouring patch embeddings, which of the 8 neighbours the second one is.

The GMM helpers below are plain functions so they can be checked against
scipy on their own.
"""

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..features._device import seeded_cpu_rng
from ..features.knn import NearestNeighbors, check_knn_method
from ..features.maps import covering_mean
from ..features.patch_encoders import (HierarchicalPatchEncoder, PEDENetSmallEncoder, PositionClassifier,
                                       min_pair_image_size, neighbour_pair_corners)
from ..utils._params import check_bool_param, check_int_choice, check_int_param, check_real_param
from ._base import PatchEmbeddingDetector

_SCORES = ("nn", "energy")
_PATCH_SIZES = (36, 72)  # the sub-patch encoder alone, or the hierarchical encoder on its 2x2 grid
# Added to every covariance before its Cholesky factorisation. Embeddings are
# tanh-bounded to [-1, 1], so an absolute jitter is on a known scale: 1e-4 keeps
# a collapsed component (duplicate points, Sigma = 0) factorisable in float32
# and float64 alike while being far below the variances of a useful embedding.
# It is not only a safeguard: a training batch (paper: 128 patches shared by K
# components) holds fewer points per component than D = 64 dimensions, so the
# batch covariances are rank-deficient and the jitter bounds their log-det
# (the batch energy sits near -0.5 * D * log(jitter) early in training). The
# mixture fitted on all training embeddings after training is full rank.
GMM_JITTER = 1e-4


# ---------------------------------------------------------------------- GMM
def gmm_parameters(z, gamma):
    """M-step: mixture weights, means and covariances from memberships.

    Parameters
    ----------
    z : torch.Tensor of shape (N, D)
    gamma : torch.Tensor of shape (N, K)
        Soft memberships (rows sum to 1).

    Returns
    -------
    phi : (K,) mean membership; mu : (K, D); sigma : (K, D, D)
    """
    mass = gamma.sum(0)  # sum_i gamma_ik
    safe = mass.clamp_min(torch.finfo(z.dtype).tiny)  # an empty component would divide by 0
    phi = mass / len(z)
    mu = gamma.T @ z / safe[:, None]
    diff = z[:, None, :] - mu[None]  # (N, K, D)
    sigma = torch.einsum("nk,nkd,nke->kde", gamma, diff, diff) / safe[:, None, None]
    return phi, mu, sigma


def gmm_energy(z, phi, mu, sigma, jitter=GMM_JITTER):
    """Sample energy ``E(z) = -log sum_k phi_k N(z; mu_k, Sigma_k + jitter I)``.

    Numerically stable: the log-density of each component comes from the
    Cholesky factor L of ``Sigma_k + jitter I`` (log det = 2 sum log diag L;
    Mahalanobis term = |L^-1 (z - mu)|^2 by a triangular solve, no explicit
    inverse or determinant) and the mixture is combined with log-sum-exp.

    Returns
    -------
    energy : torch.Tensor of shape (N,)
    """
    dim = z.shape[-1]
    eye = torch.eye(dim, dtype=sigma.dtype, device=sigma.device)
    chol = torch.linalg.cholesky(sigma + jitter * eye)  # (K, D, D), lower
    diff = (z[:, None, :] - mu[None]).permute(1, 2, 0)  # (K, D, N)
    solved = torch.linalg.solve_triangular(chol, diff, upper=False)
    mahalanobis = solved.pow(2).sum(1).T  # (N, K)
    log_det = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)  # (K,)
    log_density = -0.5 * (mahalanobis + log_det + dim * math.log(2.0 * math.pi))
    # An empty component (phi = 0) contributes log(0) = -inf, which logsumexp
    # handles; its backward, though, would be 0 * (1 / 0) = NaN in every weight,
    # so log(phi) is only taken where phi > 0 (torch.where passes no gradient
    # to the branch it does not select, and the clamp keeps that branch finite).
    log_phi = torch.where(phi > 0, torch.log(phi.clamp_min(torch.finfo(phi.dtype).tiny)),
                          torch.full_like(phi, -torch.inf))
    return -torch.logsumexp(log_phi + log_density, dim=1)


def covariance_penalty(sigma, jitter=GMM_JITTER):
    """``sum_k sum_d 1 / Sigma_k[d, d]`` (DAGMM's guard against singular components)."""
    return (1.0 / (torch.diagonal(sigma, dim1=-2, dim2=-1) + jitter)).sum()


class DensityEstimator(nn.Module):
    """DE network: embedding -> 128 -> 64 -> 32 -> softmax over K components (E-step)."""

    def __init__(self, embedding_dim=64, n_components=4, hidden=(128, 64, 32)):
        super().__init__()
        sizes = [embedding_dim] + list(hidden)
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.LeakyReLU(0.1)]
        self.net = nn.Sequential(*layers, nn.Linear(sizes[-1], n_components))

    def forward(self, z):
        """(N, D) embeddings -> (N, K) memberships gamma."""
        return torch.softmax(self.net(z), dim=1)


# ----------------------------------------------------------------- estimator
class PEDENet(PatchEmbeddingDetector):
    """PEDENet: patch embedding + density estimation + location prediction.

    The PE network embeds ``patch_size`` patches; the DE network assigns each
    embedding soft memberships gamma in ``n_components`` Gaussians, whose batch
    estimates (phi_k = mean gamma_k, mu_k, Sigma_k) give the energy
    ``E(z) = -log sum_k phi_k N(z; mu_k, Sigma_k)``; the LP network predicts the
    relative position (8 classes) of two neighbouring patches from their
    embedding difference. All three are trained jointly with Adam on::

        L = lambda_energy * mean E(z) + lambda_position * CE_LP
            + lambda_cov * sum_k sum_d 1 / Sigma_k[d, d]

    After training the mixture is re-estimated on all training embeddings. At
    test time each patch scores the L2 distance of its embedding to the nearest
    training embedding (``score="nn"``, the paper's localisation) or its energy
    under the fitted mixture (``score="energy"``); each pixel takes the mean
    score of the patches covering it; the image score is the map's maximum.

    Parameters
    ----------
    n_components : int, default=4
        K, Gaussians in the mixture.
    lambda_energy : float, default=0.001
        lambda_1, weight of the mean sample energy. DAGMM's 0.1 (with
        lambda_cov 0.005) was measured to wreck the embeddings: a batch of
        128 patches gives each of K Gaussians fewer points than D = 64
        dimensions, so the batch covariances are rank-deficient and the
        energy keeps falling as the embeddings collapse onto a subspace
        (down to the jitter's floor). On MVTec bottle with the default
        schedule, 0.1 / 0.005 ended at image / pixel AUROC 0.60 / 0.36 and the
        LP loss at 1.82; 0.001 / 5e-5 (DAGMM's ratio, 100x smaller) at
        0.98 / 0.93 with the LP loss at 0.10.
    lambda_position : float, default=1.0
        lambda_2, weight of the LP cross-entropy.
    lambda_cov : float, default=5e-5
        lambda_3, weight of ``sum 1/diag(Sigma_k)``: keeps the energy term
        from collapsing a component onto a point (see ``lambda_energy``).
    embedding_dim : int, default=64
        D, output filters of the PE network (paper: 64).
    patch_size : {72, 36}, default=72
        72: the hierarchical PE network (2x2 grid of 36-pixel sub-patches);
        36: the sub-patch encoder alone (small images, e.g. tests). Fixed by
        the paper's layer list: nine 3x3 valid convolutions reduce 36 pixels
        to 1x1.
    stride : int, default=8
        Inference stride of the patch grid; even, at most ``patch_size`` (so
        that every pixel is covered), and dividing ``image_size - patch_size``.
    stride_small : int or None, default=None
        None: maps from the ``patch_size`` embeddings alone. An even int
        of at most 36 (e.g. 4): also embed every 36-pixel sub-patch at this stride, score it
        against the sub-patch embeddings of the training images, and multiply
        the two maps, as Patch SVDD combines its two scales. Only with
        ``patch_size=72`` and ``score="nn"``.
    epochs : int, default=30
        Training epochs of ``ceil(n_images * patches_per_image / batch_size)``
        Adam steps. The paper's batch sizes and learning rate are the
        defaults; only the length is set for a CPU: on MVTec bottle (209
        images, 256x256) 30 epochs are 510 steps of ~1.4 s on two CPU cores,
        about 13 minutes with feature extraction. For a longer, paper-scale
        run raise ``epochs``, the one parameter to change (GPU advised).
    patches_per_image : int, default=10
        DE patches drawn per training image per epoch.
    batch_size : int, default=128
        Patches per step for the energy (paper: 128); LP gets
        ``round(batch_size * 36 / 128)`` neighbour pairs per step, the paper's
        36 at the default.
    learning_rate : float, default=1e-4
        Adam (paper).
    image_size : int, default=256
        Side of the square network input; at least ``2K + K/8`` (76 for
        ``patch_size=36``, 153 for 72, hence 154 with an even stride), where
        an LP pair fits.
    subtract_mean : bool, default=False
        Subtract the per-pixel mean of the resized training images (Patch
        SVDD's reference preprocessing) instead of mid-grey. Off by default:
        on MVTec bottle, centring on the mean image left the LP task at chance
        for the whole default schedule (cross-entropy 2.07 = log 8 after 30
        epochs) and the NN maps fell to pixel AUROC 0.42. Either way the
        centred training images are scaled to unit standard deviation.
    n_calibration : int, default=16
        Training images scored leave-one-image-out to set ``offset_``: against
        the training embeddings of the other images (``score="nn"``), or under
        the mixture re-estimated without the image (``score="energy"``).
    score : {"nn", "energy"}, default="nn"
        Patch score: nearest-neighbour distance or fitted-GMM energy.
    knn : {"exact", "pynndescent"}, default="exact"
    contamination : "auto" or float in (0, 0.5], default="auto"
    device : "auto", "cpu" or "cuda", default="auto"
    random_state : int, RandomState or None, default=None
        Seeds weight initialisation, patch sampling and calibration: the same
        int on CPU gives an identical fitted model. None draws the seed from
        numpy's global generator, as scikit-learn does.
    verbose : int, default=0
        Print the losses per epoch.

    Attributes
    ----------
    inference_params_ : dict
        ``score``, ``patch_size``, ``stride`` and ``stride_small`` as fitted. Scoring
        raises a ValueError if one of them was changed with ``set_params`` since ``fit``
        (the bank and ``offset_`` depend on it).
    encoder_ : HierarchicalPatchEncoder
        PE network (its ``.small`` is the sub-patch encoder).
    density_ : DensityEstimator
        DE network.
    position_ : PositionClassifier
        LP network.
    gmm_weights_ : ndarray of shape (n_components,)
    gmm_means_ : ndarray of shape (n_components, embedding_dim)
    gmm_covariances_ : ndarray of shape (n_components, embedding_dim, embedding_dim)
        Mixture fitted on all training embeddings after training (float64).
    n_parameters_ : int
        Trainable parameters of PE + DE + LP.
    training_curve_ : list of dict
        Per epoch: epoch, seconds, mean loss terms (energy, position, cov, loss).
    mean_image_ : ndarray of shape (3, image_size, image_size) or (3, 1, 1)
        Subtracted from every resized input image.
    input_scale_ : float
        Then multiplied in: 1 / standard deviation of the centred training images.
    offset_ : float

    Examples
    --------
    >>> from skpatchad import PEDENet
    >>> from skpatchad.datasets import load_sample
    >>> train = load_sample("train")
    >>> model = PEDENet(image_size=128, patch_size=36, stride=4, epochs=1,
    ...                 random_state=0).fit(train.images)  # doctest: +SKIP
    >>> maps = model.predict_map(load_sample("test").images)  # doctest: +SKIP
    """

    _inference_params = ("score", "patch_size", "stride", "stride_small")

    def __init__(self, n_components=4, lambda_energy=0.001, lambda_position=1.0, lambda_cov=5e-5,
                 embedding_dim=64, patch_size=72, stride=8, stride_small=None, epochs=30, patches_per_image=10, batch_size=128,
                 learning_rate=1e-4, image_size=256, subtract_mean=False, n_calibration=16, score="nn",
                 knn="exact", contamination="auto", device="auto", random_state=None, verbose=0):
        self.n_components = n_components
        self.lambda_energy = lambda_energy
        self.lambda_position = lambda_position
        self.lambda_cov = lambda_cov
        self.embedding_dim = embedding_dim
        self.patch_size = patch_size
        self.stride = stride
        self.stride_small = stride_small
        self.epochs = epochs
        self.patches_per_image = patches_per_image
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.image_size = image_size
        self.subtract_mean = subtract_mean
        self.n_calibration = n_calibration
        self.score = score
        self.knn = knn
        self.contamination = contamination
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    # ------------------------------------------------------------------ utils
    def _check_params(self):
        check_bool_param("subtract_mean", self.subtract_mean)
        check_knn_method(self.knn)
        if self.score not in _SCORES:
            raise ValueError("score must be one of %s, got %r" % (_SCORES, self.score))
        check_int_choice("patch_size", self.patch_size, _PATCH_SIZES)
        check_int_param("image_size", self.image_size)
        for name in ("lambda_energy", "lambda_position", "lambda_cov"):
            check_real_param(name, getattr(self, name), 0.0)
        check_real_param("learning_rate", self.learning_rate, 0.0, low_inclusive=False)
        for name in ("n_components", "embedding_dim", "stride", "batch_size",
                     "n_calibration", "patches_per_image"):
            check_int_param(name, getattr(self, name))
        check_int_param("epochs", self.epochs, minimum=0)
        # LP needs a patch and one neighbour (offset K + K/8 at most) inside the image
        minimum = min_pair_image_size(self.patch_size, "jittered")
        if self.image_size < minimum:
            raise ValueError("image_size must be at least %d for patch_size %d, got %d"
                             % (minimum, self.patch_size, self.image_size))
        if self.stride % 2:
            raise ValueError("stride must be even (the dense encoder map has stride 2)")
        if (self.image_size - self.patch_size) % self.stride:
            raise ValueError("(image_size - patch_size) must be divisible by stride")
        # a stride beyond the patch leaves pixels that no patch covers (score 0: "normal")
        if self.stride > self.patch_size:
            raise ValueError("stride must be at most patch_size (%d) so that patches cover every pixel, got %d"
                             % (self.patch_size, self.stride))
        if self.stride_small is not None:
            small = _PATCH_SIZES[0]
            if self.patch_size == small or self.score != "nn":
                raise ValueError("stride_small needs patch_size=%d and score='nn'" % _PATCH_SIZES[1])
            check_int_param("stride_small", self.stride_small)
            if self.stride_small % 2:
                raise ValueError("stride_small must be an even positive integer or None, got %r"
                                 % (self.stride_small,))
            if (self.image_size - small) % self.stride_small:
                raise ValueError("(image_size - %d) must be divisible by stride_small" % small)
            if self.stride_small > small:
                raise ValueError("stride_small must be at most %d so that sub-patches cover every pixel, got %d"
                                 % (small, self.stride_small))

    def _embed(self, patches):
        """(B, 3, K, K) patches -> (B, D) embeddings at the chosen scale."""
        if self.patch_size == self.encoder_.patch_size:
            return self.encoder_(patches)
        return self.encoder_.small(patches).flatten(1)

    # --------------------------------------------------------------- training
    def _sample_patches(self, data, generator):
        """``batch_size`` random K x K crops (DE batch)."""
        patch, size = self.patch_size, data.shape[-1]
        image_index = torch.randint(len(data), (self.batch_size,), generator=generator)
        y = torch.randint(size - patch + 1, (self.batch_size,), generator=generator)
        x = torch.randint(size - patch + 1, (self.batch_size,), generator=generator)
        return torch.stack([data[i, :, a:a + patch, b:b + patch] for i, a, b in zip(image_index, y, x)])

    def _position_pairs(self):
        """LP pairs per step: the paper's 36 pairs per 128 DE patches."""
        return max(1, round(self.batch_size * 36 / 128))

    def _sample_pairs(self, data, generator):
        """``round(batch_size * 36 / 128)`` (centre, neighbour, label) crops for LP.

        As in Patch SVDD the neighbour sits one patch away along each axis of
        the label's direction, jittered by up to K/8 so that the network cannot
        match borders pixel-exactly. The label is drawn first and the centre
        only where that one neighbour fits, so images need only hold two
        patches (plus jitter) across instead of three.
        """
        patch, size, batch = self.patch_size, data.shape[-1], self._position_pairs()
        image_index = torch.randint(len(data), (batch,), generator=generator)
        label = torch.randint(8, (batch,), generator=generator)
        first_corner, second_corner = neighbour_pair_corners(label, patch, size, generator, "jittered")
        first = torch.stack([data[i, :, a:a + patch, b:b + patch]
                             for i, (a, b) in zip(image_index, first_corner.tolist())])
        second = torch.stack([data[i, :, a:a + patch, b:b + patch]
                              for i, (a, b) in zip(image_index, second_corner.tolist())])
        first, second = self._perturb(first, generator), self._perturb(second, generator)
        return first, second, label.to(first.device)

    def _loss_terms(self, data, generator):
        """(energy, position, cov) losses of one step."""
        patches = self._sample_patches(data, generator)
        first, second, label = self._sample_pairs(data, generator)
        # one channels-last forward over the DE patches and both LP crop sets
        # (the encoder has no batch statistics, so this is the same function;
        # it is ~1.5x faster per step on CPU than three separate calls)
        crops = torch.cat([patches, first, second]).contiguous(memory_format=torch.channels_last)
        z, z_first, z_second = self._embed(crops).split([len(patches), len(first), len(second)])
        gamma = self.density_(z)
        # The mixture maths runs in float64: a 64x64 Cholesky in float32 loses
        # too many digits once a component gets thin, and it costs nothing here.
        z64, gamma64 = z.double(), gamma.double()
        phi, mu, sigma = gmm_parameters(z64, gamma64)
        energy = gmm_energy(z64, phi, mu, sigma).mean()
        cov = covariance_penalty(sigma)
        position = F.cross_entropy(self.position_(z_first, z_second), label)
        return energy.float(), position, cov.float()

    def _train(self, data, generator):
        networks = nn.ModuleList([self.encoder_, self.density_, self.position_])
        optimizer = torch.optim.Adam(networks.parameters(), lr=self.learning_rate)
        steps = max(1, math.ceil(len(data) * self.patches_per_image / self.batch_size))
        self.training_curve_ = []
        start = time.perf_counter()
        networks.train()
        self.encoder_.to(memory_format=torch.channels_last)
        for epoch in range(1, int(self.epochs) + 1):
            totals = np.zeros(4)
            for _ in range(steps):
                energy, position, cov = self._loss_terms(data, generator)
                loss = self.lambda_energy * energy + self.lambda_position * position + self.lambda_cov * cov
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                totals += (energy.item(), position.item(), cov.item(), loss.item())
            record = dict(zip(("energy", "position", "cov", "loss"), totals / steps))
            record.update(epoch=epoch, seconds=time.perf_counter() - start, steps=steps)
            self.training_curve_.append(record)
            self._log("epoch %d/%d  loss %.4f  energy %.3f  LP %.4f  cov %.3f  (%.0fs)" % (
                epoch, self.epochs, record["loss"], record["energy"], record["position"], record["cov"],
                record["seconds"]))
            self._after_epoch(epoch)
        self.encoder_.to(memory_format=torch.contiguous_format)
        networks.eval()

    # ------------------------------------------------------------------ fit
    def _fit_images(self, images):
        seed, generator, data = self._start_fit(images)
        device = self.device_

        dim = int(self.embedding_dim)
        with seeded_cpu_rng(seed):  # weight initialisation; training samples from `generator`
            self.encoder_ = HierarchicalPatchEncoder(PEDENetSmallEncoder(dim), dim).to(device)
            self.density_ = DensityEstimator(dim, int(self.n_components)).to(device)
            self.position_ = PositionClassifier(dim).to(device)
        networks = (self.encoder_, self.density_, self.position_)
        # patch_size=36 uses the sub-patch encoder alone: the aggregation layers are never trained
        used_encoder = self.encoder_ if self.patch_size == self.encoder_.patch_size else self.encoder_.small
        self.n_parameters_ = sum(p.numel() for net in (used_encoder,) + networks[1:] for p in net.parameters())
        self.training_curve_ = []
        if self.epochs > 0:
            self._train(data, generator)
        for net in networks:
            for parameter in net.parameters():
                parameter.requires_grad_(False)
        return self._fit_bank(data, seed)

    def _fit_bank(self, data, seed):
        """Training embeddings -> kNN indexes and the final mixture; returns calibration scores."""
        device, dim = self.device_, int(self.embedding_dim)
        parts = [self._dense_features(data[i:i + 8]) for i in range(0, len(data), 8)]
        features = torch.cat([big for big, _ in parts])
        small_features = None if self.stride_small is None else torch.cat([small for _, small in parts])
        del parts
        self.grid_shape_ = tuple(features.shape[1:3])
        bank = features.reshape(-1, dim)
        self.nn_index_ = NearestNeighbors(self.knn, device=device, random_state=int(seed)).fit(bank)
        self.small_nn_index_ = None
        if small_features is not None:
            self.small_nn_index_ = NearestNeighbors(self.knn, device=device, random_state=int(seed)).fit(
                small_features.reshape(-1, dim))
        # the final mixture: E-step by the trained DE network, M-step on all training embeddings
        with torch.inference_mode():
            z, gamma = bank.double(), self.density_(bank).double()
            mixture = gmm_parameters(z, gamma)
        self.gmm_weights_, self.gmm_means_, self.gmm_covariances_ = (t.cpu().numpy() for t in mixture)

        # leave-one-image-out scores of a few training images set the threshold
        chosen = self._calibration_images(len(data), seed)
        if len(data) == 1:  # nothing to leave out against: score the image against itself
            self._warn_single_image()
            chosen = None
        pick = slice(0, 1) if chosen is None else chosen
        if self.score == "energy" and chosen is not None:
            # the mixture was fitted on every training embedding, the image's own
            # included: re-estimate it without the image, as an unseen one is scored
            per_image = int(np.prod(self.grid_shape_))
            scores = []
            with torch.inference_mode():
                for image in chosen:
                    keep = torch.ones(len(z), dtype=torch.bool, device=z.device)
                    keep[image * per_image:(image + 1) * per_image] = False
                    held_out = gmm_parameters(z[keep], gamma[keep])
                    scores.append(self._energy_scores(features[image:image + 1], held_out)[0])
            return torch.cat(scores).cpu().numpy()
        small_chosen = None if small_features is None else small_features[pick]
        return self._scores_from_features(features[pick], small_chosen, chosen)[0].cpu().numpy()

    # --------------------------------------------------------------- scoring
    @torch.inference_mode()
    def _dense_features(self, batch):
        """(B, n, n, D) embeddings of every ``patch_size`` patch at ``stride``, and
        (B, m, m, D) of every sub-patch at ``stride_small`` (None without it)."""
        big_map, small_map = self.encoder_.dense(batch)
        feature_map = big_map if self.patch_size == self.encoder_.patch_size else small_map
        step = self.stride // self.encoder_.small.stride
        features = feature_map[:, :, ::step, ::step].permute(0, 2, 3, 1).contiguous()
        if self.stride_small is None:
            return features, None
        step = self.stride_small // self.encoder_.small.stride
        return features, small_map[:, :, ::step, ::step].permute(0, 2, 3, 1).contiguous()

    @torch.inference_mode()
    def _scores_from_features(self, feats, small_feats, image_ids):
        """Image scores and (B, S, S) maps; image_ids excludes each image's own patches
        (NN scores only; the energy's leave-one-image-out calibration is in ``_fit_bank``)."""
        if self.score == "nn":
            scales = [(feats, self.nn_index_, self.patch_size, self.stride)]
            if small_feats is not None:
                scales.append((small_feats, self.small_nn_index_, _PATCH_SIZES[0], self.stride_small))
            return self._nn_map(scales, image_ids)
        mixture = [torch.as_tensor(a, device=feats.device)
                   for a in (self.gmm_weights_, self.gmm_means_, self.gmm_covariances_)]
        return self._energy_scores(feats, mixture)

    def _energy_scores(self, feats, mixture):
        """Image scores and maps of the patch energies under ``mixture`` (phi, mu, Sigma)."""
        batch, n_h, n_w, dim = feats.shape
        scores = gmm_energy(feats.reshape(-1, dim).double(), *mixture).float().reshape(batch, n_h, n_w)
        anomaly_map = covering_mean(scores, self.patch_size, self.stride, self.geometry_.input_size)
        return anomaly_map.flatten(1).max(1).values, anomaly_map

    def _models(self):
        return [self.encoder_, self.nn_index_, getattr(self, "small_nn_index_", None)]

    def _score_batch(self, batch):
        return self._scores_from_features(*self._dense_features(batch), None)
