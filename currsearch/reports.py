"""Report files shared by every report writer: JSON results with NaN/inf written as null, and
matplotlib figures rendered off-screen (Agg backend) and saved as PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path


def json_safe(x):
    """``x`` with every non-finite float (NaN, +-inf) replaced by ``None``, recursively through
    dicts, lists and tuples (tuples become lists), so ``json.dumps(..., allow_nan=False)`` writes
    strict JSON (null for a metric that is undefined)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def write_json(path, result) -> Path:
    """Write ``result`` to ``path`` as indented strict JSON (:func:`json_safe`: NaN as null); returns the path.

    Raises:
        TypeError: a value JSON cannot represent (e.g. a tensor; convert with ``.tolist()``).
    """
    path = Path(path)
    path.write_text(json.dumps(json_safe(result), indent=1, allow_nan=False))
    return path


def write_result_files(out_dir, name: str, result: dict, markdown: str) -> list[Path]:
    """Create ``out_dir`` and write a report's ``NAME.json`` (:func:`write_json`: the whole result,
    NaN as null) and ``NAME.md`` (``markdown``); returns ``[json path, md path]``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [write_json(out / f"{name}.json", result), out / f"{name}.md"]
    paths[1].write_text(markdown)
    return paths


def fmt(x, spec: str = ".4f") -> str:
    """``format(x, spec)``, or ``"n/a"`` for None, NaN and infinities (markdown tables)."""
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def pyplot():
    """``matplotlib.pyplot`` with the off-screen Agg backend selected (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, dpi: int = 100) -> Path:
    """Save a figure as PNG and close it; returns ``path`` as a :class:`~pathlib.Path`.

    A figure made without a layout engine is laid out with ``tight_layout`` first; one made with
    one (e.g. ``layout="constrained"``) keeps it.

    Args:
        fig: a matplotlib Figure.
        path: the file to write (its folder must exist).
        dpi: resolution in dots per inch.
    """
    import matplotlib.pyplot as plt

    path = Path(path)
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
