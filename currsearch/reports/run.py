"""The main job's report (``currsearch run``), rendered from a :class:`~currsearch.pipeline.PipelineResult`:
the verification report plus the compute ledger and the equal-compute comparison with search
on real training, and the trust-region rounds' report."""

from __future__ import annotations

from pathlib import Path

from ..ledger import LedgerSummary
from ..pipeline import PipelineResult
from ..results import to_json
from .common import fmt, markdown_table
from .trust_region import write_trust_region_report
from .verify import write_report


def render_ledger(ledger: LedgerSummary) -> str:
    """The compute ledger as a markdown section: per phase real runs, run equivalents and seconds, and the total."""
    rows = [[e.phase, str(e.real_runs), f"{e.run_equivalents:.1f}", f"{e.seconds:.1f}"] for e in ledger.entries]
    rows.append(["**total**", f"**{ledger.real_runs}**", f"**{ledger.run_equivalents:.1f}**", f"**{ledger.seconds:.1f}**"])
    untimed = sum(e.untimed_runs for e in ledger.entries)
    return ("## Compute ledger\n\nOne run equivalent = one real training of the window "
            f"({ledger.run_seconds:.3f} s here). Training and recording count their runs and gradients; other work "
            "(surrogate estimates, fut1-hvp's Hessian-vector products) counts by its time. Work reused from an earlier "
            "job (the recorded store, a fit's cached runs, verified runs) counts too, with the seconds it took when it "
            "ran.\n\n"
            + "\n".join(markdown_table(["phase", "real runs", "run equivalents", "seconds"], rows)) + "\n"
            + (f"\n{untimed} of the real runs were read back from a cache written before currsearch kept run times; "
               "their seconds are not in the table.\n" if untimed else ""))


def comparison(result: PipelineResult) -> dict:
    """The equal-compute verdict on the eval set the job and its baselines minimized (the first
    objective): the best loss currsearch verified (searched, refined or its best fit run)
    against each baseline's best at ``result.baseline_runs`` runs (``{"eval_set", "runs",
    "currsearch": (name, loss), "baselines": {name: loss}, "beats": {name: bool}}``; losses in nats/token)."""
    eval_set = result.settings.search.objectives[0]
    v = result.verification
    best = v.best(eval_set)  # the best order the job trained for real, whichever phase found it
    loss = v.candidates[best].verified[eval_set]
    base = {n: b.best_loss for n, b in result.baselines.items()}
    return {"eval_set": eval_set, "runs": result.baseline_runs, "run_equivalents": result.ledger.run_equivalents,
            "currsearch": [best, loss],
            "baselines": base, "beats": {n: loss < x for n, x in base.items()}}


def render_comparison(result: PipelineResult) -> str:
    """Markdown section: currsearch against search with real training at the same budget."""
    if not result.baselines:
        return ""
    c = comparison(result)
    rows = [["currsearch (" + c["currsearch"][0] + ")", f"{c['run_equivalents']:.1f}", fmt(c["currsearch"][1])]]
    rows += [[n, str(c["runs"]), fmt(x)] for n, x in c["baselines"].items()]
    verdict = "; ".join(f"{'beats' if b else 'does not beat'} {n}" for n, b in c["beats"].items())
    return ("## Equal compute: search with real training\n\nEach baseline trains orders for real and keeps the best, "
            f"with {c['runs']} real runs (the job's budget, else its total run equivalents).\n\n"
            + "\n".join(markdown_table(["strategy", "real-run equivalents", f"best verified {c['eval_set']} (nats/token)"],
                                       rows))
            + f"\n\ncurrsearch's best {verdict}.\n")


def render_guided(result: PipelineResult) -> str:
    """Markdown section of a ``guided-tpe`` job (``result.guided`` set): its settings, runs,
    refits, its polish and who found the best order."""
    g = result.guided
    st = g.settings
    return ("## Guided TPE\n\nTPE with real training on the random-keys space; after "
            f"{st.first_batch} plain trials and then every {st.refit_every}, a `calibrated-interactions` surrogate "
            f"fitted to all real runs so far proposed up to {st.enqueue} untrained orders (its optimum and swap "
            f"descents from the {st.starts} best real orders). {g.n_runs} real runs, {g.refits} refits, "
            f"{g.n_surrogate} runs of surrogate orders; the best order ({fmt(g.best_loss)} nats/token) came from "
            f"`{g.best_source}`. Surrogate fits and searches: {g.surrogate_seconds:.1f} s (0 run equivalents).\n"
            + (render_polish(g.polish) if g.polish is not None else ""))


def render_polish(p) -> str:
    """Markdown paragraph of a guided job's suffix polish (:class:`~currsearch.polish.PolishResult`)."""
    if not p.losses:
        return (f"\nSuffix polish: none ({p.run_equivalents:.1f} run equivalents spent); its share of the budget "
                "was too small for the best run's training and one move.\n")
    return (f"\nSuffix polish from the best full run ({fmt(p.start_loss)}): {len(p.losses)} transpositions late in the "
            f"window, each trained for real from the incumbent's state at step {', '.join(map(str, sorted(set(p.departures))))} "
            f"(cost: the steps trained plus an evaluation, {p.eval_fraction:.3f} of a run), {p.improvements} improvements, "
            f"{p.run_equivalents:.1f} run equivalents; best {fmt(p.best_loss)} nats/token.\n")


def write_run_report(result: PipelineResult, out_dir) -> list[Path]:
    """Write ``out_dir/report.{json,md}``, the plots and ``best_order.json``
    (:func:`currsearch.reports.verify.write_report`, with the ledger, the budget plan, the
    baselines and a guided job's section; its record is the verification's ``search``), and,
    when the job ran trust-region rounds, their report into ``OUT/trust_region``; returns the paths."""
    extra = {"ledger": to_json(result.ledger), "budget": to_json(result.budget),
             "baselines": to_json(result.baselines), **({"comparison": comparison(result)} if result.baselines else {})}
    md = ("\n" + render_ledger(result.ledger) + ("\n" + render_guided(result) if result.guided else "")
          + ("\n" + render_comparison(result) if result.baselines else ""))
    study = result.search.study if result.search is not None else None  # a guided job's values are real losses
    paths = write_report(out_dir, result.verification, study, extra, md)
    if result.trust_region is not None:
        paths += write_trust_region_report(result.trust_region, result.settings.out / "trust_region")
    return paths
