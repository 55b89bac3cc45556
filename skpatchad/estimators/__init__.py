"""Anomaly detection estimators with the scikit-learn API."""

from .patchcore import PatchCore

__all__ = ["PatchCore"]
