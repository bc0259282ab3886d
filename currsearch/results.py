"""One JSON form for every typed result (L0: no project imports).

:func:`to_json` turns a result (dataclasses, tensors, numpy arrays and scalars, tuples, paths)
into plain JSON-ready Python (dicts, lists, str, int, float, bool, None), keeping dict key
order and dataclass field order; :func:`json_safe` also replaces non-finite floats by None
(strict JSON), as :func:`currsearch.reports.common.write_json` writes them. Result classes read
their files back with their own ``from_json``.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from pathlib import PurePath

import numpy as np
import torch


def to_json(x):
    """``x`` as JSON-ready Python values, recursively.

    Dataclass instances become dicts of their fields (in field order), tensors and numpy arrays
    nested lists (``.tolist()``), numpy scalars Python numbers, tuples lists, paths strings and
    enums their values; dict keys are kept (they must already be strings). Non-finite floats
    are kept (see :func:`json_safe`).

    Raises:
        TypeError: a value with no JSON form (e.g. an Optuna study); the message names its type.
    """
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: to_json(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {k: to_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_json(v) for v in x]
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, PurePath):
        return str(x)
    if isinstance(x, enum.Enum):
        return to_json(x.value)
    raise TypeError(f"to_json: no JSON form for a {type(x).__name__}")


def json_safe(x):
    """``to_json(x)`` with every non-finite float (NaN, +-inf) replaced by ``None``, so
    ``json.dumps(..., allow_nan=False)`` writes strict JSON (null for a metric that is undefined)."""
    x = to_json(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [json_safe(v) for v in x]
    return x
