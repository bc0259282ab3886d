"""The position-analysis report (``positions.json``, ``positions.md``, heatmaps, curves) of a
:class:`~currsearch.positions.PositionResult` (arXiv 2505.22042, memorization vs position)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np

from ..positions import QUANTITIES, PositionResult
from .common import fmt, markdown_table, pyplot, save_figure, write_result_files

_LABELS = {"memorization": "loss on B_i (memorization)", "generalization_all": "eval loss, all",
           "generalization_domain": "eval loss, B_i's domain"}


def _fmt(x, spec: str = "+.4f") -> str:
    return fmt(x, spec)


def render_markdown(result: PositionResult) -> str:
    """The ``positions.md`` summary. Every number it quotes is a value of ``result`` (as
    written to ``positions.json``), formatted; definitions are in code spans."""
    s, v = result.summary, result.validation
    rec, fo, it = s["recency"], s["forgetting"], s["interference"]
    pos = result.positions
    lines = [
        "# Memorization and generalization versus sample position", "",
        f"Estimator `{result.estimator}`, T = {result.T} window batches; batches "
        f"{', '.join(str(i) for i in result.batch_ids)} each moved to positions {', '.join(str(j) for j in pos)} "
        f"(the other batches keep their reference order): {result.n_cells} cells, {result.n_orders_estimated} "
        f"distinct orders estimated in one call ({_fmt(result.seconds['estimate'], '.1f')} s); Adam state at the "
        f"window start: {result.adam_state_at_window_start or 'n/a'}. Losses are in "
        "nats/token; a *change* is against the same batch at its reference position (the reference order).", "",
        "## What the estimates show", "",
        f"- **Recency.** Placing a batch last (position {rec['last_position']}) instead of first (position "
        f"{rec['first_position']}) changes the final loss on that batch by {_fmt(rec['mean'])} nats/token on average "
        f"(range {_fmt(rec['min'])} to {_fmt(rec['max'])}; negative: a late batch is remembered better); it is lower "
        f"when last for {rec['n_lower_when_last']} of {rec['n_batches']} batches. " + _recency_sentence(rec),
        f"- **Forgetting.** Moving a batch one position earlier changes the final loss on it by "
        f"{_fmt(fo['mean_per_position'], '+.3g')} nats/token (minus the least-squares slope over position, mean over "
        f"batches; range {_fmt(fo['min_per_position'], '+.3g')} to {_fmt(fo['max_per_position'], '+.3g')}; positive: "
        f"forgetting); {fo['n_forgetting']} of {fo['n_batches']} batches show forgetting.",
        f"- **Domain interference.** Placing a batch last instead of first changes the eval loss on its own domain by "
        f"{_fmt(it['own_domain'])} and on the other domains by {_fmt(it['other_domains'])} nats/token (mean over "
        f"batches; overall `all` eval: {_fmt(it['all'])}); own minus other: {_fmt(it['own_minus_other'])}. "
        + _interference_sentence(it), "",
    ]
    lines += markdown_table(["domain", "recency (last - first)", "forgetting / position", "own-domain eval (last - first)",
                             "other-domain eval (last - first)"],
                            [[d, _fmt(rec["by_domain"][d]), _fmt(fo["by_domain"][d], "+.3g"), _fmt(it["by_domain"][d]["own"]),
                              _fmt(it["by_domain"][d]["other"])] for d in rec["by_domain"]])
    lines += ["", "## Validation against real retraining", ""]
    if not v["n_cells"]:
        lines.append("No cells were retrained (`--verify 0`): the numbers above are unvalidated estimates.")
    else:
        lines += [
            f"{v['n_cells']} cells retrained for real in {v['n_trainings']} training runs: the reference cell of every "
            f"batch (one run of the reference order) and {v['n_moved']} random moved cells (seed {v['seed']}).", "",
        ]
        rows = []
        for q in QUANTITIES:
            m = v["metrics"][q]
            rows.append([_LABELS[q], _fmt(m["spearman"], ".3f"), _fmt(m["spearman_change"], ".3f"),
                         _fmt(m["fraction_explained"], ".3f"), _fmt(m["absdiff"], ".4f"),
                         _fmt(m["max_abs_err"], ".4f"), _fmt(m["true_change_rms"], ".4f"),
                         f"{_fmt(m['true_slope'], '+.3g')} / {_fmt(m['est_slope'], '+.3g')}"])
        lines += markdown_table(["quantity", "rho (losses)", "rho (changes)", "fraction explained", "AbsDiff", "max error",
                                 "true change RMS", "slope true / est (per position)"], rows)
        lines += ["", "rho (losses): Spearman over all verified cells; rho (changes) and fraction explained: over "
                  "the moved cells, with fraction explained `1 - sum((dX_est - dX_true)^2) / sum(dX_true^2)` "
                  "(`1`: exact; `0`: no better than assuming position does not matter; below `0`: worse). Slopes: "
                  "least squares through the origin of the change on the displacement `j - i`."]
    return "\n".join(lines) + "\n"


def _recency_sentence(rec: dict) -> str:
    m = rec["mean"]
    if not math.isfinite(m):
        return ""
    if m < 0:
        return "On average the model remembers recent batches better (recency)."
    return "On average the model remembers early batches better (primacy), the opposite of recency."


def _interference_sentence(it: dict) -> str:
    own, other = it["own_domain"], it["other_domains"]
    if not (math.isfinite(own) and math.isfinite(other)) or own == 0 or other == 0:
        return ""
    word = {True: "raises", False: "lowers"}
    if (own > 0) != (other > 0):
        return (f"Position trades domains against each other (interference): placing a batch late {word[own > 0]} "
                f"its own domain's eval loss and {word[other > 0]} the other domains'.")
    more = "more" if abs(own) > abs(other) else "less"
    return (f"Position moves every domain the same way (a shared effect, no interference in sign): placing a batch "
            f"late {word[own > 0]} the eval loss of all domains, {more} on its own domain than on the others.")


def _heatmap(ax, values, vmax, title, cmap, pos, ylabels):
    im = ax.imshow(np.array(values, dtype=float), cmap=cmap, vmin=-vmax, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(pos)), [str(p) for p in pos], fontsize=7)
    ax.set_yticks(range(len(ylabels)), ylabels, fontsize=7)
    ax.set(xlabel="position j", title=title)
    ax.figure.colorbar(im, ax=ax, label="change vs reference (nats/token)")


def _heatmaps(result: PositionResult, out: Path) -> list[Path]:
    plt = pyplot()
    grid, pos = result.grid, result.positions
    ylabels = [f"B{b['id']} {b['domain']}" for b in result.batches]
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.85")
    paths = []
    for name, qs in (("heatmap_memorization.png", ["memorization"]),
                     ("heatmap_generalization.png", ["generalization_all", "generalization_domain"])):
        fig, axes = plt.subplots(len(qs), 2, figsize=(11, 3.6 * len(qs) + 0.6), squeeze=False)
        for r, q in enumerate(qs):
            e, t = np.array(grid[f"{q}_change"], dtype=float), np.array(grid[f"true_{q}_change"], dtype=float)
            vmax = float(np.nanmax(np.abs(np.concatenate([e.ravel(), t.ravel()])))) or 1e-12
            _heatmap(axes[r, 0], e, vmax, f"estimated: {_LABELS[q]}", cmap, pos, ylabels)
            _heatmap(axes[r, 1], t, vmax, f"true (verified cells): {_LABELS[q]}", cmap, pos, ylabels)
        paths.append(save_figure(fig, out / name))
    return paths


def _domain_curves(result: PositionResult, d: str, ax_m, ax_g) -> None:
    """Curves of one domain's batches: memorization change (``ax_m``), own/other-domain eval change (``ax_g``)."""
    grid, pos, names = result.grid, result.positions, result.eval_names
    ev = np.array(grid["eval"], dtype=float)
    ref_eval = np.array([result.reference["estimated_eval"][n] for n in names])
    dom_cols = [e for e, n in enumerate(names) if n in result.domain_names]
    val = result.validation["cells"]
    for b, info in enumerate(result.batches):
        if info["domain"] != d:
            continue
        line = ax_m.plot(pos, grid["memorization_change"][b], "o-", ms=3, label=f"B{info['id']}")[0]
        mine = [v for v in val if v["batch"] == info["id"]]
        ax_m.scatter([v["position"] for v in mine], [v["true_change"]["memorization"] for v in mine],
                     marker="x", color=line.get_color(), zorder=3)
        if d in names:
            oc = names.index(d)
            others = [e for e in dom_cols if e != oc]
            ax_g.plot(pos, ev[b, :, oc] - ref_eval[oc], "-", color=line.get_color(), label=f"B{info['id']} own")
            if others:
                ax_g.plot(pos, (ev[b][:, others] - ref_eval[others]).mean(1), "--", color=line.get_color(),
                          label=f"B{info['id']} others")
            ax_g.scatter([v["position"] for v in mine], [v["true_change"]["generalization_domain"] for v in mine],
                         marker="x", color=line.get_color(), zorder=3)
        ax_m.axvline(info["reference_position"], color=line.get_color(), lw=0.6, ls=":")


