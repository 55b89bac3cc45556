"""Shared by the benchmark scripts: fit one model, time it and score it on an MVTec-layout test split."""

import resource
import time

from skpatchad.metrics import image_auroc, pixel_auroc, pro_score


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def evaluate(model, test):
    """Image AUROC, pixel AUROC, PRO and ms per image of a fitted model on ``test``."""
    tic = time.perf_counter()
    normality, maps = model.score_samples_and_maps(test.images)
    infer_ms = 1000 * (time.perf_counter() - tic) / len(test.images)
    return dict(infer_ms=round(infer_ms, 1), image_auroc=round(image_auroc(test.labels, -normality), 4),
                pixel_auroc=round(pixel_auroc(test.masks, maps), 4), pro=round(pro_score(test.masks, maps), 4))


def fit_and_evaluate(model, train, test):
    """Fit on ``train.images``, score ``test``; returns a dict of metrics, timings and the training curve."""
    tic = time.perf_counter()
    model.fit(train.images)
    fit_s = time.perf_counter() - tic
    row = dict(fit_s=round(fit_s, 1), **evaluate(model, test))
    row.update(peak_rss_mb=round(peak_rss_mb()), params=model.get_params(),
               training_curve=[{k: round(float(v), 4) for k, v in c.items()}
                               for c in getattr(model, "training_curve_", [])])
    return row
