"""PatchCore fit cost against the number of training images.

Builds training sets of N images (default 50, 200, 1000, 5000) from the
normal training images of an MVTec-AD-layout category with random flips and
crops (each 70-100% of the side, resized to 256x256 as uint8), fits
``PatchCore(coreset=0.01)`` on each set in its own process and reports the fit
time split into feature extraction, coreset selection, bank and calibration,
and the peak memory (max RSS) with and without the training images
themselves. Growth is printed as ratios against the smallest N measured in the
same run: feature extraction should grow like N, the greedy coreset like
N * k (k = 1% of the patches, so like N^2) at most.

    python benchmarks/bench_scale.py --sizes 50 200 1000 5000

Each size runs in a fresh process so that its peak memory is its own.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from skpatchad import PatchCore
from skpatchad.datasets import load_mvtec


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def augmented_training_set(root, category, n_images, size=256, seed=0):
    """(n_images, size, size, 3) uint8: flips and crops of the category's training images."""
    train = load_mvtec(root, category, "train")
    rng = np.random.RandomState(seed)
    out = torch.empty((n_images, size, size, 3), dtype=torch.uint8)
    for i in range(n_images):
        image = train.images[i % len(train.images)]
        height, width = image.shape[:2]
        if i >= len(train.images):  # the originals first, then augmented copies
            side = rng.uniform(0.7, 1.0)
            crop_h, crop_w = int(side * height), int(side * width)
            top, left = rng.randint(0, height - crop_h + 1), rng.randint(0, width - crop_w + 1)
            image = image[top:top + crop_h, left:left + crop_w]
            if rng.rand() < 0.5:
                image = image[:, ::-1]
            if rng.rand() < 0.5:
                image = image[::-1]
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
        tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[i] = tensor[0].permute(1, 2, 0)
    return out.numpy()


def run_one(args, n_images):
    torch.set_num_threads(args.threads)
    tic = time.perf_counter()
    images = augmented_training_set(args.root, args.category, n_images)
    make_s = time.perf_counter() - tic
    rss_images = peak_rss_mb()
    model = PatchCore(backbone=args.backbone, coreset=args.coreset, random_state=0, verbose=args.verbose)
    tic = time.perf_counter()
    model.fit(images)
    fit_s = time.perf_counter() - tic
    peak = peak_rss_mb()
    times = model.fit_times_
    return dict(n_images=n_images, n_patches=int(n_images * np.prod(model.grid_shape_)),
                bank=len(model.memory_bank_), dim=int(model.memory_bank_.shape[1]), fit_s=fit_s,
                features_s=times["features"], coreset_s=times["coreset"], bank_s=times["bank"],
                calibration_s=times["calibration"], peak_rss_mb=peak, rss_before_fit_mb=rss_images,
                images_mb=images.nbytes / 2**20, make_s=make_s, threads=args.threads, backbone=args.backbone)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.path.join("..", "shared", "data", "mvtec_ad"))
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--coreset", type=float, default=0.01)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 200, 1000, 5000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--verbose", type=int, default=0)
    parser.add_argument("--output", help="append the rows as JSON lines to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_one(args, args.sizes[0])))
        return 0
    rows = []
    base_argv = [a for a in argv if a != "--worker"]
    if "--sizes" in base_argv:  # drop the size list; each worker gets one size
        start = base_argv.index("--sizes")
        stop = start + 1
        while stop < len(base_argv) and not base_argv[stop].startswith("--"):
            stop += 1
        base_argv = base_argv[:start] + base_argv[stop:]
    for n_images in args.sizes:
        command = [sys.executable, os.path.abspath(__file__)] + base_argv + ["--worker", "--sizes", str(n_images)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            sys.stderr.write(result.stdout + result.stderr)
            raise SystemExit("size %d failed" % n_images)
        row = json.loads(result.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        if args.output:
            with open(args.output, "a") as handle:
                handle.write(json.dumps(row) + "\n")
    base = rows[0]
    print("\n%-6s %-9s %-6s %-7s %-7s %-7s %-7s %-8s %-8s | %-9s %-9s %-9s" % (
        "N", "patches", "bank", "fit_s", "feat_s", "core_s", "calib_s", "peakMB", "model_MB",
        "N ratio", "feat/N", "core/Nk"))
    for r in rows:
        n_ratio = r["n_images"] / base["n_images"]
        feat_ratio = (r["features_s"] / base["features_s"]) / n_ratio
        nk_ratio = (r["n_patches"] * r["bank"]) / (base["n_patches"] * base["bank"])
        core_ratio = (r["coreset_s"] / max(base["coreset_s"], 1e-9)) / nk_ratio
        print("%-6d %-9d %-6d %-7.1f %-7.1f %-7.1f %-7.1f %-8.0f %-8.0f | %-9.1f %-9.2f %-9.3f" % (
            r["n_images"], r["n_patches"], r["bank"], r["fit_s"], r["features_s"], r["coreset_s"],
            r["calibration_s"], r["peak_rss_mb"], r["peak_rss_mb"] - r["rss_before_fit_mb"],
            n_ratio, feat_ratio, core_ratio))
    print("feat/N: feature seconds per image relative to N=%d (1.0 = linear); core/Nk: coreset seconds per "
          "N*k relative to N=%d (<= 1.0: no worse than N*k)" % (base["n_images"], base["n_images"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
