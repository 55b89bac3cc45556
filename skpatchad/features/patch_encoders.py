"""Hierarchical patch encoders (Patch SVDD, Yi & Yoon 2020; also PEDENet's PE network).

A *small* encoder maps a ``K/2 x K/2`` patch to one D-vector using convolutions
only (valid padding), so applied to a whole image it yields the features of
every sub-patch at once (a dense map with the encoder's stride). The *big*
encoder splits its ``K x K`` patch into a 2x2 grid of sub-patches, encodes each
with the small encoder and aggregates the four features with a 2x2 convolution
followed by a 1x1 convolution: f_big = g_big(f_small). On a dense map of small
features, the same 2x2 convolution with dilation ``(K/2) / stride`` gives the
features of every K x K patch -- exactly the patch-wise result, far faster.
"""

import torch
import torch.nn.functional as F
from torch import nn


NEGATIVE_SLOPE = 0.1  # LeakyReLU(0.1) throughout, as in both papers


def he_init_(conv):
    """He (Kaiming) normal weights for LeakyReLU(0.1), zero bias; returns ``conv``.

    Why not PyTorch's default (uniform with variance 1 / (3 fan_in)): every
    layer of these deep valid-convolution stacks then shrinks the activations'
    variance about six-fold, so at initialisation the features barely depend
    on the input. Measured on MVTec bottle: the spatial standard deviation of
    the features was 3e-5 (PEDENet's PE network) and 2e-4 (Patch SVDD's K=64
    encoder) against 0.2-0.3 with He initialisation, and training had to grow
    the weights out of that regime before the position task could leave chance.
    """
    nn.init.kaiming_normal_(conv.weight, a=NEGATIVE_SLOPE, nonlinearity="leaky_relu")
    nn.init.zeros_(conv.bias)
    return conv


INITS = ("he", "default")


def _init_conv(conv, init):
    """``init="he"``: :func:`he_init_`; ``"default"``: PyTorch's own initialisation."""
    if init not in INITS:
        raise ValueError("init must be one of %s, got %r" % (INITS, init))
    return he_init_(conv) if init == "he" else conv


def _conv_stack(channels, kernel_sizes, strides, init="he", negative_slope=NEGATIVE_SLOPE):
    layers = []
    for i, (k, s) in enumerate(zip(kernel_sizes, strides)):
        layers.append(_init_conv(nn.Conv2d(channels[i], channels[i + 1], k, stride=s), init))
        if i < len(kernel_sizes) - 1:
            layers.append(nn.LeakyReLU(negative_slope))
    return nn.Sequential(*layers)


class SmallPatchEncoder(nn.Module):
    """Conv-only encoder of a ``patch_size x patch_size`` patch to a D-vector (tanh output).

    Parameters
    ----------
    embedding_dim : int
        D.
    patch_size : {16, 32}
        Side of the patch it encodes (PatchSVDD: 32).
    width : int
        Base number of filters.
    init : {"he", "default"}, default="he"
        Convolution weights: He initialisation (:func:`he_init_`) or PyTorch's default.
    """

    def __init__(self, embedding_dim=64, patch_size=32, width=64, init="he"):
        super().__init__()
        if patch_size == 32:
            # 32 -s2-> 15 -> 13 -> 11 -> 9 -> 7 -> 5 -k5-> 1
            channels = [3, width, width, 2 * width, 2 * width, 2 * width, width, embedding_dim]
            kernels, strides = [3, 3, 3, 3, 3, 3, 5], [2, 1, 1, 1, 1, 1, 1]
        elif patch_size == 16:
            # 16 -s2-> 7 -> 5 -> 3 -k3-> 1
            channels = [3, width, 2 * width, 2 * width, embedding_dim]
            kernels, strides = [3, 3, 3, 3], [2, 1, 1, 1]
        else:
            raise ValueError("patch_size must be 16 or 32, got %r" % (patch_size,))
        self.patch_size = patch_size
        self.stride = 2
        self.net = _conv_stack(channels, kernels, strides, init)

    def forward(self, x):
        """(B, 3, H, W) -> (B, D, (H - K)/2 + 1, (W - K)/2 + 1), tanh-bounded."""
        return torch.tanh(self.net(x))


