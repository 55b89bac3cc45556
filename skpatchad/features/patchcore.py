"""PatchCore's locally aware patch features as a plain torch module."""

import torch
import torch.nn.functional as F
from torch import nn


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
    locally aware patch aggregation), deeper levels are bilinearly upsampled to
    the grid of the first (shallowest) one, each level is projected to
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
        """Return embeddings of shape (B, h, w, D') on the first map's grid."""
        grid = feature_maps[0].shape[-2:]
        per_level = max(1, self.embedding_dim // len(feature_maps))
        levels = []
        for features in feature_maps:
            features = local_average(features.float(), self.patch_size)
            if features.shape[-2:] != grid:
                features = F.interpolate(features, size=grid, mode="bilinear", align_corners=False)
            levels.append(project_channels(features, per_level))
        return torch.cat(levels, dim=1).permute(0, 2, 3, 1).contiguous()
