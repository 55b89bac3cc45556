"""Shared helpers: input validation (torch-free)."""

from ._images import check_images, image_sizes, read_image

__all__ = ["check_images", "image_sizes", "read_image"]
