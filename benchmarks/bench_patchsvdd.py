"""PatchSVDD benchmark on an MVTec-AD-layout category (trained encoder and the paper's baselines).

Prints image AUROC, pixel AUROC, PRO, fit seconds, ms per image, peak memory,
and the training curve (losses against training time) for each variant. With
``--curve E1 E2 ...`` the trained encoder is also snapshotted after those
epochs and each snapshot is evaluated (feature bank rebuilt, full test split),
giving AUROC against training time from the one training run.

    python benchmarks/bench_patchsvdd.py --root ../shared/data/mvtec_ad --category bottle \\
        --encoders trained random raw --curve 10 20 30
"""

import argparse
import json
import os
import sys

import torch

from skpatchad import PatchSVDD
from skpatchad.datasets import load_mvtec

from _common import fit_and_evaluate, snapshotting, training_curve


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.path.join("..", "shared", "data", "mvtec_ad"))
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--encoders", nargs="+", default=["trained", "random", "raw"])
    parser.add_argument("--epochs", type=int, default=None, help="override the default schedule")
    parser.add_argument("--curve", type=int, nargs="*", default=[],
                        help="epochs after which the trained encoder is evaluated")
    parser.add_argument("--knn", default="exact")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--params", default="{}", help="extra PatchSVDD parameters as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train = load_mvtec(args.root, args.category, "train")
    test = load_mvtec(args.root, args.category, "test")
    for encoder in args.encoders:
        params = dict(encoder=encoder, random_state=args.seed, knn=args.knn, verbose=1, **json.loads(args.params))
        if args.epochs is not None:
            params["epochs"] = args.epochs
        model = snapshotting(PatchSVDD)(**params)
        model.snapshot_epochs = set(args.curve) if encoder == "trained" else set()
        row = dict(encoder=encoder, category=args.category, **fit_and_evaluate(model, train, test))
        print(json.dumps(row), flush=True)
        if model.snapshots_:
            curve = training_curve(model, train, test)
            print(json.dumps(dict(encoder=encoder, auroc_curve=curve)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
