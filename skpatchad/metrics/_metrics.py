"""Image- and pixel-level metrics for anomaly detection.

Conventions used throughout this module:

* anomaly scores and anomaly maps are **higher = more anomalous**;
* image labels are ``1`` for anomalous and ``0`` for normal images;
* ground-truth masks are non-zero on defect pixels.

Everything here is pure numpy / scipy so that it can be imported without
torch.
"""

import numbers

import numpy as np
from scipy import ndimage

__all__ = [
    "image_auroc",
    "pixel_auroc",
    "pro_score",
    "labels_from_y",
    "masks_from_y",
]

# 8-connectivity, as in the official MVTec AD evaluation code
# (``evaluate_experiment.py``): diagonal neighbours belong to the same region.
_PRO_STRUCTURE = np.ones((3, 3), dtype=int)

_LABEL_CONVENTION = (
    "y must be image labels with 1 = anomalous and 0 = normal (bool is "
    "accepted), or ground-truth masks of shape (N, H, W) / a list of 2-D "
    "masks that are non-zero on defect pixels."
)


# ---------------------------------------------------------------------------
# Input conversion
# ---------------------------------------------------------------------------


def _is_list_of_2d(y):
    """True if ``y`` is a sequence (or a 1-D object array) of arrays, not of labels.

    A list of masks may hold masks of different sizes, which numpy cannot
    stack, so it has to be recognised before calling ``np.asarray``; an
    object array of such masks is the same thing in array form. Any element
    of two or more dimensions makes it a list of masks, so that a wrong one
    (a mask with a channel axis) is reported by its index rather than by
    numpy's "inhomogeneous shape" error.
    """
    if isinstance(y, np.ndarray):
        if y.dtype != object or y.ndim != 1:
            return False
    elif not isinstance(y, (list, tuple)):
        return False
    return any(np.ndim(item) >= 2 for item in y)


def _as_list_of_2d(arrays, name):
    """Return ``arrays`` as a list of 2-D numpy arrays.

    Accepts an (N, H, W) array or a sequence of 2-D arrays (possibly of
    different shapes). Raises ValueError naming the offending index.
    """
    if isinstance(arrays, np.ndarray) and arrays.dtype != object:
        if arrays.ndim != 3:
            raise ValueError(
                "%s must have shape (N, H, W) or be a list of 2-D arrays, got "
                "an array of shape %r." % (name, arrays.shape)
            )
        # Iterating an (N, H, W) array yields views, no copy.
        return list(arrays)
    if isinstance(arrays, (str, bytes)) or not hasattr(arrays, "__iter__"):
        raise ValueError(
            "%s must have shape (N, H, W) or be a list of 2-D arrays, got %s."
            % (name, type(arrays).__name__)
        )
    out = []
    for i, a in enumerate(arrays):
        a = np.asarray(a)
        if a.ndim != 2:
            hint = " (drop the channel axis, e.g. mask[..., 0])" if a.ndim == 3 else ""
            raise ValueError(
                "%s[%d] must be a 2-D array, got shape %r%s." % (name, i, a.shape, hint)
            )
        out.append(a)
    if not out:
        raise ValueError("%s is empty." % name)
    return out


def _check_mask_values(masks, name):
    """Reject NaN mask pixels, which ``!= 0`` would silently count as defects."""
    for i, mask in enumerate(masks):
        mask = np.asarray(mask)
        if mask.dtype.kind not in "biuf":
            raise ValueError("%s[%d] has dtype %s; masks must be numeric or boolean." % (name, i, mask.dtype))
        if mask.dtype.kind == "f" and np.isnan(mask).any():
            raise ValueError("%s[%d] contains NaN; masks must be 0 (normal) or non-zero (defect)." % (name, i))
    return masks


