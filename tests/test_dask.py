"""Model selection on a Dask cluster through joblib's "dask" backend.

The tests start a local dask.distributed cluster of two worker processes
(loopback only), run ``GridSearchCV`` / ``cross_validate`` with
``joblib.parallel_backend("dask")`` and check that the results equal a
sequential in-process run, that the fits and scorings really ran in the
worker processes, and that fitted estimators travel to the workers by pickle.
"""

import os
import pickle
import sys
import warnings

import joblib
import numpy as np
import pytest
import torch
from sklearn.model_selection import GridSearchCV, cross_validate

from skpatchad import PatchCore
from skpatchad.metrics import image_auroc_scorer, pro_scorer
from skpatchad.model_selection import AnomalyStratifiedKFold

distributed = pytest.importorskip("distributed")
cloudpickle = pytest.importorskip("cloudpickle")

# The helpers below are sent to the workers. Pickled by reference they would
# need ``import test_dask`` to work there, which depends on how pytest set up
# sys.path; by value they need nothing but skpatchad and its dependencies.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

# Small and fast: 64-pixel inputs, 2 training-only normal images plus the
# 16 test images of the embedded sample (6 normal, 10 anomalous).
PARAMS = dict(image_size=64, coreset=0.25, random_state=0, batch_size=32)


def _pid_scorer(estimator, X, y):
    """A "score" that records which process scored the fold."""
    return float(os.getpid())


