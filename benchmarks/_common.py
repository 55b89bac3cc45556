"""Shared by the benchmark scripts: fit one model, time it and score it on an MVTec-layout test split."""

import copy
import json
import resource
import time

import torch

from skpatchad.features.preprocessing import iter_image_batches
from skpatchad.metrics import image_auroc, pixel_auroc, pro_score

# the trained networks a snapshot keeps (PatchSVDD has the encoder only)
_SNAPSHOT_MODULES = ("encoder_", "density_", "position_")


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


def snapshotting(estimator_class):
    """Subclass of a PatchSVDD/PEDENet class that copies its networks after the
    epochs in ``snapshot_epochs`` (with the elapsed training time) into ``snapshots_``."""

    class Snapshotting(estimator_class):
        def _after_epoch(self, epoch):
            if epoch in getattr(self, "snapshot_epochs", ()):
                states = {name: copy.deepcopy(getattr(self, name).state_dict())
                          for name in _SNAPSHOT_MODULES if getattr(self, name, None) is not None}
                self.snapshots_[epoch] = (self.training_curve_[-1]["seconds"], states)

        def _fit_images(self, images):
            self.snapshots_ = {}
            return super()._fit_images(images)

    Snapshotting.__name__ = "Snapshotting" + estimator_class.__name__
    return Snapshotting


def training_curve(model, train, test):
    """AUROC of each snapshot: the fitted model with those networks and a rebuilt bank."""
    data = torch.cat([b for _, b in iter_image_batches(train.images, model.geometry_, 16, "cpu")])
    data = model._centre(data)
    seed = model._fit_seed()
    rows = []
    for epoch, (seconds, states) in sorted(model.snapshots_.items()):
        snapshot = copy.deepcopy(model)
        for name, state in states.items():
            getattr(snapshot, name).load_state_dict(state)
        snapshot._fit_bank(data, seed)
        rows.append(dict(epoch=epoch, train_s=round(seconds, 1), **evaluate(snapshot, test)))
        print(json.dumps(dict(curve_point=rows[-1])), flush=True)
    return rows