def labels_from_y(y):
    """Turn a user-provided ``y`` into binary image labels.

    This is the single place where ``y`` is interpreted, so that metrics,
    scorers and cross-validation splitters all agree on the convention.

    Parameters
    ----------
    y : array-like
        Either image labels of shape (N,) with values in {0, 1} (``1`` =
        anomalous, ``0`` = normal; booleans are accepted), or ground-truth
        masks given as an array of shape (N, H, W) or a list of N 2-D arrays
        (sizes may differ). An image is anomalous if its mask has at least
        one non-zero pixel.

    Returns
    -------
    labels : ndarray of shape (N,), dtype int
        ``1`` for anomalous images, ``0`` for normal images.

    Raises
    ------
    ValueError
        If ``y`` has another shape or label values other than 0 and 1 (for
        instance the ``-1`` / ``1`` outlier convention of scikit-learn).

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchad.metrics import labels_from_y
    >>> labels_from_y([0, 1, True, False])
    array([0, 1, 1, 0])
    >>> masks = [np.zeros((2, 3)), np.eye(4)]
    >>> labels_from_y(masks)
    array([0, 1])
    """
    if y is None:
        raise ValueError("y is required. " + _LABEL_CONVENTION)
    if _is_list_of_2d(y):
        masks = _check_mask_values(_as_list_of_2d(y, "y"), "y")
        return np.array([bool(np.any(m)) for m in masks], dtype=int)

    y_arr = np.asarray(y)
    if y_arr.ndim == 3:
        if y_arr.shape[0] == 0:
            raise ValueError("y is empty.")
        _check_mask_values(y_arr, "y")
        return y_arr.reshape(y_arr.shape[0], -1).any(axis=1).astype(int)
    if y_arr.ndim != 1:
        raise ValueError(
            "y has shape %r, which is neither 1-D image labels nor masks of "
            "shape (N, H, W). %s" % (y_arr.shape, _LABEL_CONVENTION)
        )
    if y_arr.shape[0] == 0:
        raise ValueError("y is empty.")
    if y_arr.dtype.kind == "b":
        return y_arr.astype(int)
    if y_arr.dtype.kind not in "iuf":
        raise ValueError(
            "y has dtype %s; expected numeric labels. %s"
            % (y_arr.dtype, _LABEL_CONVENTION)
        )
    # Compare values, not dtype, so that 0.0 / 1.0 floats are accepted.
    is_zero = y_arr == 0
    is_one = y_arr == 1
    if not np.all(is_zero | is_one):
        bad = np.unique(y_arr[~(is_zero | is_one)])[:5]
        raise ValueError(
            "y contains label values %s other than 0 and 1. %s If your labels "
            "follow scikit-learn's outlier convention (-1 = outlier, "
            "1 = inlier), convert them with (y == -1).astype(int)."
            % (bad.tolist(), _LABEL_CONVENTION)
        )
    return is_one.astype(int)


def masks_from_y(y):
    """Return ground-truth masks from ``y`` as a list of boolean 2-D arrays.

    Parameters
    ----------
    y : array-like of shape (N, H, W) or list of 2-D arrays
        Ground-truth masks; any non-zero pixel is a defect pixel. The masks
        may have different sizes when given as a list.

    Returns
    -------
    masks : list of ndarray of dtype bool
        One 2-D mask per image.

    Raises
    ------
    ValueError
        If ``y`` contains image labels (1-D) instead of masks, or has an
        unexpected shape.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchad.metrics import masks_from_y
    >>> [m.shape for m in masks_from_y([np.zeros((2, 3)), np.ones((4, 4))])]
    [(2, 3), (4, 4)]
    """
    if y is None:
        raise ValueError(
            "y is required: pixel-level metrics need ground-truth masks "
            "(N, H, W)."
        )
    if not _is_list_of_2d(y):
        y_arr = np.asarray(y)
        if y_arr.size == 0 and y_arr.ndim <= 1:
            raise ValueError("y is empty: pixel-level metrics need at least one ground-truth mask.")
        if y_arr.ndim == 1:
            raise ValueError(
                "pixel-level metrics need ground-truth masks (N, H, W), got "
                "image labels of shape %r." % (y_arr.shape,)
            )
        if y_arr.ndim != 3:
            raise ValueError(
                "pixel-level metrics need ground-truth masks (N, H, W) or a "
                "list of 2-D masks, got an array of shape %r." % (y_arr.shape,)
            )
        y = y_arr
    masks = _check_mask_values(_as_list_of_2d(y, "masks"), "masks")
    return [m if m.dtype == bool else m != 0 for m in masks]


def _check_maps(masks, maps):
    """Validate ``maps`` against ``masks`` (already a list of bool arrays).

    Returns the maps as a list of 2-D arrays sharing one numeric dtype, so
    that sorting and ``searchsorted`` compare values consistently.
    """
    maps = _as_list_of_2d(maps, "maps")
    if len(maps) != len(masks):
        raise ValueError(
            "Got %d masks but %d anomaly maps; they must match one to one."
            % (len(masks), len(maps))
        )
    for i, (mask, amap) in enumerate(zip(masks, maps)):
        if mask.shape != amap.shape:
            raise ValueError(
                "maps[%d] has shape %r but masks[%d] has shape %r; each anomaly "
                "map must have the same size as its mask." % (i, amap.shape, i, mask.shape)
            )
    dtype = np.result_type(*[m.dtype for m in maps])
    if dtype.kind == "b":
        dtype = np.dtype(np.uint8)
    elif dtype.kind not in "iuf":
        raise ValueError("Anomaly maps must be numeric, got dtype %s." % dtype)
    maps = [m.astype(dtype, copy=False) for m in maps]
    if dtype.kind == "f":
        for i, m in enumerate(maps):
            if np.isnan(m).any():
                raise ValueError("maps[%d] contains NaN." % i)
    return maps


