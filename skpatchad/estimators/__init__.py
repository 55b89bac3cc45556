"""Anomaly detection estimators with the scikit-learn API."""

from .patchcore import PatchCore
from .patchsvdd import PatchSVDD
from .pedenet import PEDENet
from .tiling import TiledDetector

__all__ = ["PatchCore", "PatchSVDD", "PEDENet", "TiledDetector"]
