"""skpatchad: scikit-learn estimators for industrial image anomaly detection.

Estimators are imported lazily so that ``skpatchad.metrics`` and
``skpatchad.datasets`` stay usable without importing torch.
"""

__version__ = "0.1.0"

_ESTIMATORS = ("PatchCore", "PatchSVDD", "PEDENet", "TiledDetector")

__all__ = list(_ESTIMATORS) + ["__version__"]


def __getattr__(name):
    if name in _ESTIMATORS:
        from . import estimators

        return getattr(estimators, name)
    raise AttributeError("module 'skpatchad' has no attribute %r" % name)
