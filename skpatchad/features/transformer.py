"""A scikit-learn transformer around :class:`~skpatchad.features.backbone.FeatureBackbone`."""

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

from ..utils import check_images
from ..utils._params import check_int_param
from ._device import TorchImageEstimatorMixin, resolve_device, runtime_device, seeded_cpu_rng
from .backbone import extract_feature_maps, make_backbone
from .maps import align_levels
from .preprocessing import ImageGeometry


class BackboneFeatures(TorchImageEstimatorMixin, TransformerMixin, BaseEstimator):
    """Intermediate feature maps of a pretrained CNN, as a scikit-learn transformer.

    ``transform`` returns one array ``(N, h, w, C)``: the requested layers,
    coarser ones bilinearly interpolated at the input positions of the finest
    grid's cells (for torchvision ResNets, which centre cell j at stride * j,
    that differs from plain resizing; see ``maps.cell_centres``),
    concatenated along channels in the order of ``layers``. Images of any size are resized to ``image_size`` first.

    Parameters
    ----------
    backbone : str, default="efficientnet_lite0"
        ``"efficientnet_lite0"`` (offline ImageNet weights) or any torchvision
        classification model name, e.g. ``"wide_resnet50_2"`` (the PatchCore
        paper's backbone; weights are downloaded by torchvision).
    layers : sequence of str or None, default=None
        Submodule names; None = the stride-8 and stride-16 stages
        (``layer2``, ``layer3`` for ResNets).
    weights : "DEFAULT", None or path, default="DEFAULT"
    image_size : int or (int, int), default=256
    crop_size : int, (int, int) or None, default=None
    batch_size : int, default=8
    device : "auto", "cpu" or "cuda", default="auto"
        Resolved in ``fit``: CUDA when present.
    random_state : int, RandomState instance or None, default=None
        Seeds the random initialisation when ``weights=None``; torch's global
        random stream is left where it was.

    Attributes
    ----------
    backbone_ : FeatureBackbone
    geometry_ : ImageGeometry
    device_ : torch.device

    Examples
    --------
    >>> from skpatchad.features import BackboneFeatures
    >>> import numpy as np
    >>> features = BackboneFeatures(image_size=64).fit_transform(np.zeros((2, 64, 64, 3), np.uint8))
    >>> features.shape
    (2, 8, 8, 152)
    """

    def __init__(self, backbone="efficientnet_lite0", layers=None, weights="DEFAULT", image_size=256,
                 crop_size=None, batch_size=8, device="auto", random_state=None):
        self.backbone = backbone
        self.layers = layers
        self.weights = weights
        self.image_size = image_size
        self.crop_size = crop_size
        self.batch_size = batch_size
        self.device = device
        self.random_state = random_state

    def fit(self, X=None, y=None):
        """Build the network (no learning: the backbone is frozen)."""
        for name in ("backbone_", "geometry_", "device_"):  # a failed fit leaves no old network behind
            self.__dict__.pop(name, None)
        check_int_param("batch_size", self.batch_size)
        geometry = ImageGeometry(self.image_size, self.crop_size)
        device = resolve_device(self.device)
        seed = check_random_state(self.random_state).randint(2**31 - 1)
        with seeded_cpu_rng(seed):  # only random weights (weights=None) draw from it
            backbone = make_backbone(self.backbone, self.layers, self.weights)
        self.backbone_, self.geometry_, self.device_ = backbone.to(device), geometry, device
        return self

    def transform(self, X):
        check_is_fitted(self, "backbone_")
        images = check_images(X, estimator_name=type(self).__name__)
        device = runtime_device(self.device_)
        self.backbone_.to(device)
        chunks = []
        for _, maps in extract_feature_maps(self.backbone_, images, self.geometry_, self.batch_size, device):
            levels = align_levels(maps, getattr(self.backbone_, "cell_alignment", "even"),
                                  self.geometry_.input_size)
            chunks.append(torch.cat(levels, 1).permute(0, 2, 3, 1).float().cpu().numpy())
        return np.concatenate(chunks)
