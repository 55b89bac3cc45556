"""The one path from patch-score grids to per-pixel anomaly maps.

All estimators hand a grid of patch scores per image (the grid covers the
network input) to :func:`grid_to_maps`, which upsamples it bilinearly to the
network input size, smooths it with a Gaussian (sigma in network-input pixels,
as in PatchCore), undoes the centre crop and resizes each map to its own
image's original height and width -- all in one separable linear operator.
"""

import functools

import numpy as np
import torch
import torch.nn.functional as F


def _gaussian_kernel(sigma, dtype, device):
    """Normalised 1-D Gaussian taps truncated at 4 sigma, and their radius."""
    radius = max(1, int(4.0 * sigma + 0.5))
    coords = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    kernel = torch.exp(-0.5 * (coords / sigma) ** 2)
    return kernel / kernel.sum(), radius


def gaussian_blur(maps, sigma):
    """Separable Gaussian blur of ``(B, 1, H, W)`` maps, reflect padding, truncated at 4 sigma."""
    if sigma is None or sigma <= 0:
        return maps
    kernel, radius = _gaussian_kernel(sigma, maps.dtype, maps.device)
    height, width = maps.shape[-2:]
    # reflect padding needs pad < size; replicate beyond that (tiny axes only),
    # decided per axis so a thin map is still reflected along its long side
    out = F.pad(maps, (radius, radius, 0, 0), mode="reflect" if radius < width else "replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1))
    out = F.pad(out, (0, 0, radius, radius), mode="reflect" if radius < height else "replicate")
    return F.conv2d(out, kernel.view(1, 1, -1, 1))


# Where a backbone's feature cells sit on its input. "even": the cells tile the
# input evenly, cell j centred at s (j + 1/2) - 1/2 with s = length / n_cells,
# which is what bilinear resizing with align_corners=False (and the official
# PatchCore code) assumes; the gradient centroids of EfficientNet-Lite0's
# cells (TF "SAME" padding, trained weights) lie within about a pixel of it.
# "corner": cell j centred at s j for the integer stride s, the arithmetic of
# k // 2 padding throughout (torchvision's ResNets: a 7x7/2 stem padded by 3,
# 3x3/2 pooling padded by 1, stride-2 3x3 convolutions padded by 1, 1x1
# shortcuts). Treated as "even", a ResNet's layer2 map would sit 3.5 input
# pixels down and right of its cells and layer3 would be read 4 pixels off.
CELL_ALIGNMENTS = ("even", "corner")


def cell_centres(n_cells, length, alignment="even"):
    """Input-pixel coordinates (pixel centres at 0, 1, ...) of a feature grid's cell centres on one axis."""
    cells = torch.arange(n_cells, dtype=torch.float64)
    if alignment == "even":
        stride = length / n_cells
        return stride * (cells + 0.5) - 0.5
    if alignment == "corner":
        # the smallest power-of-two stride that gives this many cells (ceil(length / stride))
        stride = next((2 ** e for e in range(12) if -(-length // 2 ** e) == n_cells), length / n_cells)
        return stride * cells
    raise ValueError("cell alignment must be one of %s, got %r" % (CELL_ALIGNMENTS, alignment))


def interpolation_matrix(source, target):
    """``(len(target), len(source))`` linear interpolation between increasing 1-D positions.

    Targets beyond the first or last source position take that position's
    value (border extension, as bilinear resizing does).
    """
    source, target = torch.as_tensor(source, dtype=torch.float64), torch.as_tensor(target, dtype=torch.float64)
    n = len(source)
    matrix = torch.zeros(len(target), n, dtype=torch.float64)
    rows = torch.arange(len(target))
    if n == 1:
        matrix[:, 0] = 1.0
        return matrix
    clamped = target.clamp(source[0], source[-1])
    low = (torch.searchsorted(source, clamped, right=True) - 1).clamp(0, n - 2)
    frac = (clamped - source[low]) / (source[low + 1] - source[low])
    matrix[rows, low] = 1.0 - frac
    matrix[rows, low + 1] += frac
    return matrix


def align_levels(feature_maps, alignment="even", input_size=None):
    """Resample multi-level feature maps ``(B, C, h, w)`` onto the finest grid among them.

    Each level is read at the positions of the finest level's cells, given
    where the backbone's cells sit on its ``input_size`` (H, W) input
    (``alignment``, see ``cell_centres``). "even" is bilinear resizing with
    align_corners=False and needs no input size.
    """
    grid = finest_grid(feature_maps)
    aligned = []
    for features in feature_maps:
        shape = tuple(features.shape[-2:])
        if shape == grid:
            aligned.append(features)
        elif alignment == "even":
            aligned.append(F.interpolate(features, size=grid, mode="bilinear", align_corners=False))
        else:
            rows, cols = (interpolation_matrix(cell_centres(shape[axis], input_size[axis], alignment),
                                               cell_centres(grid[axis], input_size[axis], alignment))
                          .to(device=features.device, dtype=features.dtype) for axis in (0, 1))
            aligned.append(torch.einsum("bchw,Hh,Ww->bcHW", features, rows, cols))
    return aligned


@functools.lru_cache(maxsize=64)
def _axis_operator(n_cells, input_len, resize_len, crop_start, output_len, sigma, alignment="even"):
    """The map path along one axis as an ``(output_len, n_cells)`` float32 matrix.

    Every step of the path (bilinear upsampling, the reflect-padded Gaussian,
    the replicate padding of a crop margin, the final bilinear resize) is linear
    and separable, so a whole map is ``A_h @ grid @ A_w.T``. The matrix is
    built by sending the identity through the same steps, in float64.
    """
    if alignment == "even":
        signal = torch.eye(n_cells, dtype=torch.float64).unsqueeze(1)  # (n_cells, 1, n_cells)
        signal = F.interpolate(signal, size=input_len, mode="linear", align_corners=False)
    else:
        signal = _upsampling_matrix(n_cells, input_len, alignment).T.unsqueeze(1)  # (n_cells, 1, input_len)
    if sigma is not None and sigma > 0:
        kernel, radius = _gaussian_kernel(sigma, signal.dtype, signal.device)
        signal = F.pad(signal, (radius, radius), mode="reflect" if radius < input_len else "replicate")
        signal = F.conv1d(signal, kernel.view(1, 1, -1))
    if resize_len != input_len:
        # outside the crop the network saw nothing: extend the border values
        signal = F.pad(signal, (crop_start, resize_len - crop_start - input_len), mode="replicate")
    if output_len != resize_len:
        signal = F.interpolate(signal, size=output_len, mode="linear", align_corners=False)
    return signal[:, 0, :].T.float().contiguous()


# Above this many cells (dense per-pixel maps, e.g. PatchSVDD's) the dense
# operator costs more than stepping through the path with sparse kernels.
_MAX_OPERATOR_CELLS = 96 * 96


def _upsampling_matrix(n_cells, input_len, alignment):
    """``(input_len, n_cells)``: cell scores to input pixels, by linear interpolation."""
    return interpolation_matrix(cell_centres(n_cells, input_len, alignment), torch.arange(input_len))


def _stepwise(grids, geometry, size, sigma, alignment="even"):
    """The map path one full-size step at a time: (B, h, w) -> (B, H, W)."""
    maps = grids.unsqueeze(1)
    if tuple(maps.shape[-2:]) != geometry.input_size:
        if alignment == "even":
            maps = F.interpolate(maps, size=geometry.input_size, mode="bilinear", align_corners=False)
        else:
            rows, cols = (_upsampling_matrix(n, length, alignment).to(grids.device)
                          for n, length in zip(grids.shape[-2:], geometry.input_size))
            maps = torch.einsum("bhw,Hh,Ww->bHW", grids.double(), rows, cols).to(grids.dtype).unsqueeze(1)
    maps = gaussian_blur(maps, sigma)
    if geometry.crop is not None:
        top, left, height, width = geometry.crop
        full_h, full_w = geometry.resize
        maps = F.pad(maps, (left, full_w - left - width, top, full_h - top - height), mode="replicate")
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
    return maps[:, 0]


def grid_to_maps(grids, geometry, output_sizes, sigma=4.0, out=None, alignment="even"):
    """Convert patch-score grids to anomaly maps at each image's own resolution.

    The grid is upsampled bilinearly to the network input, smoothed with a
    Gaussian of ``sigma`` input pixels (reflect padding), padded back to the
    resized image outside a centre crop (border values extended) and resized
    bilinearly to the original image size. Those steps are applied at once as
    two small matrices per axis (see ``_axis_operator``), which costs one
    write of the output instead of several full-size passes.

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
    out : ndarray of shape (B, H, W), float32, optional
        Written in place when all output sizes are (H, W).
    alignment : {"even", "corner"}
        Where the grid's cells sit on the network input (see ``cell_centres``).

    Returns
    -------
    maps : list of ndarray of float32, each of shape output_sizes[i]
    """
    grids = grids.float()
    grid_h, grid_w = grids.shape[-2:]
    input_h, input_w = geometry.input_size
    resize_h, resize_w = geometry.resize
    top, left = geometry.crop[:2] if geometry.crop is not None else (0, 0)
    sigma = float(sigma or 0.0)
    result = [None] * len(output_sizes)
    by_size = {}
    for index, size in enumerate(output_sizes):
        by_size.setdefault(tuple(int(v) for v in size), []).append(index)
    for (height, width), indices in by_size.items():
        selected = grids if len(indices) == len(grids) else grids[indices]
        target = None
        if out is not None and len(by_size) == 1 and grids.device.type == "cpu":
            target = torch.from_numpy(out)
        if grid_h * grid_w > _MAX_OPERATOR_CELLS:
            maps = _stepwise(selected, geometry, (height, width), sigma, alignment)
            if target is not None:
                target.copy_(maps)
        else:
            rows = _axis_operator(grid_h, input_h, resize_h, top, height, sigma, alignment).to(grids.device)
            cols = _axis_operator(grid_w, input_w, resize_w, left, width, sigma, alignment).to(grids.device)
            maps = torch.matmul(torch.matmul(rows, selected), cols.T, out=target)
        maps = maps.cpu().numpy() if target is None else out
        if out is not None and target is None and len(by_size) == 1:
            out[...] = maps
        for position, index in enumerate(indices):
            result[index] = maps[position]
    return result


def finest_grid(feature_maps):
    """The (h, w) of the largest grid among multi-level feature maps ``(B, C, h, w)``.

    Coarser levels are upsampled to it, whatever order the layers were named in.
    """
    return max((tuple(m.shape[-2:]) for m in feature_maps), key=lambda shape: shape[0] * shape[1])


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


def tile_starts(length, tile, overlap, margin=(0, 0)):
    """Start offsets of tiles of size ``tile`` covering ``[0, length)``.

    ``margin`` is the number of pixels at the start and at the end of a tile
    that the detector does not look at (what its centre crop cuts away). The
    parts of neighbouring tiles the detector *does* see overlap by at least
    ``overlap`` times their length (spread evenly; the last tile ends at
    ``length``), so no band between two tiles goes unseen. One tile when the
    axis is not longer than ``tile``.
    """
    if length <= tile:
        return [0]
    seen = tile - margin[0] - margin[1]
    step = max(1, int(seen * (1.0 - overlap)))
    n_tiles = int(np.ceil((length - tile) / step)) + 1
    return [int(s) for s in np.round(np.linspace(0, length - tile, n_tiles))]


def _margin_pixels(tile, fractions):
    """Pixels at each end of a ``tile``-long axis that a crop of these fractions cuts away (rounded up)."""
    return tuple(int(np.ceil(fraction * tile - 1e-6)) for fraction in fractions)


def tile_boxes(size, tile, overlap, margins=((0.0, 0.0), (0.0, 0.0))):
    """``(top, left, height, width)`` of the tiles covering an image of ``size`` (H, W).

    ``margins`` are the fractions of a tile the detector crops away at the
    top and bottom, and at the left and right (see
    :meth:`ImageGeometry.crop_margins`).
    """
    tile_h, tile_w = min(tile[0], size[0]), min(tile[1], size[1])
    tops = tile_starts(size[0], tile_h, overlap, _margin_pixels(tile_h, margins[0]))
    lefts = tile_starts(size[1], tile_w, overlap, _margin_pixels(tile_w, margins[1]))
    return [(top, left, tile_h, tile_w) for top in tops for left in lefts]


def _blend_ramp(starts, index, tile, margin):
    """Weights along one axis of tile ``index``.

    Zero on the tile's cropped-away margins where a neighbouring tile sees
    those pixels, and linear ramps across the overlaps of the seen parts. The
    outer margins of the first and last tiles lie on the image border, which
    no tile sees: they keep the detector's own (border-extended) values, as
    for an image scored untiled.
    """
    position = np.arange(tile, dtype=np.float64) + 0.5
    lo, hi = margin
    first, last = index == 0, index + 1 == len(starts)
    weight = ((position > (0 if first else lo)) & (position < (tile if last else tile - hi))).astype(np.float64)
    if not first:  # rises across the overlap with the previous tile's seen part
        overlap = starts[index - 1] + tile - hi - (starts[index] + lo)
        if overlap > 0:
            weight *= np.clip((position - lo) / overlap, 0.0, 1.0)
    if not last:  # falls across the overlap with the next tile's seen part
        overlap = starts[index] + tile - hi - (starts[index + 1] + lo)
        if overlap > 0:
            weight *= np.clip((tile - hi - position) / overlap, 0.0, 1.0)
    return weight


def stitch_tiles(tile_maps, boxes, size, margins=((0.0, 0.0), (0.0, 0.0))):
    """Blend per-tile maps into one map of ``size`` without seams.

    Each tile's map is weighted by a separable ramp that falls linearly to
    (almost) zero across its overlap with each neighbour, and the weighted sum
    is divided by the summed weights. Where two tiles overlap their weights
    sum to one, so a field that the tiles agree on is reproduced exactly, and
    a disagreement between tiles is spread across the whole overlap instead
    of showing as a step at a tile border. A tile's cropped-away margins,
    where its map only extends the values at the crop border, get no weight
    inside the image: there the neighbouring tile, which saw those pixels,
    decides.

    Parameters
    ----------
    tile_maps : list of ndarray (h_t, w_t)
    boxes : list of (top, left, h_t, w_t), as from :func:`tile_boxes`
    size : (int, int)
    margins : ((float, float), (float, float))
        As passed to :func:`tile_boxes`.

    Returns
    -------
    ndarray of float32, shape ``size``
    """
    tops = sorted({box[0] for box in boxes})
    lefts = sorted({box[1] for box in boxes})
    total = np.zeros(size, dtype=np.float64)
    weights = np.zeros(size, dtype=np.float64)
    for tile_map, (top, left, height, width) in zip(tile_maps, boxes):
        weight = np.outer(_blend_ramp(tops, tops.index(top), height, _margin_pixels(height, margins[0])),
                          _blend_ramp(lefts, lefts.index(left), width, _margin_pixels(width, margins[1])))
        total[top:top + height, left:left + width] += weight * tile_map
        weights[top:top + height, left:left + width] += weight
    return (total / weights).astype(np.float32)
