"""Visualization helpers: colorize, overlay, save_grid."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from skpatchad.visualization import colorize, overlay, save_grid


def test_colorize_orders_values_dark_to_bright():
    ramp = colorize(np.linspace(0, 1, 50)[None])
    brightness = ramp[0].astype(int).sum(axis=1)
    assert ramp.shape == (1, 50, 3) and ramp.dtype == np.uint8
    assert brightness[0] < 20 and brightness[-1] > 600 and np.all(np.diff(brightness) >= -2)
    # shared limits: the same value gets the same colour in two maps
    np.testing.assert_array_equal(colorize([[0.5, 0.0]], 0, 1)[0, 0], colorize([[0.5, 1.0]], 0, 1)[0, 0])


def test_colorize_non_finite_values():
    values = np.array([[0.0, 1.0, np.nan, np.inf, -np.inf]])
    colours = colorize(values)
    np.testing.assert_array_equal(colours[0, 2], [128, 128, 128])  # NaN: grey, off the ramp
    np.testing.assert_array_equal(colours[0, 3], colours[0, 1])  # +inf: brightest
    np.testing.assert_array_equal(colours[0, 4], colours[0, 0])  # -inf: darkest
    assert colorize(np.full((2, 2), np.nan)).shape == (2, 2, 3)


@pytest.mark.parametrize("kwargs, match", [({"vmin": 2, "vmax": 1}, "vmin"), ({"vmin": np.nan}, "vmin"),
                                           ({"vmax": "high"}, "vmax")])
def test_colorize_rejects_bad_limits(kwargs, match):
    with pytest.raises(ValueError, match=match):
        colorize(np.zeros((2, 2)), **kwargs)
    with pytest.raises(ValueError, match="2-D"):
        colorize(np.zeros((2, 2, 2)))


def test_overlay_blends_and_validates_alpha():
    image = np.full((4, 5, 3), 200, np.uint8)
    anomaly = np.zeros((4, 5))
    np.testing.assert_array_equal(overlay(image, anomaly, alpha=0.0), image)
    np.testing.assert_array_equal(overlay(image, anomaly, alpha=1.0), colorize(anomaly))
    np.testing.assert_array_equal(overlay(image.astype(np.float32) / 255, anomaly, alpha=0.0), image)
    for alpha in (1.5, -0.1, np.nan):
        with pytest.raises(ValueError, match="alpha"):
            overlay(image, anomaly, alpha=alpha)
    with pytest.raises(ValueError, match="does not match"):
        overlay(image, np.zeros((5, 4)))


def test_save_grid_draws_binary_masks_white(tmp_path):
    mask01 = np.zeros((8, 8), np.uint8)
    mask01[:, 4:] = 1
    image = np.full((8, 8, 3), 90, np.uint8)
    path = save_grid(tmp_path / "grid.png", [[image, mask01, mask01.astype(bool)], [np.ones((8, 8)) * 0.5]],
                     cell=8, pad=0)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (16, 24, 3)
    assert grid[0:8, 0:8].mean() == pytest.approx(90, abs=1)
    for left in (8, 16):  # both masks: right half white, left half black
        assert grid[2:6, left + 6:left + 8].min() == 255 and grid[2:6, left:left + 2].max() == 0
    assert grid[8:16, 0:8].mean() == pytest.approx(128, abs=1)  # float in [0, 1]
    assert grid[8:16, 8:].min() == 255  # padding of the short row
    with pytest.raises(ValueError, match=r"rows\[0\]\[1\]"):
        save_grid(tmp_path / "bad.png", [[image, np.full((4, 4), 300, np.int32)]])
    with pytest.raises(ValueError, match="empty"):
        save_grid(tmp_path / "bad.png", [])


def test_visualization_does_not_import_torch():
    code = "import sys, skpatchad.visualization; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
