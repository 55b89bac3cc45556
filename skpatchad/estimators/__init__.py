"""Anomaly detection estimators with the scikit-learn API."""

from .patchcore import PatchCore
from .patchsvdd import PatchSVDD

__all__ = ["PatchCore", "PatchSVDD"]
