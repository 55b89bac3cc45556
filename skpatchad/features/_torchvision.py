"""Import ``torchvision.models`` even when torchvision's compiled ops cannot load.

PyPI's torchvision wheels are CUDA builds. Next to a CPU-only torch their C++
extension does not register the detection operators, and ``import torchvision``
dies in ``torchvision/_meta_registrations.py`` with ``RuntimeError: operator
torchvision::nms does not exist``: it attaches fake (meta) kernels to operators
that were never defined. We only need the pure-Python model definitions, so on
that error we *define the missing operator schemas ourselves* (schemas only, no
kernels), drop the half-imported modules and import again. The model zoo then
works normally; only the detection ops (nms, roi_align, ...) stay unusable,
which skpatchad never calls.
"""

import importlib
import re
import sys

import torch

# Schemas of the operators torchvision registers fake kernels for at import.
_KNOWN_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_MISSING_OP = re.compile(r"operator torchvision::(\w+) does not exist")
_fallback_library = None  # must stay referenced or the definitions vanish


def _define_missing_operator(name):
    global _fallback_library
    if name not in _KNOWN_SCHEMAS:
        return False
    if _fallback_library is None:
        _fallback_library = torch.library.Library("torchvision", "FRAGMENT")
    _fallback_library.define(_KNOWN_SCHEMAS[name])
    return True


def import_torchvision():
    """Return the ``torchvision`` module, working around missing compiled ops."""
    for _ in range(len(_KNOWN_SCHEMAS) + 1):
        try:
            return importlib.import_module("torchvision")
        except RuntimeError as exc:
            match = _MISSING_OP.search(str(exc))
            for module_name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
                del sys.modules[module_name]
            if match is None or not _define_missing_operator(match.group(1)):
                raise ImportError(
                    "torchvision failed to import (%s). Install a torchvision build "
                    "that matches your torch, e.g. torch==2.13.0 with torchvision==0.28.0." % exc
                ) from exc
    raise ImportError("torchvision failed to import after defining its missing operators")


def torchvision_models():
    """Return ``torchvision.models``."""
    return import_torchvision().models
