"""PatchCore benchmark on an MVTec-AD-layout category.

Reports image AUROC, pixel AUROC (at the original resolution), PRO, fit time
(feature extraction, coreset, calibration), inference ms per image, peak
memory, and -- measured in the same run, on the same images and threads -- the
backbone-only forward time (resize + network to the deepest used layer) as the
floor that inference is compared against.

    python benchmarks/bench_patchcore.py --root ../shared/data/mvtec_ad --category bottle \
        --coreset 0.01 0.1 --backbone efficientnet_lite0 --seeds 0 1 2

Each (coreset, seed) runs in its own process so that peak memory (max RSS,
taken before the metrics are computed) belongs to that configuration. Images
are loaded as arrays before ``fit`` (not timed) unless ``--from-files``, which
passes the file paths and lets the estimator decode them batch by batch
(decoding is then inside the timings and the memory stays low).
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

from skpatchad import PatchCore
from skpatchad.datasets import load_mvtec
from skpatchad.features.preprocessing import iter_image_batches
from skpatchad.metrics import image_auroc, pixel_auroc, pro_score
from skpatchad.utils import check_images


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def backbone_floor_ms(model, images, repeats=1):
    """Resize + backbone forward only, per image, with the fitted model's settings."""
    images = check_images(images)
    best = np.inf
    with torch.inference_mode():
        for _ in range(repeats):
            tic = time.perf_counter()
            for _, batch in iter_image_batches(images, model.geometry_, model.batch_size, model.device_):
                model.backbone_(batch)
            best = min(best, time.perf_counter() - tic)
    return 1000.0 * best / len(images)


def run_one(args, coreset, seed):
    """One configuration, in this process; returns the result row."""
    torch.set_num_threads(args.threads)
    tic = time.perf_counter()
    train = load_mvtec(args.root, args.category, "train")
    test = load_mvtec(args.root, args.category, "test")
    load_s = time.perf_counter() - tic
    X_train, X_test = (train.filenames, test.filenames) if args.from_files else (train.images, test.images)
    if args.from_files:
        train.pop("images"), test.pop("images")  # the estimator reads the files batch by batch
    model = PatchCore(backbone=args.backbone, weights=args.weights, coreset=coreset,
                      image_size=args.image_size, crop_size=args.crop_size,
                      batch_size=args.batch_size, random_state=seed, device=args.device,
                      precision=args.precision)
    rss_before = peak_rss_mb()
    tic = time.perf_counter()
    model.fit(X_train)
    fit_s = time.perf_counter() - tic
    model.score_samples_and_maps(X_test[:2])  # warm-up: one-off allocations do not count
    tic = time.perf_counter()
    normality, maps = model.score_samples_and_maps(X_test)
    infer_ms = 1000.0 * (time.perf_counter() - tic) / len(X_test)
    peak = peak_rss_mb()  # before the metrics, which are not part of the model
    floor_ms = backbone_floor_ms(model, X_test)
    return dict(
        category=args.category, backbone=args.backbone, weights=str(args.weights), coreset=coreset,
        precision=args.precision,
        seed=seed, image_size=args.image_size, from_files=bool(args.from_files), bank=len(model.memory_bank_),
        image_auroc=image_auroc(test.labels, -normality), pixel_auroc=pixel_auroc(test.masks, maps),
        pro=pro_score(test.masks, maps), fit_s=fit_s, features_s=model.fit_times_["features"],
        coreset_s=model.fit_times_["coreset"], calibration_s=model.fit_times_["calibration"],
        bank_s=model.fit_times_["bank"],
        infer_ms=infer_ms, backbone_ms=floor_ms, infer_over_backbone=infer_ms / floor_ms,
        peak_rss_mb=peak, rss_before_fit_mb=rss_before, load_s=load_s, threads=args.threads,
    )


def run(args, argv):
    """Each configuration in a fresh process, so peak memory and compile costs are its own."""
    rows = []
    for coreset in args.coreset:
        for seed in args.seeds:
            command = [sys.executable, os.path.abspath(__file__)] + list(argv) + [
                "--worker", "--coreset", str(coreset), "--seeds", str(seed)]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                sys.stderr.write(result.stdout + result.stderr)
                raise SystemExit("configuration coreset=%g seed=%d failed" % (coreset, seed))
            row = json.loads(result.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.path.join("..", "shared", "data", "mvtec_ad"))
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="DEFAULT")
    parser.add_argument("--coreset", type=float, nargs="+", default=[0.01, 0.1])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--crop-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="random_state values")
    parser.add_argument("--from-files", action="store_true",
                        help="pass image file paths (decoded batch by batch) instead of arrays")
    parser.add_argument("--output", help="append the rows as JSON lines to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.weights == "none":
        args.weights = None
    if args.worker:
        print(json.dumps(run_one(args, args.coreset[0], args.seeds[0])))
        return 0
    rows = run(args, [a for a in argv if a != "--worker"])
    if args.output:
        with open(args.output, "a") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    print("\n%-8s %-4s %-7s %-6s %-6s %-6s %-7s %-7s %-7s %-8s %-8s %-6s %-7s" % (
        "coreset", "seed", "imgAUC", "pxAUC", "PRO", "fit_s", "feat_s", "core_s", "calib_s", "ms/img", "bb_ms", "ratio", "peakMB"))
    for r in rows:
        print("%-8g %-4d %-7.4f %-6.3f %-6.3f %-6.1f %-7.1f %-7.1f %-7.1f %-8.1f %-8.1f %-6.2f %-7.0f" % (
            r["coreset"], r["seed"], r["image_auroc"], r["pixel_auroc"], r["pro"], r["fit_s"], r["features_s"],
            r["coreset_s"], r["calibration_s"], r["infer_ms"], r["backbone_ms"], r["infer_over_backbone"],
            r["peak_rss_mb"]))


if __name__ == "__main__":
    sys.exit(main())