def _refuse_downloads():
    """Runs on each worker: any download fails loudly instead of happening.

    The Lite0 weights must come from the installed package, never from a
    per-worker download. Connections to loopback addresses (the scheduler and
    the other worker) and Unix sockets stay allowed.
    """
    import ipaddress
    import socket

    import torch.hub

    def refuse(*args, **kwargs):
        raise OSError("downloads are disabled on this test's dask workers")

    def is_loopback(host):
        if host is None or host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:  # a host name: not even a DNS lookup
            return False

    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect_loopback_only(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not is_loopback(address[0]):
            refuse()
        return connect(sock, address)

    def getaddrinfo_loopback_only(host, *args, **kwargs):
        if not is_loopback(host.decode() if isinstance(host, bytes) else host):
            refuse()
        return getaddrinfo(host, *args, **kwargs)

    socket.socket.connect = connect_loopback_only
    socket.getaddrinfo = getaddrinfo_loopback_only
    # torchvision binds torch.hub.load_state_dict_from_url at import, but that
    # function looks download_url_to_file up in torch.hub at each call.
    torch.hub.load_state_dict_from_url = refuse
    torch.hub.download_url_to_file = refuse


def _maps_and_warnings(model, X):
    """Runs on a worker: the maps of an unpickled model and the warnings raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        maps = model.predict_map(X)
    return maps, [str(w.message) for w in caught]


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
    ) as cluster, distributed.Client(cluster) as client:
        # One torch thread per worker: two single-threaded worker processes
        # already use both cores of a 2-core machine, and more threads would
        # oversubscribe them. Dask's nanny sets OMP_NUM_THREADS=1 for its
        # workers, but torch's setting is made explicit and checked here. It
        # also makes each fold's arithmetic the same as in the sequential
        # reference run (done with one thread too), hence exact comparisons.
        client.run(torch.set_num_threads, 1)
        assert set(client.run(torch.get_num_threads).values()) == {1}
        client.run(_refuse_downloads)
        yield client


@pytest.fixture(scope="module")
def mixed(sample):
    """Normal and anomalous images with their masks (all 224x224)."""
    train, test = sample
    X = list(train.images[:2]) + list(test.images)
    masks = [np.zeros((224, 224), np.uint8)] * 2 + list(test.masks)
    return X, masks


def _worker_pids(client):
    return set(client.run(os.getpid).values())


def test_grid_search_on_dask_equals_sequential(client, mixed, one_torch_thread):
    X, masks = mixed

    def search(n_jobs):
        return GridSearchCV(
            PatchCore(**PARAMS),
            {"patch_size": [1, 3], "coreset": [0.1, 0.25]},
            scoring={"pro": pro_scorer, "pid": _pid_scorer},
            refit="pro",
            cv=AnomalyStratifiedKFold(2, random_state=0),
            n_jobs=n_jobs,
            error_score="raise",
        )

    sequential = search(1).fit(X, masks)
    with distributed.get_task_stream(client) as tasks, joblib.parallel_backend("dask"):
        on_dask = search(-1).fit(X, masks)

    for key in ["mean_test_pro", "std_test_pro"] + ["split%d_test_pro" % i for i in range(2)]:
        np.testing.assert_array_equal(on_dask.cv_results_[key], sequential.cv_results_[key], err_msg=key)
    assert np.isfinite(on_dask.cv_results_["mean_test_pro"]).all()
    assert on_dask.best_params_ == sequential.best_params_

    # Every fold was fitted and scored in a worker process, none in this one
    # (a silent fallback to a local backend would record this process's id or
    # those of local loky workers) ...
    pids = {pid for key in ("split0_test_pid", "split1_test_pid") for pid in on_dask.cv_results_[key]}
    assert pids <= {float(pid) for pid in _worker_pids(client)}
    assert float(os.getpid()) not in pids
    assert set(sequential.cv_results_["split0_test_pid"]) == {float(os.getpid())}
    # ... and the scheduler saw the tasks run on its workers.
    assert tasks.data, "no task ran on the dask cluster"
    assert {task["worker"] for task in tasks.data} <= set(client.scheduler_info()["workers"])


def test_cross_validate_on_dask_equals_sequential(client, mixed, one_torch_thread):
    X, masks = mixed
    labels = np.array([int(mask.any()) for mask in masks])
    kwargs = dict(
        scoring={"image_auroc": image_auroc_scorer, "pid": _pid_scorer},
        cv=AnomalyStratifiedKFold(3, random_state=0),
        error_score="raise",
    )
    sequential = cross_validate(PatchCore(**PARAMS), X, labels, n_jobs=1, **kwargs)
    with joblib.parallel_backend("dask"):
        on_dask = cross_validate(PatchCore(**PARAMS), X, labels, n_jobs=-1, **kwargs)

    np.testing.assert_array_equal(on_dask["test_image_auroc"], sequential["test_image_auroc"])
    assert np.isfinite(on_dask["test_image_auroc"]).all()
    assert set(on_dask["test_pid"]) <= {float(pid) for pid in _worker_pids(client)}
    assert float(os.getpid()) not in set(on_dask["test_pid"])


def test_workers_refuse_downloads(client):
    """The fixture's tripwire is in place, so the tests above would fail on a download."""

    def check():
        import socket

        import torch.hub

        installed = (socket.socket.connect.__name__, socket.getaddrinfo.__name__,
                     torch.hub.download_url_to_file.__name__)
        if installed != ("connect_loopback_only", "getaddrinfo_loopback_only", "refuse"):
            return installed  # never call the real functions: that could reach the network
        messages = []
        for attempt in (
            lambda: torch.hub.download_url_to_file("https://example.invalid/w.pth", os.devnull),
            lambda: socket.getaddrinfo("example.invalid", 443),
        ):
            try:
                attempt()
            except OSError as exc:
                messages.append(str(exc))
        return messages

    for result in client.run(check).values():
        assert result == ["downloads are disabled on this test's dask workers"] * 2


def test_fitted_model_ships_to_a_worker_by_pickle(client, sample, one_torch_thread):
    train, test = sample
    model = PatchCore(**PARAMS).fit(train.images[:6])
    expected = model.predict_map(test.images[:4])
    maps = client.submit(lambda m, X: m.predict_map(X), model, test.images[:4]).result()
    np.testing.assert_array_equal(maps, expected)  # bit-identical on CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="simulates CPU-only workers")
def test_model_fitted_on_cuda_runs_on_cpu_workers(client, sample, one_torch_thread):
    train, test = sample
    model = PatchCore(**PARAMS).fit(train.images[:6])
    expected = model.predict_map(test.images[:2])
    moved = pickle.loads(pickle.dumps(model))
    moved.device_ = torch.device("cuda")  # as recorded by a fit on a GPU
    moved.nn_index_.device = torch.device("cuda")
    maps, messages = client.submit(_maps_and_warnings, moved, test.images[:2]).result()
    assert any("not available here; running on CPU" in message for message in messages)
    np.testing.assert_array_equal(maps, expected)
