"""The trust-region report (``trust_region.md``, ``trust_region_rounds.png``, ``best_order.json``)
of a :class:`~currsearch.trust_region.TrustRegionResult`."""

from __future__ import annotations

from pathlib import Path

import torch

from ..export import export_order
from ..manifest import atomic_write_bytes, make_output_dir
from ..trust_region import TrustRegionResult
from .common import fmt, history_plot, markdown_table


def render_trust_region_markdown(result: TrustRegionResult) -> str:
    """``trust_region.md``: start and final loss, then one table row per round (nats/token)."""
    rs = result.rounds
    rows = []
    for x in rs:
        best = min((c.verified for c in x.candidates), default=float("nan"))
        rows.append([str(x.round), str(x.radius), f"{x.incumbent_loss:.4f}", f"{best:.4f}", f"{x.predicted_improvement:+.4f}",
                     f"{x.actual_improvement:+.4f}", fmt(x.rho, ".2f"), str(x.improved)])
    lines = [f"# Trust-region search ({result.estimator}, objective `{result.objective}`)", "",
             f"Start loss {result.start_loss:.4f}, final incumbent {result.incumbent_loss:.4f} nats/token "
             f"({result.incumbent_loss - result.start_loss:+.4f}) after {len(rs)} rounds and "
             f"{result.verified_runs} real training runs.", ""]
    lines += markdown_table(["round", "radius", "incumbent (verified)", "best candidate (verified)", "predicted gain",
                             "actual gain", "rho", "moved"], rows)
    return "\n".join(lines) + "\n"


def write_trust_region_report(result: TrustRegionResult, out_dir) -> list[Path]:
    """Write ``trust_region.md``, ``trust_region_rounds.png`` (verified losses per round: the
    incumbent and the retrained candidates, with the best so far) and ``best_order.json`` (the
    final incumbent) into ``out_dir``; returns the paths."""
    out = make_output_dir(out_dir)
    atomic_write_bytes(out / "trust_region.md", render_trust_region_markdown(result).encode())
    xs, ys = [], []
    for x in result.rounds:
        xs += [x.round] * (1 + len(x.candidates))
        ys += [x.incumbent_loss] + [c.verified for c in x.candidates]
    png = history_plot(out / "trust_region_rounds.png", xs, ys, "round",
                       f"verified final loss, {result.objective} (nats/token)", "trust-region rounds",
                       point_label="incumbent and retrained candidates")
    best = export_order(out / "best_order.json", torch.tensor(result.incumbent), name="trust_region_incumbent",
                        verified={result.objective: result.incumbent_loss})
    return [out / "trust_region.md", png, best]
