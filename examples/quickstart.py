"""Quickstart: PatchCore on the embedded MVTec AD bottle sample.

Fits on normal images only, scores the test images, prints image AUROC,
pixel AUROC and PRO, and writes a PNG figure (images, ground truth, anomaly
map overlays). Runs offline on a CPU in well under a minute.

    python examples/quickstart.py [--output quickstart.png]
"""

import argparse
import time

import numpy as np

from skpatchad import PatchCore
from skpatchad.datasets import load_sample
from skpatchad.metrics import image_auroc, pixel_auroc, pro_score
from skpatchad.visualization import overlay, save_grid


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="quickstart.png", help="figure path (PNG)")
    args = parser.parse_args()

    train, test = load_sample("train"), load_sample("test")
    print("embedded sample: %d normal training images, %d test images (%d anomalous), %dx%d"
          % (len(train.images), len(test.images), test.labels.sum(), *test.images.shape[1:3]))

    model = PatchCore(backbone="efficientnet_lite0", coreset=0.1, random_state=0)
    tic = time.perf_counter()
    model.fit(train.images)
    print("fit: %.1f s (memory bank: %d patches)" % (time.perf_counter() - tic, len(model.memory_bank_)))

    tic = time.perf_counter()
    normality, maps = model.score_samples_and_maps(test.images)
    elapsed = time.perf_counter() - tic
    print("inference: %.1f ms per image" % (1000 * elapsed / len(test.images)))

    print("image AUROC: %.3f" % image_auroc(test.labels, -normality))
    print("pixel AUROC: %.3f" % pixel_auroc(test.masks, maps))
    print("PRO (FPR <= 0.3): %.3f" % pro_score(test.masks, maps))
    predicted = model.predict(test.images)
    print("predicted anomalous: %d of %d (true: %d)" % ((predicted == -1).sum(), len(predicted), test.labels.sum()))

    # One row per image: input, ground truth, anomaly-map overlay (shared colour scale).
    chosen = list(np.flatnonzero(test.labels == 1)[:4]) + list(np.flatnonzero(test.labels == 0)[:2])
    vmin, vmax = float(np.min(maps)), float(np.max(maps))
    rows = [[test.images[i], test.masks[i] * 255, overlay(test.images[i], maps[i], 0.5, vmin, vmax)]
            for i in chosen]
    save_grid(args.output, rows)
    print("figure written to %s (rows: 4 anomalous, 2 normal; columns: image, ground truth, map)" % args.output)


if __name__ == "__main__":
    main()