def _curves(result: PositionResult, path: Path) -> Path:
    plt = pyplot()
    doms = sorted({b["domain"] for b in result.batches})
    fig, axes = plt.subplots(2, len(doms), figsize=(3.6 * len(doms) + 1, 6.5), squeeze=False, sharex=True)
    for c, d in enumerate(doms):
        ax_m, ax_g = axes[0, c], axes[1, c]
        _domain_curves(result, d, ax_m, ax_g)
        ax_m.set(title=f"{d} batches", ylabel="loss on B_i, change (nats/token)")
        ax_g.set(xlabel="position j", ylabel="eval loss change (nats/token)")
        for ax in (ax_m, ax_g):
            ax.axhline(0, color="k", lw=0.5)
            ax.legend(fontsize=6)
    fig.suptitle("estimated (lines) and true (x) change vs the reference order; dotted: reference position", fontsize=9)
    return save_figure(fig, path)


def write_position_report(result: PositionResult, out_dir) -> list[Path]:
    """Write ``positions.json`` (the whole result, NaN as null), ``positions.md``,
    ``heatmap_memorization.png``, ``heatmap_generalization.png`` and ``curves.png`` into
    ``out_dir``; returns the paths.

    Heatmaps show the change (nats/token) against each batch's reference position over
    (batch, position): estimated everywhere, true on the verified cells (blank elsewhere).
    Curves: per domain, the estimated change of the loss on each of its batches, of the eval
    loss on its own domain (solid) and on the other domains (dashed) vs position, with the
    verified cells as markers.
    """
    out = Path(out_dir)
    paths = write_result_files(out, "positions", result, render_markdown(result))
    return paths + _heatmaps(result, out) + [_curves(result, out / "curves.png")]
