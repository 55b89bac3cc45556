"""Turn validated images into batched, resized torch tensors.

Resizing happens here, in torch, on the device the network runs on, so large
inputs (e.g. 900x900) are decoded once and shrunk with antialiasing in one
batched call; the geometry (resize, optional centre crop) is described by
:class:`ImageGeometry` so the map path can undo it exactly.
"""

import numbers
import warnings

import numpy as np
import torch
import torch.nn.functional as F


def _pair(value, name):
    """``(height, width)`` from an int or a pair of ints; floats (63.9) are not truncated silently."""
    def is_int(v):
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    if is_int(value):
        value = (value, value)
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2 \
            or not all(is_int(v) for v in value):
        raise ValueError("%s must be an int or a (height, width) pair of ints, got %r" % (name, value))
    height, width = int(value[0]), int(value[1])
    if height < 16 or width < 16:
        raise ValueError("%s must be at least 16 pixels, got %r" % (name, value))
    return height, width


class ImageGeometry:
    """Resize every image to ``image_size``, then optionally centre-crop ``crop_size``.

    Parameters
    ----------
    image_size : int or (int, int)
    crop_size : int, (int, int) or None
        The paper's protocol is 256 -> 224; ``None`` keeps the whole resized image.
    """

    def __init__(self, image_size, crop_size=None):
        self.resize = _pair(image_size, "image_size")
        if crop_size is None:
            self.crop = None
        else:
            crop = _pair(crop_size, "crop_size")
            if crop[0] > self.resize[0] or crop[1] > self.resize[1]:
                raise ValueError("crop_size %r is larger than image_size %r" % (crop_size, image_size))
            top = (self.resize[0] - crop[0]) // 2
            left = (self.resize[1] - crop[1]) // 2
            self.crop = (top, left, crop[0], crop[1])

    @property
    def input_size(self):
        """(height, width) of the tensor the network sees."""
        return self.resize if self.crop is None else self.crop[2:]

    def crop_margins(self):
        """Fractions of an image the centre crop cuts away: ``((top, bottom), (left, right))``."""
        if self.crop is None:
            return ((0.0, 0.0), (0.0, 0.0))
        top, left, height, width = self.crop
        return tuple((start / full, (full - start - kept) / full)
                     for start, kept, full in ((top, height, self.resize[0]), (left, width, self.resize[1])))

    def apply(self, batch):
        """Resize (and crop) a float batch ``(B, 3, H, W)``."""
        if tuple(batch.shape[-2:]) != self.resize:
            batch = F.interpolate(batch, size=self.resize, mode="bilinear", align_corners=False, antialias=True)
        if self.crop is not None:
            top, left, height, width = self.crop
            batch = batch[:, :, top:top + height, left:left + width]
        return batch


def _from_numpy(array):
    """Zero-copy tensor view of an array, read-only ones included.

    torch warns about read-only arrays (decoded files, user data) because it
    could write through the view; we only ever read it before converting.
    """
    array = np.ascontiguousarray(array)
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _resized_float_batch(arrays, geometry, device):
    """Same-shaped (H, W, 3) images -> resized (B, 3, h, w) float tensor in [0, 1].

    uint8 images are resized *before* the float conversion: torch's uint8
    antialiased bilinear kernel is ~10x faster than converting a large image to
    float first, and the rounding it adds (< 0.5/255) is far below sensor noise.
    """
    if isinstance(arrays, np.ndarray):
        batch = _from_numpy(arrays)
    else:  # torch.stack: its allocator maps fresh memory much faster than numpy's here
        batch = torch.stack([_from_numpy(a) for a in arrays])
    batch = batch.to(device, non_blocking=True)
    batch = batch.permute(0, 3, 1, 2)  # a channels-last view: no copy
    if batch.dtype == torch.uint8:
        if batch.device.type == "cpu" and tuple(batch.shape[-2:]) != geometry.resize:
            batch = F.interpolate(batch, size=geometry.resize, mode="bilinear", align_corners=False,
                                  antialias=True)
        batch = batch.float().div_(255.0)
    return geometry.apply(batch.float())


def iter_image_batches(images, geometry, batch_size, device):
    """Yield ``(start, tensor)`` with tensors of shape ``(B, 3, *geometry.input_size)``.

    ``images`` is a list of (H, W, 3) arrays or one (N, H, W, 3) array.
    """
    batch_size = max(1, int(batch_size))
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]  # decodes image files lazily
        if isinstance(chunk, np.ndarray) or len({(image.shape, image.dtype) for image in chunk}) == 1:
            batch = _resized_float_batch(chunk, geometry, device)
        else:
            batch = torch.cat([_resized_float_batch([image], geometry, device) for image in chunk])
        yield start, batch