class HierarchicalPatchEncoder(nn.Module):
    """f_big = g_big(f_small): a ``2K'`` patch encoded from its 2x2 sub-patch features.

    Parameters
    ----------
    small : SmallPatchEncoder
        Encoder of the sub-patches (shared, trained jointly).
    embedding_dim : int
    hidden : int
        Channels of the aggregation layer.
    init : {"he", "default"}, default="he"
        Convolution weights: He initialisation (:func:`he_init_`) or PyTorch's default.
    """

    def __init__(self, small, embedding_dim=64, hidden=128, init="he"):
        super().__init__()
        self.small = small
        self.patch_size = 2 * small.patch_size
        self.aggregate = _init_conv(nn.Conv2d(embedding_dim, hidden, 2), init)
        self.project = _init_conv(nn.Conv2d(hidden, embedding_dim, 1), init)

    def from_small_map(self, small_map):
        """Big-patch features from a dense small-feature map (stride of the small encoder)."""
        dilation = self.small.patch_size // self.small.stride
        hidden = F.leaky_relu(F.conv2d(small_map, self.aggregate.weight, self.aggregate.bias,
                                       dilation=dilation), NEGATIVE_SLOPE)
        return torch.tanh(self.project(hidden))

    def forward(self, patches):
        """(B, 3, K, K) patches -> (B, D) features."""
        half = self.small.patch_size
        batch = patches.shape[0]
        quads = torch.cat([patches[:, :, :half, :half], patches[:, :, :half, half:],
                           patches[:, :, half:, :half], patches[:, :, half:, half:]])
        feats = self.small(quads).view(4, batch, -1)  # one vector per sub-patch
        grid = torch.stack([torch.stack([feats[0], feats[1]], -1),
                            torch.stack([feats[2], feats[3]], -1)], -2)  # (B, D, 2, 2)
        hidden = F.leaky_relu(self.aggregate(grid), NEGATIVE_SLOPE)
        return torch.tanh(self.project(hidden)).flatten(1)

    def dense(self, images):
        """Dense features of every big patch (stride = small stride) and every small patch."""
        small_map = self.small(images)
        return self.from_small_map(small_map), small_map


# Neighbour index -> (dy, dx) in the 3x3 grid around a centre patch: the 8
# classes of the relative-position task (PatchSVDD's SSL, PEDENet's LP).
NEIGHBOUR_OFFSETS = torch.tensor([(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)])


def neighbour_pair_corners(label, patch, size, generator, spacing):
    """Top-left corners of relative-position crop pairs, both inside the image.

    Parameters
    ----------
    label : LongTensor of shape (B,)
        Neighbour class (row of ``NEIGHBOUR_OFFSETS``) of the second crop.
    patch, size : int
        Crop and (square) image side.
    spacing : {"reference", "jittered"}
        How far the neighbour sits along each axis of its direction.
        "reference": ``3K/4 + U[0, K/4)`` per axis, so neighbours overlap by
        up to a quarter patch, as in the reference Patch SVDD code.
        "jittered": ``K + U[-K/8, K/8]`` on both axes (also the axis the
        neighbour is not displaced along), so borders never match exactly.

    Returns
    -------
    first, second : LongTensor of shape (B, 2)
        (y, x) corners. The label is drawn before the first corner, which is
        then uniform over the positions where that one neighbour fits: every
        image region can be a first crop and no pair is clipped, so no label
        is wrong (the reference code clips the neighbour at the border).
    """
    batch = len(label)
    base, spread = _neighbour_spacing(patch, spacing)
    if spacing == "reference":
        distance = base + torch.randint(spread, (batch, 2), generator=generator)
        offset = NEIGHBOUR_OFFSETS[label] * distance
    else:
        offset = NEIGHBOUR_OFFSETS[label] * base + torch.randint(-spread, spread + 1, (batch, 2), generator=generator)
    return pair_corners(offset, patch, size, generator)


def _neighbour_spacing(patch, spacing):
    """``(base, spread)`` of a neighbour's offset per axis: "reference" draws
    ``base + U{0, ..., spread - 1}``, "jittered" ``base + U{-spread, ..., spread}``."""
    if spacing == "reference":
        return 3 * patch // 4, max(1, patch // 4)
    return patch, patch // 8


