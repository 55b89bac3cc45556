"""PEDENet benchmark on an MVTec-AD-layout category.

Prints image AUROC, pixel AUROC, PRO, fit seconds, ms per image, peak memory,
the number of parameters and the training curve (loss terms against training
time) for each patch score (nearest-neighbour distance, GMM energy). With
``--curve E1 E2 ...`` the networks are also snapshotted after those epochs and
each snapshot is evaluated (bank and mixture rebuilt, full test split).

    python benchmarks/bench_pedenet.py --root ../shared/data/mvtec_ad --category bottle --scores nn energy
"""

import argparse
import json
import os
import sys

import torch

from skpatchad import PEDENet
from skpatchad.datasets import load_mvtec

from _common import fit_and_evaluate, snapshotting, training_curve


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.path.join("..", "shared", "data", "mvtec_ad"))
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--scores", nargs="+", default=["nn"], choices=["nn", "energy"])
    parser.add_argument("--epochs", type=int, default=None, help="override the default schedule")
    parser.add_argument("--curve", type=int, nargs="*", default=[],
                        help="epochs after which the networks are evaluated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--params", default="{}", help="extra PEDENet parameters as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train = load_mvtec(args.root, args.category, "train")
    test = load_mvtec(args.root, args.category, "test")
    for score in args.scores:
        params = dict(score=score, random_state=args.seed, verbose=1, **json.loads(args.params))
        if args.epochs is not None:
            params["epochs"] = args.epochs
        model = snapshotting(PEDENet)(**params)
        model.snapshot_epochs = set(args.curve)
        row = dict(score=score, category=args.category, **fit_and_evaluate(model, train, test))
        row["n_parameters"] = model.n_parameters_
        print(json.dumps(row), flush=True)
        if model.snapshots_:
            curve = training_curve(model, train, test)
            print(json.dumps(dict(score=score, auroc_curve=curve)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
