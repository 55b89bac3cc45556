"""Device resolution, device-free pickling and seeded torch RNG, shared by all estimators."""

import copy
import warnings
from contextlib import contextmanager

import torch


@contextmanager
def seeded_cpu_rng(seed):
    """Run the block with torch's global CPU generator seeded by ``seed``, then restore it.

    Weight initialisation (and torch ops without an explicit generator) draw
    from the global generator; seeding it for the block makes a fit depend on
    ``random_state`` alone, and restoring it afterwards leaves the user's own
    torch random stream exactly where it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(seed) % 2**63)
        yield


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


def _to_cpu(value):
    if isinstance(value, torch.nn.Module):
        on_gpu = any(t.is_cuda for t in list(value.parameters()) + list(value.buffers()))
        return copy.deepcopy(value).cpu() if on_gpu else value  # never move the live model
    if isinstance(value, torch.Tensor):
        return value.cpu()
    return value


def cpu_state(state):
    """Copy of a ``__getstate__`` dict with CUDA modules/tensors moved to CPU.

    A model fitted on a GPU must unpickle on a CPU-only machine.
    """
    return {key: _to_cpu(value) for key, value in state.items()}


class TorchImageEstimatorMixin:
    """Shared by our torch-backed sklearn estimators and transformers.

    Pickles without CUDA state and declares image input (N, H, W[, C]) to
    scikit-learn's tag system.
    """

    def __getstate__(self):
        return cpu_state(super().__getstate__())

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        return tags
