"""Exact 1-NN search over raw image patches: PCA-pruned search against brute force.

PatchSVDD's raw-patch baseline (``encoder="raw"``) searches 3,072-d (32x32x3)
and 12,288-d (64x64x3) patches. This script builds such a bank from every
``--every``-th training image of an MVTec-layout category, takes the patches of
``--queries`` test images as queries, and times the pruned search
(``NearestNeighbors(pruning_dim=64)``, the one PatchSVDD uses) against brute
force in the same run, checking that both give the same distances.

    python benchmarks/bench_raw_search.py --root ../shared/data/mvtec_ad --category bottle
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from skpatchad.datasets import load_mvtec
from skpatchad.features.knn import NearestNeighbors
from skpatchad.features.preprocessing import ImageGeometry, iter_image_batches

_SCALES = {32: 4, 64: 16}  # patch -> stride, as PatchSVDD's defaults


def _patches(images, patch, stride):
    batch = torch.cat([b for _, b in iter_image_batches(images, ImageGeometry(256), 16, "cpu")]) - 0.5
    return F.unfold(batch, patch, stride=stride).transpose(1, 2).reshape(-1, 3 * patch * patch).contiguous()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.path.join("..", "shared", "data", "mvtec_ad"))
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--every", type=int, default=4, help="bank from every n-th training image")
    parser.add_argument("--queries", type=int, default=2, help="test images whose patches are the queries")
    parser.add_argument("--patch", type=int, nargs="+", default=[32, 64], choices=sorted(_SCALES))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train = load_mvtec(args.root, args.category, "train")
    test = load_mvtec(args.root, args.category, "test")
    spread = max(1, len(test.images) // args.queries)
    query_images = test.images[::spread][:args.queries]
    for patch in args.patch:
        bank = _patches(train.images[::args.every], patch, _SCALES[patch])
        queries = _patches(query_images, patch, _SCALES[patch])
        tic = time.perf_counter()
        pruned = NearestNeighbors("exact", pruning_dim=64, random_state=0).fit(bank)
        fit_s = time.perf_counter() - tic
        tic = time.perf_counter()
        distance, _ = pruned.kneighbors(queries, 1)
        pruned_s = time.perf_counter() - tic
        brute = NearestNeighbors("exact").fit(bank)
        tic = time.perf_counter()
        reference, _ = brute.kneighbors(queries, 1)
        brute_s = time.perf_counter() - tic
        # brute force's |q|^2 - 2 q.b + |b|^2 rounds near-zero distances up; compare squared distances
        error = (distance[:, 0] ** 2 - reference[:, 0] ** 2).abs() / (queries * queries).sum(1)
        print(json.dumps(dict(
            patch=patch, bank=len(bank), dim=bank.shape[1], queries=len(queries), threads=args.threads,
            pruning_fit_s=round(fit_s, 1), pruned_s=round(pruned_s, 1), brute_s=round(brute_s, 1),
            speedup=round(brute_s / pruned_s, 2), max_sq_error_over_q_sq=float(error.max()))), flush=True)


if __name__ == "__main__":
    sys.exit(main())
