"""Pieces shared by every report writer: JSON result files (NaN/inf written as null), the one
markdown table formatter, matplotlib figures rendered off-screen (Agg backend) and saved as PNG,
and the one optimization-history plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import optuna

from ..manifest import atomic_write_bytes, make_output_dir
from ..results import json_safe, to_json


def write_json(path, result) -> Path:
    """Write ``result`` (a dict or typed result; :func:`~currsearch.results.to_json`) to ``path``
    as indented strict JSON (:func:`~currsearch.results.json_safe`: NaN as null), atomically
    (:func:`~currsearch.manifest.atomic_write_bytes`: a killed job leaves the old file or the new
    one, never half of one); returns the path.

    Raises:
        TypeError: a value with no JSON form (:func:`~currsearch.results.to_json`).
    """
    path = Path(path)
    atomic_write_bytes(path, json.dumps(json_safe(result), indent=1, allow_nan=False).encode())
    return path


def write_result_files(out_dir, name: str, result, markdown: str) -> list[Path]:
    """Create ``out_dir`` and write a report's ``NAME.json`` (:func:`write_json`: the whole result,
    NaN as null) and ``NAME.md`` (``markdown``), each atomically; returns ``[json path, md path]``."""
    out = make_output_dir(out_dir)
    paths = [write_json(out / f"{name}.json", result), out / f"{name}.md"]
    atomic_write_bytes(paths[1], markdown.encode())
    return paths


def fmt(x, spec: str = ".4f") -> str:
    """``format(x, spec)``, or ``"n/a"`` for None, NaN and infinities (markdown tables)."""
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a markdown table: ``header``, the ``|---|`` rule, then one line per row
    (cells already formatted, e.g. with :func:`fmt`)."""
    return [_row(header), _row(["---"] * len(header))] + [_row(r) for r in rows]


def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def pyplot():
    """``matplotlib.pyplot`` with the off-screen Agg backend selected (no display needed).

    Imported here, not at module level: the backend must be chosen before pyplot is first
    imported, and code that renders no figure should not pay for matplotlib."""
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


def history_plot(path, xs: Sequence[float], ys: Sequence[float], xlabel: str, ylabel: str, title: str,
                 point_label: str = "trial") -> Path:
    """The one history plot: values per trial/round as points with the best-so-far step line.

    Args:
        path: the PNG to write.
        xs, ys: trial numbers (or rounds) and their values, in order.
        xlabel, ylabel, title: axis labels (with units) and title.
        point_label: legend label of the points.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    plt = pyplot()
    run = [min(ys[: i + 1]) for i in range(len(ys))]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(xs, ys, s=8, alpha=0.5, label=point_label)
    ax.step(xs, run, where="post", color="C1", label="best so far")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def study_history_plot(path, study, ylabel: str, title: str, transform=None) -> Path | None:
    """:func:`~currsearch.reports.common.history_plot` of the complete trials of an Optuna study
    (first objective value, optionally transformed, e.g. ``math.exp``); None when none is complete."""
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not trials:
        return None
    ys = [t.values[0] if transform is None else transform(t.values[0]) for t in trials]
    return history_plot(path, [t.number for t in trials], ys, "trial number", ylabel, title)


__all__ = ["fmt", "history_plot", "json_safe", "markdown_table", "pyplot", "save_figure", "study_history_plot", "to_json", "write_json",
           "write_result_files"]
