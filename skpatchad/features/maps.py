"""The one path from patch-score grids to per-pixel anomaly maps.

All estimators hand a grid of patch scores per image (the grid covers the
network input) to :func:`grid_to_maps`, which upsamples it bilinearly to the
network input size, smooths it with a Gaussian (sigma in network-input pixels,
as in PatchCore), undoes the centre crop and resizes each map to its own
image's original height and width.
"""

import numpy as np
import torch
import torch.nn.functional as F


def gaussian_blur(maps, sigma):
    """Separable Gaussian blur of ``(B, 1, H, W)`` maps, reflect padding, truncated at 4 sigma."""
    if sigma is None or sigma <= 0:
        return maps
    radius = max(1, int(4.0 * sigma + 0.5))
    coords = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (coords / sigma) ** 2)
    kernel = kernel / kernel.sum()
    height, width = maps.shape[-2:]
    # reflect padding needs pad < size; replicate beyond that (tiny axes only),
    # decided per axis so a thin map is still reflected along its long side
    out = F.pad(maps, (radius, radius, 0, 0), mode="reflect" if radius < width else "replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1))
    out = F.pad(out, (0, 0, radius, radius), mode="reflect" if radius < height else "replicate")
    return F.conv2d(out, kernel.view(1, 1, -1, 1))


def grid_to_maps(grids, geometry, output_sizes, sigma=4.0):
    """Convert patch-score grids to anomaly maps at each image's own resolution.

    Parameters
    ----------
    grids : torch.Tensor of shape (B, h, w)
        Patch scores laid out on the patch grid covering the network input.
    geometry : ImageGeometry
        How images were resized/cropped before the network.
    output_sizes : list of (int, int)
        Original (H, W) of each image.
    sigma : float
        Gaussian sigma in network-input pixels (PatchCore: 4).

    Returns
    -------
    maps : list of ndarray of float32, each of shape output_sizes[i]
    """
    maps = grids.float().unsqueeze(1)
    maps = F.interpolate(maps, size=geometry.input_size, mode="bilinear", align_corners=False)
    maps = gaussian_blur(maps, sigma)
    if geometry.crop is not None:
        top, left, height, width = geometry.crop
        full_h, full_w = geometry.resize
        # outside the crop the network saw nothing: extend the border values
        maps = F.pad(maps, (left, full_w - left - width, top, full_h - top - height), mode="replicate")
    result = [None] * len(output_sizes)
    by_size = {}
    for index, size in enumerate(output_sizes):
        by_size.setdefault(tuple(size), []).append(index)
    for size, indices in by_size.items():
        selected = maps[indices]
        if tuple(selected.shape[-2:]) != size:
            selected = F.interpolate(selected, size=size, mode="bilinear", align_corners=False)
        selected = selected[:, 0].cpu().numpy()
        for position, index in enumerate(indices):
            result[index] = selected[position]
    return result


def stack_if_same_size(maps):
    """Return an (N, H, W) array when all maps share one size, else the list."""
    if isinstance(maps, np.ndarray):
        return maps
    if len({m.shape for m in maps}) == 1:
        return np.stack(maps)
    return maps


def covering_mean(scores, patch_size, stride, out_size):
    """Per-pixel mean of the scores of every patch covering the pixel.

    ``scores`` (B, n_h, n_w) are patch scores on a grid with the given stride;
    patches are ``patch_size`` wide. Pixels covered by no patch get 0.
    """
    kernel = torch.ones(1, 1, patch_size, patch_size, device=scores.device, dtype=scores.dtype)
    total = F.conv_transpose2d(scores.unsqueeze(1), kernel, stride=stride)
    count = F.conv_transpose2d(torch.ones_like(scores[:1]).unsqueeze(1), kernel, stride=stride)
    total = total[..., : out_size[0], : out_size[1]]
    count = count[..., : out_size[0], : out_size[1]]
    pad = (0, out_size[1] - total.shape[-1], 0, out_size[0] - total.shape[-2])
    total, count = F.pad(total, pad), F.pad(count, pad)
    return (total / count.clamp_min(1.0))[:, 0]
