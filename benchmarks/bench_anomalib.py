"""anomalib's PatchCore and ours, timed in the same process on the same images.

The issue's anomalib figures (fit 124 s, 128 ms per image with
wide_resnet50_2) were measured on another machine; this script measures
anomalib here, next to skpatchad, so the comparison is not across hardware.

anomalib is not a dependency of skpatchad. Install both in a separate
environment, with the constraints file so pip fetches no CUDA wheels::

    python3 -m venv /tmp/ano
    /tmp/ano/bin/pip install -c requirements/cpu.txt -e . anomalib
    TQDM_DISABLE=1 /tmp/ano/bin/python benchmarks/bench_anomalib.py --threads 2

(skpatchad's own dependencies matter: without numba, which comes with
pynndescent, its coreset falls back to a plain loop 90x slower.)

anomalib's torch model (``PatchcoreModel``) is driven directly, without
Lightning: training-mode forwards collect embeddings, ``subsample_embedding``
runs its greedy coreset, eval-mode forwards return scores and maps. Both get
the same decoded 900x900 images, resized to 256 and centre-cropped to 224
(anomalib's default transform) by skpatchad's resize path, and both maps are
brought back to the original size, so the times cover the same work. Random
weights: the two libraries initialise wide_resnet50_2 differently (timm and
torchvision), so AUROCs are printed for completeness, not compared.
"""

import argparse
import os
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/_common.py

from _common import evaluate  # noqa: E402
from skpatchad import PatchCore  # noqa: E402
from skpatchad.datasets import load_mvtec  # noqa: E402
from skpatchad.features._torchvision import import_torchvision  # noqa: E402
from skpatchad.features.preprocessing import ImageGeometry, iter_image_batches  # noqa: E402
from skpatchad.metrics import image_auroc, pixel_auroc, pro_score  # noqa: E402
from skpatchad.utils import check_images  # noqa: E402


def anomalib_patchcore(train, test, coreset, batch_size, geometry):
    # anomalib imports torchvision at module level; skpatchad's import defines
    # the operator schemas a CUDA torchvision wheel lacks next to CPU torch.
    import_torchvision()
    try:
        from anomalib.models.image.patchcore.torch_model import PatchcoreModel
    except ImportError as exc:
        raise SystemExit("anomalib is not installed here (%s); see this script's docstring" % exc)

    model = PatchcoreModel(layers=["layer2", "layer3"], backbone="wide_resnet50_2", pre_trained=False)
    images_train, images_test = check_images(train.images), check_images(test.images)
    # anomalib's pre-processor normalises with ImageNet statistics before the model
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    tic = time.perf_counter()
    model.train()
    with torch.no_grad():
        for _, batch in iter_image_batches(images_train, geometry, batch_size, torch.device("cpu")):
            model((batch - mean) / std)
    features_s = time.perf_counter() - tic
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.subsample_embedding(coreset)
    fit_s = time.perf_counter() - tic
    model.eval()
    scores, maps = [], []

    def infer(images):
        with torch.no_grad():
            # MVTec images of one category share a size: one interpolation per batch
            for start, batch in iter_image_batches(images, geometry, batch_size, torch.device("cpu")):
                out = model((batch - mean) / std)
                scores.append(out.pred_score.reshape(-1))
                maps.append(F.interpolate(out.anomaly_map, size=images[start].shape[:2], mode="bilinear")[:, 0])

    infer(images_test[:2])  # warm-up, as for ours
    scores.clear(), maps.clear()
    tic = time.perf_counter()
    infer(images_test)
    infer_ms = 1000.0 * (time.perf_counter() - tic) / len(images_test)
    anomaly = torch.cat(scores).numpy()
    maps = torch.cat(maps).numpy()
    return dict(fit_s=fit_s, features_s=features_s, coreset_s=fit_s - features_s, infer_ms=infer_ms,
                bank=len(model.memory_bank), image_auroc=image_auroc(test.labels, anomaly),
                pixel_auroc=pixel_auroc(test.masks, maps), pro=pro_score(test.masks, maps))


def ours(train, test, coreset, batch_size, seed):
    model = PatchCore(backbone="wide_resnet50_2", weights=None, coreset=coreset, crop_size=224,
                      batch_size=batch_size, random_state=seed)
    tic = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(train.images)
    fit_s = time.perf_counter() - tic
    model.score_samples_and_maps(test.images[:2])  # warm-up, as for anomalib
    return dict(fit_s=fit_s, features_s=model.fit_times_["features"], coreset_s=model.fit_times_["coreset"],
                bank=len(model.memory_bank_), **evaluate(model, test))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.path.join("..", "shared", "data", "mvtec_ad"))
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--coreset", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--anomalib-batch-size", type=int, default=32, help="anomalib's default")
    parser.add_argument("--batch-size", type=int, default=8, help="skpatchad's default")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train = load_mvtec(args.root, args.category, "train")
    test = load_mvtec(args.root, args.category, "test")
    rows = {
        "anomalib": anomalib_patchcore(train, test, args.coreset, args.anomalib_batch_size,
                                       ImageGeometry(256, 224)),
        "skpatchad": ours(train, test, args.coreset, args.batch_size, args.seed),
    }
    print("%-10s %7s %7s %7s %8s %8s %8s %7s %6s" % ("library", "imgAUC", "pxAUC", "PRO", "fit_s", "feat_s",
                                                   "core_s", "ms/img", "bank"))
    for name, r in rows.items():
        print("%-10s %7.4f %7.4f %7.4f %8.1f %8.1f %8.1f %7.1f %6d" % (
            name, r["image_auroc"], r["pixel_auroc"], r["pro"], r["fit_s"], r["features_s"], r["coreset_s"],
            r["infer_ms"], r["bank"]))
    a, o = rows["anomalib"], rows["skpatchad"]
    print("skpatchad / anomalib: fit %.2fx, inference %.2fx" % (o["fit_s"] / a["fit_s"], o["infer_ms"] / a["infer_ms"]))


if __name__ == "__main__":
    main()
