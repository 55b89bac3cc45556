"""Cross-validation helpers for anomaly detection (numpy / scikit-learn only)."""

import numpy as np
from sklearn.model_selection import StratifiedKFold

from .metrics._metrics import labels_from_y

__all__ = ["AnomalyStratifiedKFold"]


class AnomalyStratifiedKFold(StratifiedKFold):
    """Stratified K-fold that keeps normal and anomalous images in every fold.

    A thin wrapper of :class:`sklearn.model_selection.StratifiedKFold` that
    stratifies on the image labels derived from ``y`` by
    :func:`skpatchad.metrics.labels_from_y`. ``y`` may therefore be image
    labels (``1`` = anomalous, ``0`` = normal) *or* ground-truth masks of
    shape (N, H, W) / a list of 2-D masks, and ``X`` may be a list of images
    of different sizes. Every test fold then contains both normal and
    anomalous images, so that AUROC and PRO are defined on it: ``split``
    raises a ValueError when either class has fewer than ``n_splits`` images
    (where ``StratifiedKFold`` only warns and yields a fold whose scores are
    NaN).

    Parameters
    ----------
    n_splits : int, default=3
        Number of folds, at least 2.
    shuffle : bool, default=True
        Whether to shuffle each class's images before splitting them into
        folds. Datasets are often stored sorted by defect type, so shuffling
        is the default here (unlike ``StratifiedKFold``).
    random_state : int, RandomState instance or None, default=None
        Controls the shuffling when ``shuffle`` is True. Pass an int for
        reproducible folds.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchad.model_selection import AnomalyStratifiedKFold
    >>> X = [np.zeros((4, 4)) for _ in range(6)]
    >>> masks = [np.zeros((4, 4)) for _ in range(3)] + [np.ones((4, 4))] * 3
    >>> cv = AnomalyStratifiedKFold(n_splits=3, random_state=0)
    >>> for train, test in cv.split(X, masks):
    ...     print(len(train), len(test))
    4 2
    4 2
    4 2
    """

    def __init__(self, n_splits=3, *, shuffle=True, random_state=None):
        super().__init__(n_splits=n_splits, shuffle=shuffle, random_state=random_state)

    def split(self, X, y, groups=None):
        """Generate indices to split data into training and test set.

        Parameters
        ----------
        X : array-like or list of images
            Images; only their number is used, so they may have different
            sizes.
        y : array-like
            Image labels of shape (N,) with 1 = anomalous and 0 = normal, or
            ground-truth masks of shape (N, H, W) / a list of N 2-D masks.
        groups : None
            Ignored, exists for API compatibility.

        Yields
        ------
        train : ndarray
            The training set indices for that split.
        test : ndarray
            The testing set indices for that split.
        """
        labels = labels_from_y(y)
        n_samples = len(X)
        if labels.shape[0] != n_samples:
            raise ValueError(
                "X has %d images but y describes %d images."
                % (n_samples, labels.shape[0])
            )
        if labels.min() == labels.max():
            raise ValueError(
                "AnomalyStratifiedKFold needs both normal (0) and anomalous "
                "(1) images in y, got only %s ones."
                % ("anomalous" if labels[0] else "normal")
            )
        n_anomalous = int(labels.sum())
        n_normal = n_samples - n_anomalous
        if min(n_normal, n_anomalous) < self.n_splits:
            raise ValueError(
                "AnomalyStratifiedKFold(n_splits=%d) needs at least %d normal and "
                "%d anomalous images so that every test fold has both, got %d "
                "normal and %d anomalous; lower n_splits."
                % (self.n_splits, self.n_splits, self.n_splits, n_normal, n_anomalous)
            )
        # StratifiedKFold only uses the number of samples of X; a placeholder
        # avoids any validation of images of different sizes.
        yield from super().split(np.zeros(n_samples), labels, groups)