def _split_by_mask(masks, maps):
    """Scores of the defect and of the normal pixels of all images, 1-D.

    The outputs are preallocated and filled image by image: concatenating
    per-image selections would copy the 67 M pixels of a full MVTec category
    twice, which costs as much as sorting them.
    """
    n_pos = [int(np.count_nonzero(mask)) for mask in masks]
    n_all = [mask.size for mask in masks]
    pos = np.empty(sum(n_pos), dtype=maps[0].dtype)
    neg = np.empty(sum(n_all) - sum(n_pos), dtype=maps[0].dtype)
    i_pos = i_neg = 0
    for mask, amap, k, n in zip(masks, maps, n_pos, n_all):
        pos[i_pos : i_pos + k] = amap[mask]
        neg[i_neg : i_neg + n - k] = amap[~mask]
        i_pos += k
        i_neg += n - k
    return pos, neg


# ---------------------------------------------------------------------------
# AUROC
# ---------------------------------------------------------------------------


def _auroc_from_classes(pos, neg):
    """ROC AUC from the scores of the positive and negative samples.

    Uses the Mann-Whitney formulation ``P(s_pos > s_neg) + 0.5 P(s_pos ==
    s_neg)``, which equals the area under the ROC curve with ties counted
    half (as ``sklearn.metrics.roc_auc_score``).

    Both classes are sorted in place (much faster than an
    ``argsort`` of the concatenation: no permutation has to be carried
    along), then the smaller one is located in the larger one with
    ``searchsorted``; sorted queries make the binary searches cache
    friendly. Counts are accumulated in int64, so the result is exact up to
    the final division.

    ``pos`` and ``neg`` must be 1-D arrays owned by the caller: they are
    sorted in place to avoid copying large pixel arrays.
    """
    n_pos, n_neg = pos.size, neg.size
    pos.sort()
    neg.sort()
    if n_pos <= n_neg:
        # For each positive: #neg < p and #neg <= p.
        below = np.searchsorted(neg, pos, side="left")
        below_or_equal = np.searchsorted(neg, pos, side="right")
        twice_u = np.add.reduce(below, dtype=np.int64) + np.add.reduce(
            below_or_equal, dtype=np.int64
        )
    else:
        # For each negative: #pos > n and #pos >= n.
        above = n_pos - np.searchsorted(pos, neg, side="right")
        above_or_equal = n_pos - np.searchsorted(pos, neg, side="left")
        twice_u = np.add.reduce(above, dtype=np.int64) + np.add.reduce(
            above_or_equal, dtype=np.int64
        )
    return float(twice_u) / (2.0 * n_pos * n_neg)


def image_auroc(y_true, y_score):
    """Image-level area under the ROC curve.

    Parameters
    ----------
    y_true : array-like
        Image labels of shape (N,) (``1`` = anomalous, ``0`` = normal) or
        ground-truth masks of shape (N, H, W) / list of 2-D masks, see
        :func:`labels_from_y`.
    y_score : array-like of shape (N,)
        Image anomaly scores, higher = more anomalous.

    Returns
    -------
    auroc : float
        Area under the ROC curve; ties between a normal and an anomalous
        image count one half, as in ``sklearn.metrics.roc_auc_score``.

    Raises
    ------
    ValueError
        If only one class is present, the lengths differ or the scores
        contain NaN.

    Examples
    --------
    >>> from skpatchad.metrics import image_auroc
    >>> image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    """
    labels = labels_from_y(y_true)
    scores = np.asarray(y_score)
    if scores.ndim != 1:
        raise ValueError(
            "y_score must be 1-D (one anomaly score per image), got shape %r."
            % (scores.shape,)
        )
    if scores.dtype.kind == "b":
        scores = scores.astype(np.uint8)
    elif scores.dtype.kind not in "iuf":
        raise ValueError("y_score must be numeric, got dtype %s." % scores.dtype)
    if scores.shape[0] != labels.shape[0]:
        raise ValueError(
            "y_true has %d images but y_score has %d scores."
            % (labels.shape[0], scores.shape[0])
        )
    if scores.dtype.kind == "f" and np.isnan(scores).any():
        raise ValueError("y_score contains NaN.")
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == labels.shape[0]:
        raise ValueError(
            "image_auroc is undefined when only one class is present in "
            "y_true (got %d anomalous and %d normal images); it needs both "
            "normal and anomalous images." % (n_pos, labels.shape[0] - n_pos)
        )
    is_pos = labels.astype(bool)
    return _auroc_from_classes(scores[is_pos], scores[~is_pos])


