"""The one input-validation path for images, shared by every estimator.

Everything a user may pass as ``X`` goes through :func:`check_images`, which
returns a plain list of ``(H, W, 3)`` numpy arrays (uint8 in [0, 255] or float32
in [0, 1]) or raises a ``ValueError``/``TypeError`` naming the offending image.
No torch here: errors must be readable, never a stack trace from a tensor op.
"""

import collections.abc
import numbers
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

_CHANNELS = (1, 3, 4)


def _describe(obj):
    return type(obj).__name__


def _as_rgb(image, index):
    """Validate one image array and bring it to (H, W, 3) with a supported dtype."""
    if image.dtype == object:
        raise TypeError("image %d: expected a numeric array, got an object array" % index)
    if image.ndim == 2:
        image = image[:, :, None]
    elif image.ndim != 3:
        raise ValueError(
            "image %d: expected a 2-D (H, W) or 3-D (H, W, C) array, got shape %s"
            % (index, image.shape)
        )
    channels = image.shape[2]
    if channels not in _CHANNELS:
        hint = ""
        if image.shape[0] in _CHANNELS:
            hint = " (channels-first? skpatchad expects channels-last (H, W, C))"
        raise ValueError(
            "image %d: channel count must be 1 (grayscale), 3 (RGB) or 4 (RGBA), got %d "
            "in shape %s%s" % (index, channels, image.shape, hint)
        )
    image = _as_supported_dtype(image, index)
    if channels == 4:
        image = image[:, :, :3]  # alpha carries no appearance information
    elif channels == 1:
        image = np.repeat(image, 3, axis=2)  # backbones expect three channels
    return image


def _as_supported_dtype(image, index):
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.bool_:
        raise TypeError("image %d: boolean arrays are not images (is this a mask?)" % index)
    if np.issubdtype(image.dtype, np.integer):
        if image.dtype.kind == "u" and image.dtype.itemsize == 2:  # 16-bit cameras and PNGs, either byte order
            return (image.astype(np.float32) / 65535.0)
        lo, hi = (int(image.min()), int(image.max())) if image.size else (0, 0)
        if lo < 0 or hi > 255:
            raise ValueError(
                "image %d: integer images must hold 8-bit values in [0, 255] "
                "(or be uint16), got values in [%d, %d]" % (index, lo, hi)
            )
        return image.astype(np.uint8)
    if np.issubdtype(image.dtype, np.floating):
        image = image.astype(np.float32, copy=False)
        if not np.isfinite(image).all():
            raise ValueError("image %d: contains NaN or infinite values" % index)
        lo, hi = (float(image.min()), float(image.max())) if image.size else (0.0, 0.0)
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                "image %d: float images must lie in [0, 1], got values in [%g, %g] "
                "(pass uint8 for [0, 255] data, or divide by 255)" % (index, lo, hi)
            )
        return image
    raise TypeError("image %d: unsupported dtype %s" % (index, image.dtype))


# EXIF orientations that rotate by 90 degrees, i.e. swap height and width
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112


def upright(pil):
    """The Pillow image with its EXIF orientation applied (itself when it has none)."""
    from PIL import ImageOps

    return ImageOps.exif_transpose(pil)


def upright_size(pil):
    """``(width, height)`` of :func:`upright` ``(pil)``, from the header alone."""
    width, height = pil.size
    if pil.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSING_ORIENTATIONS:
        return height, width
    return width, height


def read_image(path, index=0):
    """Read one image file with Pillow as an (H, W, C) uint8/uint16/float32 array.

    The EXIF orientation tag (set by cameras and phones) is applied, so the
    array, and so the anomaly map, is upright as image viewers and annotation
    tools show the photo.
    """
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError("image %d: file not found: %r" % (index, path))
    try:
        with Image.open(path) as pil:
            pil = upright(pil)
            if pil.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(pil)
                if array.dtype == np.uint8:
                    return array
                # mode "I" is 32-bit: casting out-of-range values would wrap silently
                lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
                if lo < 0 or hi > 65535:
                    raise ValueError(
                        "image %d: %r holds integer values in [%d, %d], outside the "
                        "16-bit range [0, 65535]" % (index, path, lo, hi)
                    )
                return array.astype(np.uint16)
            if pil.mode == "F":
                # 32-bit float TIFFs: converting to RGB would truncate [0, 1] to 0
                # (black); as an array they get the float checks of any array
                return np.asarray(pil)
            if pil.mode not in ("L", "RGB", "RGBA"):
                pil = pil.convert("RGBA" if "A" in pil.mode or "transparency" in pil.info else "RGB")
            return np.asarray(pil)
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError("image %d: cannot read %r as an image (%s)" % (index, path, exc)) from exc


def _image_file_size(path, index):
    """(height, width) of an image file from its header, without decoding the pixels."""
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError("image %d: file not found: %r" % (index, path))
    try:
        with Image.open(path) as pil:
            width, height = upright_size(pil)
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError("image %d: cannot read %r as an image (%s)" % (index, path, exc)) from exc
    return height, width


class _ImageFile:
    """An image file checked from its header and decoded only when used."""

    __slots__ = ("path", "index", "shape")

    def __init__(self, path, index, size):
        self.path, self.index, self.shape = path, index, tuple(size) + (3,)

    def load(self):
        return _as_rgb(read_image(self.path, self.index), self.index)


