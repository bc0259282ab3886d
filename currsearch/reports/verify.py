"""The search-and-verification report (``report.json``, ``report.md``, plots, ``best_order.json``)
of a :class:`~currsearch.verify.VerificationResult`."""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.patches import Patch

from ..export import export_order
from ..manifest import atomic_write_bytes, make_output_dir
from ..results import to_json
from ..verify import VerificationResult, VerificationSummary, summarize
from .common import fmt, markdown_table, pyplot, save_figure, study_history_plot, write_json


def _fmt(x) -> str:
    return fmt(x, ".4f")


def _verdict(s: VerificationSummary) -> str:
    if s.best_searched is None:
        return "No searched order was verified."
    parts = []
    if s.random_median is not None:
        parts.append(f"{'beats' if s.beats_random_median else 'does not beat'} the random median "
                     f"(`{s.random_median}`, {_fmt(s.random_median_loss)})")
    if s.heuristics:
        hb = ", ".join(f"{n} {_fmt(x)}" for n, x in s.heuristics.items())
        parts.append(f"{'beats' if s.beats_all_heuristics else 'does not beat'} every heuristic ({hb})")
    if s.reference_loss is not None:
        parts.append(f"{'beats' if s.beats_reference else 'does not beat'} the reference ({_fmt(s.reference_loss)})")
    return (f"Best verified searched order `{s.best_searched}`: {_fmt(s.best_searched_loss)} nats/token on "
            f"`{s.eval_set}`." + (f" It {' and '.join(parts)}." if parts else ""))


def render_markdown(result: VerificationResult, summary: VerificationSummary) -> str:
    """``report.md``: every candidate (estimated and verified losses, nats/token), best first,
    and the verdict of ``summary`` (and of the trust-region refinement, if any)."""
    doms = [n for n in result.eval_names if n != "all"]
    header = ["candidate", "kind", "estimated all", "verified all"] + [f"verified {d}" for d in doms] + ["seconds"]
    rows = []
    for name, v in sorted(result.candidates.items(), key=lambda kv: kv[1].verified["all"]):
        est = v.estimated["all"] if v.estimated else None
        label = f"{name} (random median)" if name == summary.random_median else name
        rows.append([label, v.kind, _fmt(est), _fmt(v.verified["all"])] + [_fmt(v.verified[d]) for d in doms]
                    + [f"{v.seconds:.2f}"])
    verdict = _verdict(summary)
    tr = result.trust_region
    if tr:
        verdict += (
            f"\n\n`search_trust_region`: {tr.rounds} trust-region rounds ({tr.estimator}) started from the best "
            f"verified candidate `{tr.start}` ({_fmt(tr.start_loss)}) and reached {_fmt(tr.final_loss)} "
            f"on `{tr.objective}` (gain {_fmt(tr.gain)} nats/token, {tr.verified_runs} real training runs"
            + ("; no round found a better order, so it is the start order itself" if tr.gain <= 0 else "") + ").\n"
        )
    return ("# Search and verification report\n\nLosses are final eval losses in nats/token (lower is better); "
            "'estimated' comes from the surrogate, 'verified' from real retraining.\n\n"
            + "\n".join(markdown_table(header, rows)) + "\n\n" + verdict + "\n")


def _domains_plot(path, name: str, order: list[int], domains: list[str]) -> Path:
    plt = pyplot()
    names = sorted(set(domains))
    row = [[names.index(domains[l]) for l in order]]
    fig, ax = plt.subplots(figsize=(max(6, len(order) * 0.25), 1.8))
    cmap = plt.get_cmap("tab10", max(len(names), 1))
    ax.imshow(row, aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(names) - 0.5)
    ax.set_yticks([])
    ax.set(xlabel="step t", title=f"{name}: domain of the batch at each step")
    ax.legend(handles=[Patch(color=cmap(i), label=n) for i, n in enumerate(names)], fontsize=7,
              loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=len(names))
    return save_figure(fig, path)


def _scatter_plot(path, result: VerificationResult) -> Path:
    plt = pyplot()
    c = result.candidates
    fig, ax = plt.subplots(figsize=(5, 5))
    for kind in dict.fromkeys(v.kind for v in c.values()):
        pts = [(v.verified["all"], v.estimated["all"]) for v in c.values() if v.kind == kind and v.estimated]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=kind, s=20)
    ax.set(xlabel="verified final loss, all (nats/token)", ylabel="estimated (nats/token)", title="estimated vs verified")
    if ax.get_legend_handles_labels()[0]:  # no estimates at all (a guided-tpe job's candidates): no legend
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def write_report(out_dir, result: VerificationResult, study=None, extra: dict | None = None,
                 extra_markdown: str = "") -> list[Path]:
    """Write ``report.json`` (the result with ``summary``, ``best`` and the JSON-ready ``extra``
    entries), ``report.md`` (with ``extra_markdown`` appended), ``optimization_history.png``
    (when ``study`` is given), ``estimated_vs_verified.png``, ``best_order_domains.png`` and
    ``best_order.json`` (the best verified searched order, else the best verified candidate)
    into ``out_dir``; returns the paths."""
    out = make_output_dir(out_dir)
    summary = summarize(result)
    best = summary.best_searched or result.best()
    write_json(out / "report.json", {**to_json(result), "summary": to_json(summary), "best": best, **(extra or {})})
    atomic_write_bytes(out / "report.md", (render_markdown(result, summary) + extra_markdown).encode())
    paths = [out / "report.json", out / "report.md"]
    if study is not None:
        p = study_history_plot(out / "optimization_history.png", study, "estimated objective (nats/token)",
                               "optimization history")
        paths += [p] if p else []
    paths.append(_scatter_plot(out / "estimated_vs_verified.png", result))
    b = result.candidates[best]
    paths.append(_domains_plot(out / "best_order_domains.png", best, b.order, result.domains))
    paths.append(export_order(out / "best_order.json", torch.tensor(b.order), name=best, verified=b.verified,
                              estimated=b.estimated))
    return paths