def pixel_auroc(masks, maps):
    """Pixel-level area under the ROC curve over all pixels of all images.

    Parameters
    ----------
    masks : array-like of shape (N, H, W) or list of 2-D arrays
        Ground-truth masks, non-zero on defect pixels. Images may have
        different sizes when given as lists.
    maps : array-like of shape (N, H, W) or list of 2-D arrays
        Anomaly maps, higher = more anomalous; ``maps[i]`` must have the
        shape of ``masks[i]``.

    Returns
    -------
    auroc : float
        Area under the pixel-wise ROC curve, ties counted one half.

    Raises
    ------
    ValueError
        If the masks are image labels, a map does not match its mask, or
        there are no defect pixels or no normal pixels at all.

    Notes
    -----
    The computation sorts the normal and the defect pixels separately
    (``np.sort``, no ``argsort``), which keeps it to about a second for the
    67 M pixels of 83 images of 900 x 900.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchad.metrics import pixel_auroc
    >>> mask = np.array([[0, 0], [0, 1]])
    >>> amap = np.array([[0.1, 0.2], [0.3, 0.9]])
    >>> pixel_auroc([mask], [amap])
    1.0
    """
    masks = masks_from_y(masks)
    maps = _check_maps(masks, maps)
    pos, neg = _split_by_mask(masks, maps)
    if pos.size == 0 or neg.size == 0:
        raise ValueError(
            "pixel_auroc is undefined when only one class is present: got %d "
            "defect pixels and %d normal pixels." % (pos.size, neg.size)
        )
    return _auroc_from_classes(pos, neg)


# ---------------------------------------------------------------------------
# PRO
# ---------------------------------------------------------------------------


def _partial_area(x, y, x_max):
    """Trapezoid area under the curve ``(x, y)`` from ``x[0]`` to ``x_max``.

    ``x`` must be non-decreasing with ``x[0] <= x_max``. If ``x_max`` falls
    between two points, the curve is linearly interpolated there (same as
    the ``trapezoid`` function of the official MVTec AD evaluation code).
    """
    # Number of points with x <= x_max; vertical segments at x_max are kept
    # (they add no area).
    stop = int(np.searchsorted(x, x_max, side="right"))
    xs, ys = x[:stop], y[:stop]
    area = 0.5 * float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1])))
    if stop < x.shape[0] and xs[-1] < x_max:
        x0, y0, x1, y1 = x[stop - 1], y[stop - 1], x[stop], y[stop]
        y_at_max = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_at_max) * (x_max - x0)
    return float(area)


