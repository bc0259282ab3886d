"""The fidelity-benchmark report (``fidelity.json``, ``fidelity.md``, ``scatter_<estimator>.png``,
``rho_vs_distance.png``, and the combined ``fidelity.md`` of several settings) of the result
dicts of :func:`currsearch.fidelity.evaluate_estimators` / :func:`~currsearch.fidelity.run_fidelity`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..fidelity import group_of
from ..manifest import atomic_write_bytes, make_output_dir
from .common import fmt, markdown_table, pyplot, save_figure, write_result_files

#: Titles of the optimizer-state settings in the combined report.
SETTING_TITLES = {"fresh": "fresh Adam state at the window start", "warm": "Adam state carried from the warm-up phase"}


def _num(x) -> float:
    return float("nan") if x is None else float(x)


def _fmt(x, spec: str = ".3f") -> str:
    return fmt(x, spec)


def _bin_labels(edges) -> list[str]:
    return [f"[{lo:g}, {hi:g}{']' if hi >= 1 else ')'}" for lo, hi in zip(edges, edges[1:])]


def _main_eval(result: dict) -> tuple[str, int]:
    ev = "all" if "all" in result["eval_names"] else result["eval_names"][-1]
    return ev, result["eval_names"].index(ev)


def _regime_lines(result: dict, ev: str, true: np.ndarray) -> list[str]:
    """The order spread next to the fidelity numbers: std of the random orders' true loss and
    range of the structured orders' (``ev``), and, when the result has them, the window-start
    loss and the unigram-entropy baseline; ``[]`` when there is nothing to say."""
    kinds = np.array([group_of(o["kind"]) for o in result["orders"]])
    rand, struct = true[kinds == "random"], true[np.isin(kinds, ("domain-block", "easy-to-hard", "hard-to-easy"))]
    parts = []
    if rand.size > 1:
        parts.append(f"random orders: std {float(np.std(rand, ddof=1)):.4f} (n = {rand.size})")
    if struct.size:
        parts.append(f"structured orders: {struct.min():.4f} to {struct.max():.4f} (n = {struct.size})")
    if "window_start_loss" in result and "unigram_baseline" in result:
        start, base = result["window_start_loss"][ev], result["unigram_baseline"][ev]
        parts.append(f"window start {_fmt(start, '.4f')} vs unigram baseline {_fmt(base, '.4f')} "
                     f"({_fmt(base - start if start is not None and base is not None else None, '.2f')} below)")
    nl = result.get("store", {}).get("nonlinearity")
    if nl:  # currsearch.fidelity.nonlinearity_index: first-order estimates hold where it is small
        parts.append(f"nonlinearity: curvature drift {_fmt(nl['curvature_drift'], '.2f')}, second-moment drift "
                     f"{_fmt(nl['second_moment_drift'], '.2f')}, Adam steps at the window start {nl['adam_step0']}")
    return [f"True loss (`{ev}`, nats/token): " + "; ".join(parts) + ".", ""] if parts else []


def render_markdown(result: dict, title: str = "") -> str:
    """Markdown summary of one setting's result on eval set ``"all"``: a metrics table and a
    rho / AbsDiff vs distance table, one row per estimator."""
    (ev, j), ests, st = _main_eval(result), result["estimators"], result["store"]
    true = np.array(result["true_losses"])[:, j]
    lines = [f"## {title or result.get('setting', 'fidelity')}", "",
             f"{len(true)} held-out orders, T = {len(result['orders'][0]['order'])}; true loss (`{ev}`) "
             f"{true.min():.4f} to {true.max():.4f} nats/token (std {_fmt(float(np.std(true, ddof=1)) if len(true) > 1 else None, '.4f')}); "
             f"retrain {_fmt(result['retrain_seconds_per_order'], '.3g')} s/order; store {_fmt(st.get('bytes'), ',')} bytes "
             f"(formula {_fmt(st.get('formula_bytes'), ',')}), "
             f"recorded in {_fmt(st.get('record_seconds'), '.3g')} s.", "", *_regime_lines(result, ev, true),
             ]
    rows = []
    for name, r in ests.items():
        m, a = r["metrics"][ev], r["metrics"][ev]["all"]
        rows.append([name] + [_fmt(m[s]["spearman"]) for s in ("all", "random", "near")] + [
            _fmt(a["absdiff"], ".4f"), _fmt(a["err_frac_of_spread"], ".2f"), _fmt(a["top1"], ".0f"), _fmt(a["top5"], ".2f"),
            _fmt(r["cost"]["speedup"], ",.0f" if r["cost"]["speedup"] >= 10 else ".2g") + "x"])
    lines += markdown_table(["estimator", "rho all", "rho random", "rho near", "AbsDiff", "err / spread", "top-1", "top-5",
                             "speedup"], rows)
    labels = _bin_labels(result["distance_bins"])
    rows = [[name] + [f"{_fmt(d['spearman'], '.2f')} / {_fmt(d['absdiff'], '.4f')}" for d in r["by_distance"][ev]]
            for name, r in ests.items()]
    if ests:
        first = next(iter(ests.values()))["by_distance"][ev]
        rows.append(["true spread (n)"] + [f"{_fmt(d['spread'], '.4f')} ({d['n']})" for d in first])
    lines += ["", f"Spearman rho / AbsDiff (nats/token) by normalized Kendall distance to the reference (`{ev}`):", ""]
    lines += markdown_table(["estimator"] + labels, rows)
    return "\n".join(lines) + "\n"


def write_report(result: dict, out_dir) -> list[Path]:
    """Write ``fidelity.json`` (the whole result, NaN as null), ``fidelity.md``,
    ``scatter_<estimator>.png`` and ``rho_vs_distance.png`` into ``out_dir``; returns the paths."""
    out = Path(out_dir)
    paths = write_result_files(out, "fidelity", result, f"# Fidelity benchmark\n\n{render_markdown(result)}")
    plt = pyplot()
    ev, j = _main_eval(result)
    true = np.array(result["true_losses"])[:, j]
    groups = np.array([group_of(o["kind"]) for o in result["orders"]])

    for name, r in result["estimators"].items():
        est = np.array(r["estimates"])[:, j]
        fig, ax = plt.subplots(figsize=(5, 5))
        for g in dict.fromkeys(groups):
            ax.scatter(true[groups == g], est[groups == g], label=g, s=18)
        lo, hi = min(true.min(), est.min()), max(true.max(), est.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="y = x")
        ax.set(xlabel=f"true final loss, {ev} (nats/token)", ylabel="estimated (nats/token)",
               title=f"{name}: rho = {_fmt(r['metrics'][ev]['all']['spearman'], '.2f')}")
        ax.legend(fontsize=7)
        paths.append(save_figure(fig, out / f"scatter_{name}.png"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = np.arange(len(result["distance_bins"]) - 1)
    for name, r in result["estimators"].items():
        for ax, key in zip(axes, ("spearman", "absdiff")):
            ax.plot(x, [_num(b[key]) for b in r["by_distance"][ev]], "o-", label=name)
    if result["estimators"]:
        first = next(iter(result["estimators"].values()))["by_distance"][ev]
        axes[1].plot(x, [_num(b["spread"]) for b in first], "k--", label="true spread")
    for ax, yl in zip(axes, ("Spearman rho", f"AbsDiff, {ev} (nats/token)")):
        ax.set_xticks(x, _bin_labels(result["distance_bins"]), fontsize=7)
        ax.set(xlabel="normalized Kendall distance to the reference", ylabel=yl)
        ax.legend(fontsize=7)
    paths.append(save_figure(fig, out / "rho_vs_distance.png"))
    return paths




def write_settings_report(results: dict, out_dir) -> list[Path]:
    """Write each setting's report into ``out_dir/<setting>`` (:func:`write_report`) and the
    combined ``out_dir/fidelity.md``; ``results`` is ``{setting: result}``
    (:func:`currsearch.fidelity.run_fidelity_settings`). Returns the paths."""
    out = make_output_dir(out_dir)
    paths = [p for s, r in results.items() for p in write_report(r, out / s)]
    body = "\n".join(render_markdown(r, f"{s}: {SETTING_TITLES.get(s, s)}") for s, r in results.items())
    atomic_write_bytes(out / "fidelity.md", f"# Fidelity benchmark\n\n{body}".encode())
    return paths + [out / "fidelity.md"]