class ImageList(Sequence):
    """Validated images, some of which may be files decoded on access.

    Indexing returns an (H, W, 3) array; slicing a list of arrays. Files are
    read batch by batch as the estimators iterate, so fitting on thousands of
    image paths never holds all decoded images at once.
    """

    def __init__(self, items):
        self._items = list(items)

    def __len__(self):
        return len(self._items)

    def __getitem__(self, key):
        if isinstance(key, slice):
            return [self[i] for i in range(*key.indices(len(self)))]
        item = self._items[key]
        return item.load() if isinstance(item, _ImageFile) else item

    def subset(self, indices):
        return ImageList(self._items[int(i)] for i in indices)

    @property
    def sizes(self):
        return [tuple(item.shape[:2]) for item in self._items]


def check_images(X, *, min_size=16, estimator_name="this estimator"):
    """Validate images and return them as a list of (H, W, 3) arrays.

    Parameters
    ----------
    X : array-like or list
        A numpy array ``(N, H, W)`` or ``(N, H, W, C)`` with C in {1, 3, 4};
        or a list whose items are 2-D/3-D arrays (sizes may differ) or image file
        paths (``str`` or ``pathlib.Path``). uint8 data is read as [0, 255],
        float data must lie in [0, 1], uint16 is read as 16-bit.
    min_size : int, default=16
        Smallest accepted height and width.
    estimator_name : str
        Used in error messages.

    Returns
    -------
    images : list of ndarray, ndarray of shape (N, H, W, 3), or ImageList
        One ``(H, W, 3)`` array per image, uint8 or float32 (views of the input
        when no conversion is needed). An input array ``(N, H, W, 3)`` of uint8
        or float32 that passes validation is returned as is. When X holds file
        paths, an :class:`ImageList` is returned: files are checked now (exist,
        readable header, size) and decoded when the estimator reaches them.
    """
    if X is None:
        raise ValueError("X is None; expected images")
    if isinstance(X, (str, bytes, os.PathLike)):
        raise TypeError(
            "X must be a collection of images, got a single path %r; wrap it in a list" % (X,)
        )
    if hasattr(X, "tocsr") or type(X).__module__.startswith("scipy.sparse"):
        raise TypeError("X is a sparse matrix; images must be dense arrays, a list of arrays or file paths")
    # after the sparse check: scipy's dok format is a dict
    if isinstance(X, (collections.abc.Set, collections.abc.Mapping)):
        # one score and one map per image, in input order: an unordered
        # collection would pair them with the wrong images without any error
        raise TypeError(
            "X must be an ordered collection of images (array, list or tuple), got a %s; "
            "pass a list, e.g. sorted(X)" % type(X).__name__
        )
    if isinstance(X, np.ndarray):
        if X.dtype == object or (X.dtype.kind == "U" and X.ndim == 1):
            items = list(X)  # images or paths of any sizes, e.g. np.array(list_of_paths)
        else:
            if X.ndim not in (3, 4):
                raise ValueError(
                    "X must be an array of images with shape (N, H, W) or (N, H, W, C), "
                    "got shape %s" % (X.shape,)
                )
            if X.shape[0] == 0:
                raise ValueError("X is empty: at least one image is required")
            if X.ndim == 3 and X.shape[2] in _CHANNELS and X.shape[2] < min_size:
                raise ValueError(
                    "X has shape %s, which reads as %d grayscale images of %dx%d pixels; "
                    "for a single (H, W, C) image pass X[np.newaxis] or [X]" % ((X.shape,) + X.shape)
                )
            items = list(X)
    elif hasattr(X, "__len__") and hasattr(X, "__getitem__"):
        items = list(X)
    elif hasattr(X, "__iter__"):
        items = list(X)
    else:
        raise TypeError(
            "X must be an array of images, a list of arrays or a list of file paths, "
            "got %s" % _describe(X)
        )
    if len(items) == 0:
        raise ValueError("X is empty: at least one image is required")

    images = []
    has_files = False
    for index, item in enumerate(items):
        if isinstance(item, (str, os.PathLike)):
            height, width = _image_file_size(Path(item), index)
            if height < min_size or width < min_size:
                raise ValueError(
                    "image %d: %dx%d pixels is too small; %s needs at least %dx%d"
                    % (index, height, width, estimator_name, min_size, min_size)
                )
            images.append(_ImageFile(Path(item), index, (height, width)))
            has_files = True
            continue
        if isinstance(item, np.ndarray):
            array = item
        elif isinstance(item, numbers.Number) or item is None:
            raise TypeError(
                "image %d: expected an image array or a file path, got %s" % (index, _describe(item))
            )
        elif hasattr(item, "__array__") or isinstance(item, (list, tuple)):
            try:
                array = np.asarray(item)
            except (ValueError, TypeError) as exc:
                raise TypeError("image %d: cannot be converted to an array (%s)" % (index, exc)) from exc
        else:
            raise TypeError(
                "image %d: expected an image array or a file path, got %s" % (index, _describe(item))
            )
        image = _as_rgb(array, index)
        height, width = image.shape[:2]
        if height < min_size or width < min_size:
            raise ValueError(
                "image %d: %dx%d pixels is too small; %s needs at least %dx%d"
                % (index, height, width, estimator_name, min_size, min_size)
            )
        images.append(image)
    if isinstance(X, np.ndarray) and X.ndim == 4 and X.shape[3] == 3 and X.dtype in (np.uint8, np.float32):
        # Every image is a view of X: hand back the array itself so batches are
        # slices of it, never copies of a large stack.
        return X
    if has_files:
        return ImageList(images)
    return images


def image_sizes(images):
    """Return the list of (H, W) of validated images (files are not decoded)."""
    if isinstance(images, ImageList):
        return images.sizes
    return [tuple(image.shape[:2]) for image in images]


def select_images(images, mask):
    """The validated images where ``mask`` is true, keeping their container kind."""
    indices = np.flatnonzero(mask)
    if isinstance(images, np.ndarray):
        return images[indices]
    if isinstance(images, ImageList):
        return images.subset(indices)
    return [images[i] for i in indices]
