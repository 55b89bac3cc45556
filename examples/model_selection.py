"""Model selection: GridSearchCV over PatchCore's coreset ratio and patch size.

The embedded MVTec AD bottle sample's training images (all normal) and test
images (normal and anomalous, with masks) are pooled into one labelled set.
``GridSearchCV`` scores each parameter setting with the PRO scorer on
stratified folds; the estimator drops the anomalous images of every training
fold itself, so each fold and the final refit train on normal images only.
The best model is then saved with joblib, reloaded, and checked to predict
the same maps. Runs offline on a CPU in about a minute.

    python examples/model_selection.py [--n-jobs 2] [--output best_patchcore.joblib]
"""

import argparse
import os
import tempfile
import time

import joblib
import numpy as np
from sklearn.model_selection import GridSearchCV

from skpatchad import PatchCore
from skpatchad.datasets import load_sample
from skpatchad.metrics import pro_scorer
from skpatchad.model_selection import AnomalyStratifiedKFold


def pooled_sample():
    """Training and test images of the sample as one set, with masks as ``y``."""
    train, test = load_sample("train"), load_sample("test")
    images = np.concatenate([train.images, test.images])
    normal_masks = np.zeros((len(train.images),) + test.masks.shape[1:], test.masks.dtype)
    masks = np.concatenate([normal_masks, test.masks])
    return images, masks


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-jobs", type=int, default=1, help="parallel fits (joblib)")
    parser.add_argument("--output", default=None,
                        help="where to save the best model (default: a temporary file, removed afterwards)")
    args = parser.parse_args()

    images, masks = pooled_sample()
    labels = masks.reshape(len(masks), -1).any(1)
    print("pooled sample: %d images (%d anomalous), %dx%d"
          % (len(images), labels.sum(), *images.shape[1:3]))

    search = GridSearchCV(
        PatchCore(random_state=0),
        {"coreset": [0.01, 0.1], "patch_size": [1, 3]},
        scoring=pro_scorer,
        cv=AnomalyStratifiedKFold(3, random_state=0),  # both classes in every test fold
        n_jobs=args.n_jobs,
    )
    tic = time.perf_counter()
    search.fit(images, masks)  # masks as y: anomalous images never enter a memory bank
    print("grid search: %.1f s for %d fits" % (time.perf_counter() - tic, 4 * 3 + 1))
    for params, mean, std in zip(search.cv_results_["params"], search.cv_results_["mean_test_score"],
                                 search.cv_results_["std_test_score"]):
        print("  %-36s PRO %.3f +- %.3f" % (params, mean, std))
    print("best: %s (PRO %.3f); refit on the %d normal images"
          % (search.best_params_, search.best_score_, (~labels).sum()))

    model = search.best_estimator_
    path = args.output or os.path.join(tempfile.mkdtemp(), "best_patchcore.joblib")
    joblib.dump(model, path)
    reloaded = joblib.load(path)
    same = np.array_equal(model.predict_map(images[labels]), reloaded.predict_map(images[labels]))
    print("saved to %s (%.1f MB); reloaded model predicts identical maps: %s"
          % (path, os.path.getsize(path) / 2**20, same))
    if args.output is None:
        os.remove(path)
        os.rmdir(os.path.dirname(path))
    if not same:
        raise SystemExit("reloaded model differs")


if __name__ == "__main__":
    main()
