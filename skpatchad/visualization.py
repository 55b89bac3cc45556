"""Small, dependency-free helpers to look at anomaly maps (numpy + Pillow)."""

import numpy as np

# Anchor colours of a perceptually ordered "inferno"-like ramp.
_RAMP = np.array(
    [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66],
     [245, 125, 21], [250, 193, 39], [252, 255, 164]], dtype=np.float32)


def colorize(anomaly_map, vmin=None, vmax=None):
    """Map a 2-D anomaly map to an RGB uint8 image (dark = normal, bright = anomalous)."""
    values = np.asarray(anomaly_map, dtype=np.float32)
    vmin = float(values.min()) if vmin is None else float(vmin)
    vmax = float(values.max()) if vmax is None else float(vmax)
    scaled = np.clip((values - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0) * (len(_RAMP) - 1)
    low = np.floor(scaled).astype(int)
    high = np.minimum(low + 1, len(_RAMP) - 1)
    frac = (scaled - low)[..., None]
    return ((1 - frac) * _RAMP[low] + frac * _RAMP[high]).astype(np.uint8)


def overlay(image, anomaly_map, alpha=0.5, vmin=None, vmax=None):
    """Blend a colorized anomaly map over an image (any of our accepted image formats)."""
    from .utils import check_images

    rgb = check_images([image], min_size=1)[0]
    rgb = rgb.astype(np.float32) if rgb.dtype == np.uint8 else rgb * 255.0
    heat = colorize(anomaly_map, vmin, vmax).astype(np.float32)
    if heat.shape[:2] != rgb.shape[:2]:
        raise ValueError("map shape %s does not match image shape %s" % (heat.shape[:2], rgb.shape[:2]))
    return ((1 - alpha) * rgb + alpha * heat).astype(np.uint8)


def save_grid(path, rows, cell=160, pad=4):
    """Save a grid of RGB/grayscale uint8 images (list of rows) as one PNG."""
    from PIL import Image

    n_rows, n_cols = len(rows), max(len(row) for row in rows)
    canvas = Image.new("RGB", (n_cols * (cell + pad) + pad, n_rows * (cell + pad) + pad), "white")
    for r, row in enumerate(rows):
        for c, picture in enumerate(row):
            picture = np.asarray(picture)
            if picture.dtype != np.uint8:
                picture = (np.clip(picture, 0, 1) * 255).astype(np.uint8)
            tile = Image.fromarray(picture).convert("RGB").resize((cell, cell), Image.BILINEAR)
            canvas.paste(tile, (pad + c * (cell + pad), pad + r * (cell + pad)))
    canvas.save(path)
    return path
