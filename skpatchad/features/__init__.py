"""Torch side of skpatchad: backbones, patch embeddings, kNN, coreset, maps."""

from .backbone import FeatureBackbone, make_backbone
from .knn import NearestNeighbors
from .transformer import BackboneFeatures

__all__ = ["BackboneFeatures", "FeatureBackbone", "NearestNeighbors", "make_backbone"]
