"""Metrics and scorers for image anomaly detection (numpy / scipy only).

Scores and maps are higher = more anomalous; labels are 1 = anomalous,
0 = normal, or ground-truth masks.
"""

from ._metrics import (
    image_auroc,
    labels_from_y,
    masks_from_y,
    pixel_auroc,
    pro_score,
)
from ._scorers import (
    SCORERS,
    get_scorer,
    image_auroc_scorer,
    pixel_auroc_scorer,
    pro_scorer,
)

__all__ = [
    "image_auroc",
    "pixel_auroc",
    "pro_score",
    "labels_from_y",
    "masks_from_y",
    "image_auroc_scorer",
    "pixel_auroc_scorer",
    "pro_scorer",
    "SCORERS",
    "get_scorer",
]
