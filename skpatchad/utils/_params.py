"""Checks of scalar estimator parameters, shared by the estimators and transformers (torch-free)."""

import numbers

import numpy as np


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(value)


def check_int_param(name, value, minimum=1, allow_none=False):
    """Raise a ValueError naming ``name`` unless ``value`` is an integer >= ``minimum``.

    Python and numpy integers pass; booleans, floats (even ``8.0``, which
    would only fail later as a slice bound or a tensor size) and strings do not.
    """
    if allow_none and value is None:
        return
    if not (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum):
        kind = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, "an integer >= %d" % minimum)
        raise ValueError("%s must be %s%s, got %r" % (name, kind, " or None" if allow_none else "", value))


def check_int_choice(name, value, choices):
    """Raise a ValueError naming ``name`` unless ``value`` is an integer (not a float such as 64.0) in ``choices``."""
    if not (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value in choices):
        raise ValueError("%s must be one of %s, got %r" % (name, tuple(choices), value))


def check_real_param(name, value, low, high=None, low_inclusive=True, allow_none=False):
    """Raise a ValueError naming ``name`` unless ``value`` is a real number in the given range.

    Any numpy float (e.g. ``np.float32`` values of a search grid) passes;
    booleans, NaN and strings do not.
    """
    if allow_none and value is None:
        return
    ok = _is_real(value) and (value >= low if low_inclusive else value > low) and (high is None or value <= high)
    if not ok:
        interval = "%s%g, %s" % ("[" if low_inclusive else "(", low, "inf)" if high is None else "%g]" % high)
        raise ValueError("%s must be a number in %s%s, got %r"
                         % (name, interval, " or None" if allow_none else "", value))


def check_bool_param(name, value):
    """Raise a ValueError naming ``name`` unless ``value`` is a boolean (Python or numpy).

    A string such as ``"no"`` or ``"False"`` is truthy and would silently mean True.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError("%s must be True or False, got %r" % (name, value))
