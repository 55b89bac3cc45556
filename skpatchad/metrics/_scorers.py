"""Scorers for ``GridSearchCV(scoring=...)`` and ``cross_validate``.

A scorer is a plain callable ``scorer(estimator, X, y) -> float`` where a
higher value is better, which is what scikit-learn accepts as ``scoring``.

The estimators of skpatchad follow the scikit-learn outlier-detection
convention: ``decision_function`` is higher for *more normal* images, while
the metrics expect higher = *more anomalous*. The scorers do the negation so
that users never have to.
"""

import numpy as np
from sklearn.pipeline import Pipeline

from ._metrics import image_auroc, masks_from_y, pixel_auroc, pro_score

__all__ = [
    "image_auroc_scorer",
    "pixel_auroc_scorer",
    "pro_scorer",
    "SCORERS",
    "get_scorer",
]


def _image_anomaly_scores(estimator, X):
    """Image anomaly scores (higher = more anomalous) of a fitted estimator.

    ``decision_function`` follows the outlier convention (higher = more
    normal), hence the minus sign. ``Pipeline`` forwards
    ``decision_function`` to its last step itself.
    """
    if not hasattr(estimator, "decision_function"):
        raise TypeError(
            "%s has no decision_function; image-level scorers need an "
            "anomaly detector (or a Pipeline ending with one)."
            % type(estimator).__name__
        )
    scores = np.asarray(estimator.decision_function(X), dtype=float)
    return -scores.reshape(-1)


def _is_passthrough(step):
    return step is None or (isinstance(step, str) and step == "passthrough")


def _predict_maps(estimator, X):
    """Anomaly maps (higher = more anomalous) of a fitted estimator.

    ``Pipeline`` does not forward ``predict_map``, so a pipeline is unwrapped
    by hand: every step but the last transforms ``X`` (``'passthrough'`` and
    ``None`` steps are skipped), then the last step predicts the maps. Nested
    pipelines and fitted search objects (``best_estimator_``) are unwrapped
    recursively.
    """
    if hasattr(estimator, "predict_map"):
        return estimator.predict_map(X)
    if isinstance(estimator, Pipeline):
        Xt = X
        for _, step in estimator.steps[:-1]:
            if _is_passthrough(step):
                continue
            Xt = step.transform(Xt)
        final = estimator.steps[-1][1]
        if _is_passthrough(final):
            raise TypeError(
                "The last step of the Pipeline is 'passthrough'; pixel-level "
                "scorers need an estimator with predict_map as last step."
            )
        return _predict_maps(final, Xt)
    if hasattr(estimator, "best_estimator_"):
        return _predict_maps(estimator.best_estimator_, X)
    raise TypeError(
        "%s has no predict_map; pixel-level scorers need an estimator that "
        "predicts anomaly maps (or a Pipeline ending with one)."
        % type(estimator).__name__
    )


def image_auroc_scorer(estimator, X, y):
    """Image-level AUROC of a fitted anomaly detector.

    Parameters
    ----------
    estimator : object
        Fitted estimator (or ``Pipeline``) with ``decision_function``,
        higher = more normal (scikit-learn outlier convention).
    X : array-like or list of images
        Test images.
    y : array-like
        Image labels (``1`` = anomalous, ``0`` = normal) or ground-truth
        masks (N, H, W) / list of 2-D masks.

    Returns
    -------
    score : float
        :func:`~skpatchad.metrics.image_auroc` of ``-decision_function(X)``.

    Examples
    --------
    >>> from sklearn.model_selection import GridSearchCV  # doctest: +SKIP
    >>> GridSearchCV(est, grid, scoring=image_auroc_scorer)  # doctest: +SKIP
    """
    return image_auroc(y, _image_anomaly_scores(estimator, X))


def pixel_auroc_scorer(estimator, X, y):
    """Pixel-level AUROC of a fitted anomaly detector.

    Parameters
    ----------
    estimator : object
        Fitted estimator with ``predict_map`` (higher = more anomalous), or
        a ``Pipeline`` whose last step has it.
    X : array-like or list of images
        Test images.
    y : array-like of shape (N, H, W) or list of 2-D arrays
        Ground-truth masks; image labels raise a ValueError.

    Returns
    -------
    score : float
        :func:`~skpatchad.metrics.pixel_auroc` of ``predict_map(X)``.
    """
    masks = masks_from_y(y)
    return pixel_auroc(masks, _predict_maps(estimator, X))


def pro_scorer(estimator, X, y):
    """Normalised area under the PRO curve (FPR <= 0.3) of a fitted detector.

    Parameters
    ----------
    estimator : object
        Fitted estimator with ``predict_map`` (higher = more anomalous), or
        a ``Pipeline`` whose last step has it.
    X : array-like or list of images
        Test images.
    y : array-like of shape (N, H, W) or list of 2-D arrays
        Ground-truth masks; image labels raise a ValueError.

    Returns
    -------
    score : float
        :func:`~skpatchad.metrics.pro_score` of ``predict_map(X)`` with the
        default ``fpr_limit=0.3``.
    """
    masks = masks_from_y(y)
    return pro_score(masks, _predict_maps(estimator, X))


SCORERS = {
    "image_auroc": image_auroc_scorer,
    "pixel_auroc": pixel_auroc_scorer,
    "pro": pro_scorer,
}


def get_scorer(name):
    """Return the scorer called ``name``.

    Parameters
    ----------
    name : str or callable
        One of ``"image_auroc"``, ``"pixel_auroc"``, ``"pro"``. A callable is
        returned unchanged.

    Returns
    -------
    scorer : callable
        ``scorer(estimator, X, y) -> float``, higher is better.

    Examples
    --------
    >>> from skpatchad.metrics import get_scorer
    >>> get_scorer("pro").__name__
    'pro_scorer'
    """
    if callable(name):
        return name
    try:
        return SCORERS[name]
    except (KeyError, TypeError):
        raise ValueError(
            "%r is not a valid skpatchad scorer; valid names are %s."
            % (name, sorted(SCORERS))
        ) from None