def min_pair_image_size(patch, spacing):
    """Smallest image side where every :func:`neighbour_pair_corners` pair fits."""
    base, spread = _neighbour_spacing(patch, spacing)
    return patch + base + (spread - 1 if spacing == "reference" else spread)


def pair_corners(offset, patch, size, generator):
    """(first, first + offset) corners with ``first`` uniform where both crops fit."""
    low = (-offset).clamp_min(0)
    high = (size - patch) - offset.clamp_min(0)
    if bool((high < low).any()):
        raise ValueError("image_size %d is too small for %d-pixel patches %d pixels apart"
                         % (size, patch, int(offset.abs().max())))
    first = low + (torch.rand(len(offset), 2, generator=generator) * (high - low + 1)).long()
    return first, first + offset


# Standard deviation of the colour shift and pixel noise of relative-position
# crops in [0, 1] intensity units (the reference Patch SVDD code's 0.02).
COLOUR_NOISE = 0.02


def perturb_colours(patches, generator, scale=COLOUR_NOISE):
    """Random RGB shift per patch plus per-pixel noise, both Gaussian with ``scale``.

    Applied to the two crops of the relative-position task so that colour
    gradients cannot give their position away.
    """
    batch = patches.shape[0]
    shift = torch.randn(batch, patches.shape[1], 1, 1, generator=generator)
    noise = torch.randn(patches.shape, generator=generator)
    return patches + scale * (shift + noise).to(patches.device)


class PositionClassifier(nn.Module):
    """MLP on the difference of two patch features -> which of the 8 neighbours (logits)."""

    def __init__(self, embedding_dim=64, hidden=128, n_classes=8):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(embedding_dim, hidden), nn.LeakyReLU(0.1),
            nn.Linear(hidden, hidden), nn.LeakyReLU(0.1),
            nn.Linear(hidden, n_classes),
        )

    def forward(self, first, second):
        return self.net(first - second)


class PEDENetSmallEncoder(nn.Module):
    """PEDENet's sub-patch encoder: 3x3 convolutions only, LeakyReLU(0.1), tanh output.

    Zhang, Wang & Kuo (PEDENet) specify convolutional layers of ``filters``
    (32, 64, 128, 128, 64, 64, 32, 32) followed by an output layer of
    ``embedding_dim`` (64) filters, one kernel size (3) throughout. With valid
    padding and a stride-2 first layer (so a dense application has stride 2,
    as :class:`SmallPatchEncoder`), n layers reduce a ``4 n`` pixel patch to
    exactly 1x1: ``4n -s2-> 2n - 1 -> ... -> 3 -> 1`` (9 layers: 36 -> 17 -> 15
    -> ... -> 3 -> 1). The receptive field is ``4n - 1`` pixels: the stride-2
    layer never reads the last row/column of the patch, which is what makes the
    patch size even, so that the 2x2 grid of sub-patches of
    :class:`HierarchicalPatchEncoder` sits on the stride-2 dense map.

    Parameters
    ----------
    embedding_dim : int, default=64
        D, filters of the output layer.
    filters : sequence of int, default=(32, 64, 128, 128, 64, 64, 32, 32)
        Filters of the hidden convolutional layers.
    init : {"he", "default"}, default="he"
        Convolution weights: He initialisation (:func:`he_init_`) or PyTorch's default.

    Attributes
    ----------
    patch_size : int
        ``4 * (len(filters) + 1)`` (36 by default).
    stride : int
        2, the stride of the dense feature map.
    """

    def __init__(self, embedding_dim=64, filters=(32, 64, 128, 128, 64, 64, 32, 32), init="he"):
        super().__init__()
        filters = [int(f) for f in filters]
        if not filters or min(filters) < 1:
            raise ValueError("filters must be a non-empty list of positive integers, got %r" % (filters,))
        n_layers = len(filters) + 1
        self.filters = tuple(filters)
        self.patch_size = 4 * n_layers
        self.stride = 2
        self.net = _conv_stack([3] + filters + [embedding_dim], [3] * n_layers, [2] + [1] * (n_layers - 1), init)

    def forward(self, x):
        """(B, 3, H, W) -> (B, D, (H - K)/2 + 1, (W - K)/2 + 1), tanh-bounded."""
        return torch.tanh(self.net(x))
