"""Dataset loaders for industrial image anomaly detection.

Only numpy and Pillow are used here, so loading data never imports torch.
"""

from ._mvtec import load_mvtec, load_sample, sample_path

__all__ = ["load_mvtec", "load_sample", "sample_path"]
