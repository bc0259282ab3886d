"""Data-ablation reports (Na et al. 2024, arXiv 2410.15661): ``validation.{json,md}`` and
``validation_scatter.png`` of :func:`currsearch.ablate.validate_subsets`, and ``search.{json,md}``
and ``optimization_history.png`` of :func:`currsearch.ablate.run_subset_search`."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..ablate.partitions import PAPER
from ..ablate.results import SubsetSearchReport, SubsetValidation
from .common import fmt, markdown_table, pyplot, save_figure, study_history_plot, write_result_files


def _fmt(x, spec: str = ".3f") -> str:
    return fmt(x, spec)


def render_validation_markdown(result: SubsetValidation) -> str:
    """Markdown of a :func:`validate_subsets` result: metrics per eval set, then every subset."""
    ev = result.eval_names
    n, K = len(result.subsets), len(result.partitions)
    c = result.cost
    lines = [
        "# Data ablation: merged vs real models", "",
        f"Proxy of {PAPER}: eval perplexity of the uniform parameter average of partition models vs a model trained "
        f"for real on the union (|S| x {result.steps_per_partition} steps from the same base). "
        f"{n} subsets of K = {K} partitions ({'all of them' if result.exhaustive else 'a seeded sample'}). "
        f"Estimate {c.estimate_seconds_per_subset:.3g} s/subset vs real training {c.real_seconds_per_subset:.3g} s/subset.", "",
    ]
    lines += markdown_table(
        ["eval set", "Spearman rho", "Pearson r (ppl)", "rho, size>=2", "r (ppl), size>=2", "mean abs diff (nats/token)",
         "real spread"],
        [[name, _fmt(m.all.spearman), _fmt(m.all.pearson_ppl), _fmt(m.multi.spearman), _fmt(m.multi.pearson_ppl),
          _fmt(m.all.absdiff, '.4f'), _fmt(m.all.spread, '.4f')] for name, m in ((n, result.metrics[n]) for n in ev)])
    sizes = sorted({k for name in ev for k in result.metrics[name].by_size}, key=int)
    if sizes:
        lines += ["", "Within one subset size (equal real token budget): Spearman rho / Pearson r (ppl), n subsets:", ""]
        lines += markdown_table(["eval set"] + [f"size {k}" for k in sizes], [
            [name] + [f"{_fmt(bs[k].spearman, '.2f')} / {_fmt(bs[k].pearson_ppl, '.2f')} (n={bs[k].n})" if k in bs else "n/a"
                      for k in sizes] for name, bs in ((n, result.metrics[n].by_size) for n in ev)])
    lines += ["", "Perplexity per subset (merged / real):", ""]
    lines += markdown_table(["subset", "size"] + list(ev), [
        [r.label, str(r.size)] + [f"{math.exp(r.merged[e]):.2f} / {math.exp(r.real[e]):.2f}" for e in ev]
        for r in sorted(result.subsets, key=lambda r: r.real[ev[-1]])])
    return "\n".join(lines) + "\n"


def write_validation_report(result: SubsetValidation, out_dir) -> list[Path]:
    """Write ``validation.json`` (NaN as null), ``validation.md`` and ``validation_scatter.png``
    (merged vs real perplexity, one panel per eval set, colored by subset size); returns the paths."""
    out = Path(out_dir)
    paths = write_result_files(out, "validation", result, render_validation_markdown(result))
    plt = pyplot()
    ev = result.eval_names
    ncols = min(len(ev), 3)
    nrows = math.ceil(len(ev) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.9 * nrows), squeeze=False, layout="constrained")
    sizes = np.array([r.size for r in result.subsets])
    cmap = plt.get_cmap("viridis")
    for ax, name in zip(axes.flat, ev):
        x = np.exp([r.real[name] for r in result.subsets])
        y = np.exp([r.merged[name] for r in result.subsets])
        for k in sorted(set(sizes.tolist())):
            sel = sizes == k
            ax.scatter(x[sel], y[sel], s=22, color=cmap((k - 1) / max(sizes.max() - 1, 1)), label=f"{k} partition(s)")
        lo, hi = min(x.min(), y.min()), max(x.max(), y.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.7, label="y = x")
        m = result.metrics[name].all
        ax.set(xlabel="real perplexity", ylabel="merged perplexity",
               title=f"{name}: rho {_fmt(m.spearman, '.2f')}, r {_fmt(m.pearson_ppl, '.2f')}")
    axes.flat[0].legend(fontsize=7)
    for ax in list(axes.flat)[len(ev):]:
        ax.axis("off")
    return paths + [save_figure(fig, out / "validation_scatter.png", dpi=90)]  # constrained layout: kept


def render_search_markdown(result: SubsetSearchReport) -> str:
    """Markdown of a :func:`run_subset_search` result."""
    s, ev, obj = result.summary, result.eval_names, result.summary.objective
    se = result.search
    lines = [
        "# Data ablation: subset search", "",
        f"Optuna study `{se.study}` ({se.sampler}, {'subsets and mixture weights' if se.weights else 'subsets'}): "
        f"{se.n_trials} trials, {se.distinct} distinct candidates, objective = merged eval loss on `{obj}` "
        f"({PAPER} proxy). Verified candidates were trained for real from the same base with matched budget.", "",
    ]
    others = [e for e in ev if e != obj]
    lines += markdown_table(
        ["candidate", "subset", f"merged {obj}", f"real {obj}"] + [f"real {e}" for e in others] + ["steps"],
        [[name, v.label, f"{v.estimated[obj]:.4f}", f"{v.verified[obj]:.4f}"] + [f"{v.verified[e]:.4f}" for e in others]
         + [str(v.steps)] for name, v in sorted(result.candidates.items(), key=lambda kv: kv[1].verified[obj])])
    if s.best_searched:
        vs_full = "is the full set" if s.best_is_full else f"{'beats' if s.beats_full else 'does not beat'} the full set"
        lines += ["", f"Best verified searched subset `{s.best_searched_label}`: {s.best_searched_loss:.4f} nats/token "
                  f"on `{obj}`; it {vs_full} ({s.full_loss:.4f}) and "
                  f"{'beats' if s.beats_best_single else 'does not beat'} the best single partition "
                  f"(`{s.best_single}`, {s.best_single_loss:.4f})."]
    if s.merged_optimum:
        lines.append(f"Exhaustive optimum of the merged estimate: `{s.merged_optimum.label}` "
                     f"({s.merged_optimum.estimated:.4f}); found by the search: {s.search_found_merged_optimum}.")
    return "\n".join(lines) + "\n"


def write_search_report(result: SubsetSearchReport, out_dir, study=None) -> list[Path]:
    """Write ``search.json``, ``search.md`` and (with a study) ``optimization_history.png``
    (merged perplexity per trial); returns the paths."""
    out = Path(out_dir)
    paths = write_result_files(out, "search", result, render_search_markdown(result))
    if study is not None:
        p = study_history_plot(out / "optimization_history.png", study,
                               f"merged perplexity, {result.summary.objective}",
                               "subset search: optimization history", transform=math.exp)
        paths += [p] if p else []
    return paths
