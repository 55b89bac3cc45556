"""PatchCore's locally aware patch features as a plain torch module."""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .coreset import projection_matrix
from .maps import align_levels

# Keep every full training embedding when that costs at most this many bytes,
# or when the coreset projection would not even halve it: one backbone pass
# then suffices. Beyond that only the projected copy is kept (O(N d') memory)
# and the selected rows are gathered by a second pass.
KEEP_FULL_BYTES = 2 * 2**30


def local_average(features, patch_size):
    """Average each position over its p x p neighbourhood (borders: existing cells only)."""
    if patch_size <= 1:
        return features
    pad = patch_size // 2
    pooled = F.avg_pool2d(features, patch_size, stride=1, padding=pad, count_include_pad=False)
    return pooled[..., : features.shape[-2], : features.shape[-1]]  # even p yields one extra row/col


def project_channels(features, n_out):
    """Adaptive average pooling over channels, (B, C, h, w) -> (B, min(C, n_out), h, w)."""
    batch, channels, height, width = features.shape
    if channels <= n_out:
        return features
    flat = features.permute(0, 2, 3, 1).reshape(-1, 1, channels)
    flat = F.adaptive_avg_pool1d(flat, n_out)
    return flat.reshape(batch, height, width, n_out).permute(0, 3, 1, 2)


class LocallyAwarePatchEmbedding(nn.Module):
    """Turn multi-level backbone maps into one patch embedding per grid cell.

    Each level is averaged over a ``patch_size`` neighbourhood (the paper's
    locally aware patch aggregation), coarser levels are bilinearly upsampled
    to the finest grid among them (whatever order the layers come in; evenly
    tiled resizing, as in the official code), each level is projected to
    ``embedding_dim // n_levels`` channels by adaptive average pooling (levels
    already smaller are kept), and the levels are concatenated.

    Parameters
    ----------
    patch_size : int
        Neighbourhood size p (paper: 3).
    embedding_dim : int
        Target embedding dimension D (paper: 1024).
    """

    def __init__(self, patch_size=3, embedding_dim=1024):
        super().__init__()
        self.patch_size = int(patch_size)
        self.embedding_dim = int(embedding_dim)

    def forward(self, feature_maps):
        """Return embeddings of shape (B, h, w, D') on the finest map's grid."""
        per_level = max(1, self.embedding_dim // len(feature_maps))
        averaged = [local_average(features.float(), self.patch_size) for features in feature_maps]
        levels = [project_channels(features, per_level) for features in align_levels(averaged)]
        return torch.cat(levels, dim=1).permute(0, 2, 3, 1).contiguous()


class StreamedEmbeddings:
    """The training embeddings of PatchCore, collected batch by batch.

    Keeps what the coreset and the calibration need and no more: the
    Johnson-Lindenstrauss projection of every patch (written into one
    preallocated buffer as batches arrive), the full embeddings of the
    calibration images, and the full embeddings of all images only while they
    fit in ``keep_full_bytes`` (or barely exceed the projection).

    Parameters
    ----------
    n_images : int
    projection_dim : int or None
        d' of the projection; None or >= D keeps the embeddings themselves.
    projection_seed : int
    calibration_ids : ndarray of int
        Sorted training-image indices whose full embeddings are kept.
    keep_full_bytes : int
    """

    def __init__(self, n_images, projection_dim, projection_seed, calibration_ids,
                 keep_full_bytes=None):
        self.n_images = int(n_images)
        self.projection_dim = projection_dim
        self.projection_seed = projection_seed
        self.calibration_ids = np.asarray(calibration_ids, dtype=np.int64)
        self.keep_full_bytes = KEEP_FULL_BYTES if keep_full_bytes is None else keep_full_bytes
        self.full = self.projected = None
        self._calibration = None

    def _allocate(self, embeddings):
        _, grid_h, grid_w, dim = embeddings.shape
        self.grid_shape, self.dim = (grid_h, grid_w), dim
        self.cells = grid_h * grid_w
        self.n_patches = self.n_images * self.cells
        device = embeddings.device
        matrix = projection_matrix(dim, self.projection_dim, self.projection_seed)
        self.matrix = None if matrix is None else matrix.to(device)
        full_bytes = 4 * self.n_patches * dim
        keep_full = (self.matrix is None or full_bytes <= self.keep_full_bytes
                     or dim <= 2 * self.matrix.shape[1])
        if keep_full:
            self.full = torch.empty((self.n_images, grid_h, grid_w, dim), device=device)
        else:
            self._calibration = torch.empty((len(self.calibration_ids), grid_h, grid_w, dim), device=device)
        if self.matrix is not None:
            self.projected = torch.empty((self.n_patches, self.matrix.shape[1]), device=device)

    def add(self, start, embeddings):
        """Store the embeddings (B, h, w, D) of images ``start ... start + B - 1``."""
        if self.projected is None and self.full is None:
            self._allocate(embeddings)
        stop = start + len(embeddings)
        if self.full is not None:
            self.full[start:stop] = embeddings
        else:
            lo, hi = np.searchsorted(self.calibration_ids, [start, stop])
            self._calibration[lo:hi] = embeddings[torch.from_numpy(self.calibration_ids[lo:hi] - start)]
        if self.matrix is not None:
            torch.matmul(embeddings.reshape(-1, self.dim), self.matrix,
                         out=self.projected[start * self.cells:stop * self.cells])

    @property
    def coreset_points(self):
        """(n_patches, d') points the coreset is selected on."""
        return self.projected if self.projected is not None else self.full.view(-1, self.dim)

    def drop_projection(self):
        self.projected = None

    def gather(self, selected, batches):
        """Full embeddings of the ``selected`` patches, in that order.

        ``batches`` (an iterable of ``(start, embeddings)``, e.g. a lazy
        generator re-running the backbone) is consumed only when the full
        embeddings were not kept.
        """
        if self.full is not None:
            return self.full.view(-1, self.dim)[torch.from_numpy(selected).to(self.full.device)]
        order = np.argsort(selected, kind="stable")
        ordered = selected[order]
        bank = None
        for start, embeddings in batches:
            flat = embeddings.reshape(-1, self.dim)
            if bank is None:
                bank = torch.empty((len(selected), self.dim), device=flat.device)
            lo, hi = np.searchsorted(ordered, [start * self.cells, start * self.cells + len(flat)])
            rows = torch.from_numpy(ordered[lo:hi] - start * self.cells).to(flat.device)
            bank[torch.from_numpy(order[lo:hi]).to(flat.device)] = flat[rows]
        return bank

    def calibration_embeddings(self):
        """Full embeddings (n_calibration, h, w, D) of the calibration images."""
        if self.full is None:
            return self._calibration
        if len(self.calibration_ids) == self.n_images:
            return self.full
        return self.full[torch.from_numpy(self.calibration_ids).to(self.full.device)]
