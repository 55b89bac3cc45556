"""Run any of the detectors on tiles of images much larger than the network input."""

import numpy as np
from sklearn.base import clone
from sklearn.utils.validation import check_is_fitted

from ..features.maps import stitch_tiles, tile_boxes
from ..features.preprocessing import ImageGeometry, _pair
from ..utils import image_sizes
from ..utils._params import check_real_param
from ._base import BaseAnomalyDetector


def _tiles(images, tile, overlap, margins):
    """Crops of every image and, per image, its ``(boxes, first tile, n tiles)``."""
    crops, layout = [], []
    for image, size in zip(images, image_sizes(images)):
        boxes = tile_boxes(size, tile, overlap, margins)
        layout.append((boxes, len(crops), len(boxes)))
        crops.extend(image[top:top + height, left:left + width] for top, left, height, width in boxes)
    return crops, layout


class TiledDetector(BaseAnomalyDetector):
    """Apply a detector to overlapping tiles of large images and stitch the maps.

    A 2048x2048 inspection image shrunk to a 256x256 network input loses
    defects a few pixels wide. ``TiledDetector`` cuts every image into tiles of
    ``tile_size`` pixels (by default the wrapped detector's ``image_size``, so
    the network sees the tiles at full resolution), trains the detector on the
    tiles of the normal training images, scores each tile of a test image, and
    blends the tile maps back into one map per image with linear ramps across
    the overlaps, so no seam shows at tile borders. The image score is that of
    its most anomalous tile.

    Parameters
    ----------
    estimator : PatchCore, PatchSVDD or PEDENet
        The detector to run on tiles (cloned in ``fit``).
    tile_size : int, (int, int) or None, default=None
        Tile height and width in input pixels; None uses the detector's
        ``image_size``. Images not larger than a tile are used whole.
    overlap : float in [0, 0.5], default=0.25
        Minimum overlap of neighbouring test tiles, as a fraction of the part
        of a tile the detector looks at. A detector with a ``crop_size``
        (PatchCore's 256 -> 224 protocol) ignores the margin of each tile its
        centre crop cuts away, so tiles are placed that much closer together:
        every pixel inside the image border is seen by some tile, and the
        stitched map takes no values from a cropped-away margin there.
        Training tiles do not overlap (beyond what covering the image needs),
        so the leave-one-image-out calibration of the detector does not find
        the same pixels in a neighbouring tile.
    contamination : "auto" or float in (0, 0.5], default="auto"
        Sets ``offset_`` on the calibration scores of the training *tiles*: an
        image is predicted anomalous when one of its tiles is.
    verbose : int, default=0

    Attributes
    ----------
    estimator_ : the fitted detector (on tiles)
    tile_size_ : (int, int)
    crop_margins_ : ((float, float), (float, float))
        Fractions of a tile the detector's centre crop cuts away (top, bottom),
        (left, right); zeros without a ``crop_size``.
    offset_ : float
    train_scores_ : ndarray
        Calibration ``score_samples`` of training tiles.

    Examples
    --------
    >>> from skpatchad import PatchCore, TiledDetector
    >>> model = TiledDetector(PatchCore(image_size=256), overlap=0.25).fit(large_normal_images)
    >>> maps = model.predict_map(large_test_images)  # each at its image's own size
    """

    def __init__(self, estimator, tile_size=None, overlap=0.25, contamination="auto", verbose=0):
        self.estimator = estimator
        self.tile_size = tile_size
        self.overlap = overlap
        self.contamination = contamination
        self.verbose = verbose

    def _resolve_tile_size(self):
        tile = self.tile_size if self.tile_size is not None else getattr(self.estimator, "image_size", None)
        if tile is None:
            raise ValueError("tile_size is None and %s has no image_size to default to"
                             % type(self.estimator).__name__)
        return _pair(tile, "tile_size")

    def _resolve_crop_margins(self):
        crop_size = getattr(self.estimator, "crop_size", None)
        if crop_size is None:
            return ((0.0, 0.0), (0.0, 0.0))
        return ImageGeometry(self.estimator.image_size, crop_size).crop_margins()

    def _check_params(self):
        check_real_param("overlap", self.overlap, 0.0, 0.5)

    def _fit_images(self, images):
        self.tile_size_ = self._resolve_tile_size()
        self.crop_margins_ = self._resolve_crop_margins()
        crops, _ = _tiles(images, self.tile_size_, 0.0, self.crop_margins_)
        self._log("fitting %s on %d tiles of %d images" % (type(self.estimator).__name__, len(crops), len(images)))
        self.estimator_ = clone(self.estimator).fit(crops)
        return -self.estimator_.train_scores_

    def _scores_and_maps(self, X, want_maps):
        check_is_fitted(self, "offset_")
        images = self._check_images(X)
        scores = np.empty(len(images), dtype=np.float64)
        maps = [None] * len(images) if want_maps else None
        # a few images at a time: a 2048x2048 image is already ~100 tiles
        for start in range(0, len(images), 4):
            chunk = images[start:start + 4]
            crops, layout = _tiles(chunk, self.tile_size_, float(self.overlap), self.crop_margins_)
            if want_maps:
                tile_scores, tile_maps = self.estimator_.score_samples_and_maps(crops)
            else:
                tile_scores, tile_maps = self.estimator_.score_samples(crops), None
            for offset, ((boxes, first, count), size) in enumerate(zip(layout, image_sizes(chunk))):
                scores[start + offset] = -np.min(tile_scores[first:first + count])
                if want_maps:
                    maps[start + offset] = stitch_tiles(tile_maps[first:first + count], boxes, size,
                                                          self.crop_margins_)
        return scores, maps