def _pro_curve(masks, maps):
    """Exact PRO curve: FPR and PRO at every distinct score threshold.

    Returns ``(fpr, pro)``, both non-decreasing, starting at ``(0, 0)`` and
    ending at ``(1, 1)``.

    Between two consecutive distinct *defect* scores ``t_{j-1} > t_j`` the
    PRO value is constant, so the curve only moves horizontally until the
    pixels scoring exactly ``t_j`` cross the threshold together (a diagonal
    step when normal pixels tie with ``t_j``). The whole curve is therefore
    given by two points per distinct defect score::

        (#normal >  t_j / n_normal, PRO(t_{j-1}))   # end of horizontal run
        (#normal >= t_j / n_normal, PRO(t_j))       # after the tie at t_j

    which yields the same trapezoid area as evaluating every distinct score
    of the whole data set, while only the defect pixels need an ``argsort``
    (to carry their region weights); the normal pixels are just sorted.
    """
    scores, neg = _split_by_mask(masks, maps)
    n_regions = 0
    def_weights = []
    for mask in masks:
        labeled, n_comp = ndimage.label(mask, structure=_PRO_STRUCTURE)
        if n_comp == 0:
            continue
        n_regions += n_comp
        region_of_pixel = labeled[mask]
        region_size = np.bincount(region_of_pixel, minlength=n_comp + 1)
        # Each region weighs the same whatever its size: its pixels share a
        # total weight of 1 (divided by the number of regions below).
        def_weights.append(1.0 / region_size[region_of_pixel])

    if n_regions == 0:
        raise ValueError(
            "pro_score is undefined without ground-truth defect regions: all "
            "masks are empty."
        )
    if neg.size == 0:
        raise ValueError(
            "pro_score is undefined without normal pixels: every pixel of "
            "every mask is a defect."
        )
    n_neg = neg.size
    neg.sort()

    # Same pixel order as ``scores``: image by image, row-major within masks.
    weights = np.concatenate(def_weights)
    weights /= n_regions
    order = np.argsort(scores)[::-1]  # decreasing score
    scores = scores[order]
    pro_cum = np.cumsum(weights[order])
    # Last pixel of each group of equal scores: all pixels with the same
    # score cross the threshold together.
    last_of_group = np.empty(scores.shape[0], dtype=bool)
    np.not_equal(scores[1:], scores[:-1], out=last_of_group[:-1])
    last_of_group[-1] = True
    thresholds = scores[last_of_group]  # strictly decreasing
    pro_at = pro_cum[last_of_group]
    pro_before = np.concatenate(([0.0], pro_at[:-1]))

    # searchsorted on increasing queries is faster; flip and flip back.
    asc = thresholds[::-1]
    n_gt = (n_neg - np.searchsorted(neg, asc, side="right"))[::-1]
    n_ge = (n_neg - np.searchsorted(neg, asc, side="left"))[::-1]

    n_pts = thresholds.shape[0]
    fpr = np.empty(2 * n_pts + 2)
    pro = np.empty(2 * n_pts + 2)
    fpr[0], pro[0] = 0.0, 0.0
    fpr[1:-1:2], pro[1:-1:2] = n_gt / n_neg, pro_before
    fpr[2:-1:2], pro[2:-1:2] = n_ge / n_neg, pro_at
    fpr[-1], pro[-1] = 1.0, 1.0
    # The cumulative sum can overshoot 1 by rounding.
    np.clip(pro, 0.0, 1.0, out=pro)
    return fpr, pro


def pro_score(masks, maps, fpr_limit=0.3):
    """Normalised area under the PRO curve (per-region overlap), MVTec AD.

    The per-region overlap (PRO) metric of Bergmann et al. (MVTec AD,
    IJCV 2021), matching ``compute_pro`` / ``trapezoid`` of the official
    ``evaluate_experiment.py``:

    * ground-truth regions are the connected components of each mask
      (8-connectivity, ``scipy.ndimage.label`` with a 3 x 3 structure);
    * for a threshold ``t``, PRO(t) is the mean over all regions of all
      images of the fraction of the region's pixels with score ``>= t``:
      every region weighs the same whatever its size;
    * FPR(t) is the fraction of all normal pixels (mask == 0, in every
      image, defective ones included) with score ``>= t``;
    * every distinct score is a threshold (exact, no binning) and pixels
      with equal scores cross a threshold together;
    * the curve, starting at (0, 0), is integrated over FPR from 0 to
      ``fpr_limit`` with the trapezoid rule, interpolating linearly at
      ``fpr_limit``, and divided by ``fpr_limit``.

    Parameters
    ----------
    masks : array-like of shape (N, H, W) or list of 2-D arrays
        Ground-truth masks, non-zero on defect pixels. Images without
        defects may (and should) be included: their pixels count as normal
        pixels.
    maps : array-like of shape (N, H, W) or list of 2-D arrays
        Anomaly maps, higher = more anomalous; ``maps[i]`` must have the
        shape of ``masks[i]``.
    fpr_limit : float, default=0.3
        Upper integration limit on the false positive rate, in (0, 1].

    Returns
    -------
    score : float
        Normalised area in [0, 1]: 1.0 for a perfect map, about
        ``fpr_limit / 2`` for a random one.

    Raises
    ------
    ValueError
        If the masks are image labels, a map does not match its mask, there
        is no defect region or no normal pixel, or ``fpr_limit`` is not in
        (0, 1].

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchad.metrics import pro_score
    >>> mask = np.zeros((4, 4), dtype=bool)
    >>> mask[:2, :2] = True
    >>> pro_score([mask], [mask * 1.0])
    1.0
    >>> pro_score([mask], [1.0 - mask])
    0.0
    """
    if (
        isinstance(fpr_limit, (bool, np.bool_))
        or not isinstance(fpr_limit, numbers.Real)
        or not 0.0 < fpr_limit <= 1.0
    ):
        raise ValueError("fpr_limit must be a float in (0, 1], got %r." % (fpr_limit,))
    masks = masks_from_y(masks)
    maps = _check_maps(masks, maps)
    fpr, pro = _pro_curve(masks, maps)
    fpr_limit = float(fpr_limit)
    return float(_partial_area(fpr, pro, fpr_limit) / fpr_limit)
