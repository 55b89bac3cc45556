"""Device resolution shared by all estimators."""

import warnings

import torch


def resolve_device(device):
    """Turn ``"auto"``/``"cpu"``/``"cuda[:i]"``/``torch.device`` into a torch.device.

    Called in ``fit`` (never in ``__init__``), so a cloned or unpickled estimator
    re-resolves on the machine it runs on.
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError("device must be 'auto', 'cpu', 'cuda' or 'cuda:<i>', got %r" % (device,)) from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=%r was requested but CUDA is not available on this machine" % (device,))
    return resolved


def runtime_device(fitted_device):
    """Device to run a fitted model on: its fit device, or CPU if that is gone.

    A model fitted on a GPU and unpickled on a CPU-only machine keeps working.
    """
    device = torch.device(fitted_device)
    if device.type == "cuda" and not torch.cuda.is_available():
        warnings.warn("model was fitted on %s, which is not available here; running on CPU" % device)
        return torch.device("cpu")
    return device
