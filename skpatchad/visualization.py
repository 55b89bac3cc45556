"""Small, dependency-free helpers to look at anomaly maps (numpy + Pillow)."""

import numpy as np

from .utils._params import check_int_param, check_real_param

# Anchor colours of a perceptually ordered "inferno"-like ramp.
_RAMP = np.array(
    [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66],
     [245, 125, 21], [250, 193, 39], [252, 255, 164]], dtype=np.float32)

# NaN pixels (a map with holes) get a neutral grey that is not on the ramp.
_NAN_COLOUR = np.array([128, 128, 128], dtype=np.float32)


def _colour_limit(name, value, finite_values, pick):
    if value is None:
        return float(pick(finite_values)) if finite_values.size else 0.0
    check_real_param(name, value, -np.inf)
    return float(value)


def colorize(anomaly_map, vmin=None, vmax=None):
    """Map a 2-D anomaly map to an RGB uint8 image (dark = normal, bright = anomalous).

    Parameters
    ----------
    anomaly_map : array-like of shape (H, W)
    vmin, vmax : float or None, default=None
        Values drawn darkest and brightest; None takes the smallest and
        largest finite value of the map. Pass the same limits to compare maps.
        ``+inf`` is drawn brightest, ``-inf`` darkest and NaN grey.

    Returns
    -------
    ndarray of uint8, shape (H, W, 3)
    """
    values = np.asarray(anomaly_map, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError("anomaly_map must be a 2-D array, got shape %r" % (values.shape,))
    finite = values[np.isfinite(values)]
    vmin = _colour_limit("vmin", vmin, finite, np.min)
    vmax = _colour_limit("vmax", vmax, finite, np.max)
    if vmin > vmax:
        raise ValueError("vmin (%g) must not be larger than vmax (%g)" % (vmin, vmax))
    missing = np.isnan(values)
    with np.errstate(invalid="ignore"):
        scaled = np.clip((values - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    scaled = np.where(missing, 0.0, scaled) * (len(_RAMP) - 1)
    low = np.floor(scaled).astype(int)
    high = np.minimum(low + 1, len(_RAMP) - 1)
    frac = (scaled - low)[..., None]
    colours = (1 - frac) * _RAMP[low] + frac * _RAMP[high]
    colours[missing] = _NAN_COLOUR
    return np.round(colours).astype(np.uint8)


def overlay(image, anomaly_map, alpha=0.5, vmin=None, vmax=None):
    """Blend a colorized anomaly map over an image (any of our accepted image formats).

    ``alpha`` in [0, 1] is the weight of the map; ``vmin``/``vmax`` as in
    :func:`colorize`. Returns an RGB uint8 image.
    """
    from .utils import check_images

    check_real_param("alpha", alpha, 0.0, 1.0)
    rgb = check_images([image], min_size=1)[0]
    rgb = rgb.astype(np.float32) if rgb.dtype == np.uint8 else rgb * 255.0
    heat = colorize(anomaly_map, vmin, vmax).astype(np.float32)
    if heat.shape[:2] != rgb.shape[:2]:
        raise ValueError("map shape %s does not match image shape %s" % (heat.shape[:2], rgb.shape[:2]))
    return np.clip(np.round((1 - alpha) * rgb + alpha * heat), 0, 255).astype(np.uint8)


def _displayable(picture, row, col):
    """uint8 pixels for a grid cell; binary masks ({0, 1} or bool) are drawn white on black."""
    picture = np.asarray(picture)
    if picture.ndim not in (2, 3) or (picture.ndim == 3 and picture.shape[2] not in (1, 3, 4)):
        raise ValueError("rows[%d][%d] must be an (H, W), (H, W, 3) or (H, W, 4) image, got shape %r"
                         % (row, col, picture.shape))
    if picture.ndim == 3 and picture.shape[2] == 1:
        picture = picture[..., 0]
    if picture.dtype == bool:
        return picture.astype(np.uint8) * 255
    if picture.dtype.kind in "iu":
        top = int(picture.max()) if picture.size else 0
        if top <= 1 and int(picture.min()) >= 0:  # a {0, 1} mask, not a black image
            return picture.astype(np.uint8) * 255
        if int(picture.min()) < 0 or top > 255:
            raise ValueError("rows[%d][%d] holds integer values outside [0, 255]" % (row, col))
        return picture.astype(np.uint8)
    if picture.dtype.kind == "f":
        return np.round(np.clip(np.nan_to_num(picture), 0, 1) * 255).astype(np.uint8)
    raise ValueError("rows[%d][%d] has dtype %s; expected numbers" % (row, col, picture.dtype))


def save_grid(path, rows, cell=160, pad=4):
    """Save a grid of images (a list of rows) as one PNG.

    Cells may be uint8 images, float images in [0, 1], or masks (bool or
    {0, 1} integers, drawn white on black); each is resized to
    ``cell`` x ``cell`` pixels.
    """
    from PIL import Image

    check_int_param("cell", cell)
    check_int_param("pad", pad, minimum=0)
    rows = [list(row) for row in rows]
    if not rows or not any(rows):
        raise ValueError("rows is empty: pass a list of rows of images")
    n_rows, n_cols = len(rows), max(len(row) for row in rows)
    canvas = Image.new("RGB", (n_cols * (cell + pad) + pad, n_rows * (cell + pad) + pad), "white")
    for r, row in enumerate(rows):
        for c, picture in enumerate(row):
            tile = Image.fromarray(_displayable(picture, r, c)).convert("RGB").resize((cell, cell), Image.BILINEAR)
            canvas.paste(tile, (pad + c * (cell + pad), pad + r * (cell + pad)))
    canvas.save(path)
    return path
