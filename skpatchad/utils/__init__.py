"""Shared helpers: input validation (torch-free)."""

from ._images import ImageList, check_images, image_sizes, read_image, select_images

__all__ = ["ImageList", "check_images", "image_sizes", "read_image", "select_images"]
