"""Loader for image folders in the MVTec AD directory layout.

The MVTec AD dataset (Bergmann et al., CVPR 2019) stores each category as::

    <root>/<category>/train/good/000.png
    <root>/<category>/test/<defect_type or good>/000.png
    <root>/<category>/ground_truth/<defect_type>/000_mask.png

This module only depends on numpy and Pillow so that it can be used without
importing torch.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from numbers import Integral
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from sklearn.utils import Bunch

from ..utils._images import upright, upright_size

__all__ = ["load_mvtec", "load_sample", "sample_path"]

_SPLITS = ("train", "test")
_GOOD = "good"
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_MASK_SUFFIX = "_mask"

# Image modes whose pixels are already 8-bit and are returned as stored.
_NATIVE_MODES = {"L": (), "LA": (2,), "RGB": (3,), "RGBA": (4,)}

# Pillow >= 9.1 moved the filters into ``Image.Resampling``; keep a fallback
# so that older Pillow versions still work.
_Resampling = getattr(Image, "Resampling", Image)
_BILINEAR = _Resampling.BILINEAR
_NEAREST = _Resampling.NEAREST

_SAMPLE_DIRNAME = "mvtec_bottle_sample"
_SAMPLE_CATEGORY = "bottle"


def _n_threads(n_files):
    # PNG decoding (zlib) releases the GIL, so a few threads give a real
    # speed-up (about 1.6x with 2 threads on 209 900x900 PNGs on 2 cores).
    # More threads than cores only add contention.
    return max(1, min(8, os.cpu_count() or 1, n_files))


def _check_resize(resize):
    """Validate ``resize`` and return it as ``(height, width)`` or None."""
    if resize is None:
        return None
    if isinstance(resize, Integral) and not isinstance(resize, bool):
        size = (int(resize), int(resize))
    elif (
        isinstance(resize, (tuple, list))
        and len(resize) == 2
        and all(isinstance(v, Integral) and not isinstance(v, bool) for v in resize)
    ):
        size = (int(resize[0]), int(resize[1]))
    else:
        raise ValueError(
            "resize must be None, a positive int or a (height, width) tuple of "
            "positive ints; got %r." % (resize,)
        )
    if min(size) <= 0:
        raise ValueError("resize must be positive; got %r." % (resize,))
    return size


def _output_mode(image, path):
    """Return the 8-bit mode ``image`` is returned in.

    Images already stored as 8-bit L, LA, RGB or RGBA are kept as stored
    (grayscale categories stay 2-D). Bilevel and palette images are expanded
    to the 8-bit mode that represents them losslessly; 16-bit and float
    images are rejected because the loader promises uint8 output.
    """
    mode = image.mode
    if mode in _NATIVE_MODES:
        return mode
    if mode == "1":
        return "L"
    if mode in ("P", "PA"):
        return "RGBA" if (mode == "PA" or "transparency" in image.info) else "RGB"
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return "RGB"
    raise ValueError(
        "Unsupported image mode %r in %s: only 8-bit images are supported."
        % (mode, path)
    )


@contextmanager
def _open_image(path):
    """``Image.open`` whose read and decode errors name the file.

    Pillow's own errors (a truncated PNG, a macOS ``._000.png`` resource
    fork) do not say which of a few hundred files is broken.
    """
    try:
        with Image.open(path) as image:
            yield image
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError("Cannot read %s as an image: %s" % (path, exc)) from exc


def _is_hidden(path):
    # .ipynb_checkpoints, .DS_Store, macOS "._000.png" resource forks
    return path.name.startswith(".")


def _probe(path, size):
    """Read only the header of ``path``.

    Returns the stored ``(height, width)`` and the shape of the array the
    image will be returned as.
    """
    with _open_image(path) as image:
        mode = _output_mode(image, path)
        width, height = upright_size(image)
        stored_hw = (height, width)
    out_hw = stored_hw if size is None else size
    return stored_hw, out_hw + _NATIVE_MODES[mode]


def _read_image(path, size):
    with _open_image(path) as image:
        image = upright(image)  # as check_images decodes files
        mode = _output_mode(image, path)
        if image.mode != mode:
            image = image.convert(mode)
        if size is not None and image.size != (size[1], size[0]):
            # Pillow's convolution-based resampling antialiases when
            # downscaling, unlike a plain bilinear interpolation.
            image = image.resize((size[1], size[0]), _BILINEAR)
        return np.asarray(image, dtype=np.uint8)


def _read_mask(path, image_hw, size):
    with _open_image(path) as mask:
        mask = upright(mask)
        if mask.size != (image_hw[1], image_hw[0]):
            raise ValueError(
                "Mask %s has size %dx%d (HxW) but its image has size %dx%d."
                % (path, mask.size[1], mask.size[0], image_hw[0], image_hw[1])
            )
        if mask.mode not in ("1", "L"):
            mask = mask.convert("L")
        if size is not None and mask.size != (size[1], size[0]):
            # Nearest neighbour keeps the mask binary.
            mask = mask.resize((size[1], size[0]), _NEAREST)
        # Masks are stored as {0, 255}; any non-zero pixel is a defect.
        return (np.asarray(mask) > 0).astype(np.uint8)


def _list_images(directory):
    return sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and not _is_hidden(p) and p.suffix.lower() in _IMAGE_EXTENSIONS
    )


def _find_mask(gt_dir, defect_type, image_path):
    """Return the ground-truth mask path of a defective image or raise."""
    stem = image_path.stem + _MASK_SUFFIX
    candidate = gt_dir / defect_type / (stem + ".png")
    if candidate.is_file():
        return candidate
    # Fall back to other extensions, in any case (000_mask.PNG, .tif), for
    # datasets converted to another format.
    folder = gt_dir / defect_type
    if folder.is_dir():
        found = [p for p in _list_images(folder) if p.stem == stem]
        if found:
            return min(found, key=lambda p: _IMAGE_EXTENSIONS.index(p.suffix.lower()))
    raise FileNotFoundError(
        "No ground-truth mask for anomalous image %s: expected %s."
        % (image_path, candidate)
    )


def _available_categories(root):
    return sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and not _is_hidden(p) and any((p / s).is_dir() for s in _SPLITS)
    )


def _collect(root, category, split):
    """Return ``(image_paths, defect_types, mask_paths)`` in sorted order."""
    if split not in _SPLITS:
        raise ValueError("split must be one of %r; got %r." % (_SPLITS, split))
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError("MVTec AD root directory not found: %s" % root)
    category_dir = root / str(category)
    if not category_dir.is_dir():
        raise FileNotFoundError(
            "Category %r not found: %s does not exist. Available categories "
            "in %s: %s."
            % (
                category,
                category_dir,
                root,
                ", ".join(_available_categories(root)) or "none",
            )
        )
    split_dir = category_dir / split
    if not split_dir.is_dir():
        raise FileNotFoundError(
            "Split %r of category %r not found: %s does not exist."
            % (split, category, split_dir)
        )

    gt_dir = category_dir / "ground_truth"
    paths, types, masks = [], [], []
    # Sorting by defect type then file name makes the order independent of
    # the file system's directory listing order.
    for type_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not _is_hidden(p)):
        for path in _list_images(type_dir):
            paths.append(path)
            types.append(type_dir.name)
            masks.append(
                None
                if type_dir.name == _GOOD
                else _find_mask(gt_dir, type_dir.name, path)
            )
    if not paths:
        raise ValueError("No images found under %s." % split_dir)
    return paths, types, masks


def load_mvtec(root, category, split="train", *, resize=None, return_X_y=False):
    """Load one category of a dataset in the MVTec AD directory layout.

    The expected layout is ``root/category/train/good/*.png``,
    ``root/category/test/<defect_type or good>/*.png`` and
    ``root/category/ground_truth/<defect_type>/<stem>_mask.png``. Every
    sub-folder of the split other than ``good`` is treated as a defect type
    and each of its images must have a ground-truth mask. Hidden files and
    folders (names starting with ``.``: ``.ipynb_checkpoints``, macOS
    ``._000.png``) are ignored.

    Parameters
    ----------
    root : str or path-like
        Directory containing one sub-folder per category.

    category : str
        Category to load, e.g. ``"bottle"``.

    split : {"train", "test"}, default="train"
        Which split to load.

    resize : int or tuple of (int, int), default=None
        If given, images are resized to ``(resize, resize)`` or to
        ``(height, width)`` on load with antialiased bilinear resampling and
        masks with nearest-neighbour resampling. ``None`` keeps the stored
        size.

    return_X_y : bool, default=False
        If True, return ``(images, labels, masks)`` instead of a Bunch.

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch`
        Dictionary-like object with the following attributes.

        images : ndarray of shape (n_images, height, width[, channels]) or list
            uint8 images with their channels as stored: RGB images are
            ``(height, width, 3)`` and grayscale images stay 2-D. A list of
            arrays is returned when the images do not all share one shape.
        labels : ndarray of shape (n_images,)
            1 for anomalous images, 0 for good ones.
        masks : ndarray of shape (n_images, height, width) or list
            uint8 ground-truth masks with values in {0, 1}, each of its
            image's height and width; all zero for good images. A list when
            ``images`` is a list.
        defect_types : ndarray of shape (n_images,) of str
            Name of the defect type folder, ``"good"`` for normal images.
        filenames : list of str
            Path of each image file.
        category : str
            The loaded category.
        split : str
            The loaded split.

        Images are sorted by defect type, then by file name.

    (images, labels, masks) : tuple if ``return_X_y`` is True
        The arrays (or lists) described above.

    Raises
    ------
    FileNotFoundError
        If ``root``, the category or the split folder does not exist (the
        message names the missing path and the available categories), or if
        an anomalous image has no ground-truth mask.

    ValueError
        If ``split`` or ``resize`` is invalid, if the split has no images, or
        if an image or mask file cannot be read (the message names the file).

    Examples
    --------
    >>> from skpatchad.datasets import load_mvtec
    >>> data = load_mvtec("/data/mvtec_ad", "bottle", "test")  # doctest: +SKIP
    >>> data.images.shape  # doctest: +SKIP
    (83, 900, 900, 3)
    >>> data.labels.sum()  # doctest: +SKIP
    63
    """
    size = _check_resize(resize)
    paths, types, mask_paths = _collect(root, category, split)
    n_images = len(paths)

    # Read the headers first (cheap) so that, when all images share one
    # shape, they can be decoded straight into one preallocated array instead
    # of stacking a list afterwards, which would double the peak memory
    # (~500 MB for the 209 bottle training images).
    stored_hws, shapes = zip(*(_probe(p, size) for p in paths))
    same_shape = len(set(shapes)) == 1
    if same_shape:
        images = np.empty((n_images,) + shapes[0], dtype=np.uint8)
        masks = np.zeros((n_images,) + shapes[0][:2], dtype=np.uint8)
    else:
        images = [None] * n_images
        masks = [None] * n_images

    def load_one(i):
        image = _read_image(paths[i], size)
        if image.shape != shapes[i]:
            # The file changed between the two reads.
            raise ValueError("Unexpected shape %r for %s." % (image.shape, paths[i]))
        images[i] = image
        if mask_paths[i] is not None:
            masks[i] = _read_mask(mask_paths[i], stored_hws[i], size)
        elif not same_shape:
            masks[i] = np.zeros(shapes[i][:2], dtype=np.uint8)

    n_threads = _n_threads(n_images)
    if n_threads == 1:
        for i in range(n_images):
            load_one(i)
    else:
        with ThreadPoolExecutor(max_workers=n_threads) as executor:
            # list() re-raises the first exception of a worker, if any.
            list(executor.map(load_one, range(n_images)))

    labels = np.array([t != _GOOD for t in types], dtype=np.int64)
    defect_types = np.array(types, dtype=str)
    filenames = [str(p) for p in paths]

    if return_X_y:
        return images, labels, masks
    return Bunch(
        images=images,
        labels=labels,
        masks=masks,
        defect_types=defect_types,
        filenames=filenames,
        category=str(category),
        split=split,
    )


def sample_path():
    """Return the root folder of the embedded MVTec AD "bottle" sample.

    The sample is a small, downscaled (224x224) subset of the "bottle"
    category of MVTec AD (CC BY-NC-SA 4.0, see ``ATTRIBUTION.txt`` in the
    returned folder) stored in the MVTec AD layout, so that it can be read
    with :func:`load_mvtec` using ``category="bottle"``.

    Returns
    -------
    path : str
        The directory containing the ``bottle`` category folder.

    Examples
    --------
    >>> from skpatchad.datasets import load_mvtec, sample_path
    >>> data = load_mvtec(sample_path(), "bottle", "test")
    >>> data.images.shape
    (16, 224, 224, 3)
    """
    return str(Path(__file__).resolve().parent / "data" / _SAMPLE_DIRNAME)


def load_sample(split="train", *, return_X_y=False):
    """Load the embedded MVTec AD "bottle" sample.

    The sample ships with the package so that examples and tests work
    offline. It holds 32 training images (all good) and 16 test images
    (6 good, 10 defective: broken_large, broken_small and contamination),
    downscaled from 900x900 to 224x224. It is derived from the MVTec AD
    dataset by MVTec Software GmbH and licensed under CC BY-NC-SA 4.0.

    Parameters
    ----------
    split : {"train", "test"}, default="train"
        Which split to load.

    return_X_y : bool, default=False
        If True, return ``(images, labels, masks)`` instead of a Bunch.

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch`
        Same as :func:`load_mvtec`: ``images`` of shape
        ``(n_images, 224, 224, 3)``, ``labels``, ``masks`` of shape
        ``(n_images, 224, 224)``, ``defect_types`` and ``filenames``.

    (images, labels, masks) : tuple if ``return_X_y`` is True

    Examples
    --------
    >>> from skpatchad.datasets import load_sample
    >>> train = load_sample("train")
    >>> train.images.shape, train.images.dtype
    ((32, 224, 224, 3), dtype('uint8'))
    >>> X_test, y_test, masks = load_sample("test", return_X_y=True)
    >>> int(y_test.sum()), masks.shape
    (10, (16, 224, 224))
    """
    return load_mvtec(
        sample_path(), _SAMPLE_CATEGORY, split, return_X_y=return_X_y
    )
