"""The regime summary (plain text and markdown) of a :class:`currsearch.regime.RegimeResult`."""

from __future__ import annotations

from ..regime import RegimeResult
from .common import fmt, markdown_table


def render_markdown(r: RegimeResult) -> str:
    """A markdown summary: size and cost, then per eval set the unigram baseline, the window-start
    loss, how far below the baseline it is and the loss after T mixed steps, then the order
    spread on ``main_eval``."""
    lines = [
        f"P = {r.params:,} parameters (baseline {r.baseline_params:,}), T = {r.T} window steps of "
        f"{r.tokens_per_step} tokens after {r.warmup_steps} warm-up steps "
        f"({'loaded from the cache' if r.warmup_cached else 'trained'} in {r.warmup_seconds:.1f} s), {r.threads} thread(s), "
        f"machine load {r.load_average[0]:.1f} before the runs and {r.load_average[-1]:.1f} after.",
        "",
        f"One real run: {fmt(sum(r.run_seconds) / len(r.run_seconds), '.2f')} s; baseline run, measured after each: "
        f"{fmt(sum(r.baseline_run_seconds) / len(r.baseline_run_seconds), '.3f')} s; ratio {fmt(r.cost_ratio, '.1f')}x.",
        "",
    ]
    lines += markdown_table(["eval set", "unigram baseline", "window start", "below baseline", f"after {r.T} mixed steps"],
                            [[n, fmt(r.unigram_baseline[n]), fmt(r.window_start_loss[n]), fmt(r.below_baseline[n]),
                              fmt(r.mixed_continuation_loss[n])] for n in r.eval_names])
    lines += ["", f"Final loss (`{r.main_eval}`, nats/token): {len(r.random)} random orders mean {fmt(r.random_mean)}, "
                  f"std {fmt(r.random_std)}; {len(r.structured)} structured orders {fmt(r.structured_min)} to "
                  f"{fmt(r.structured_max)} (range {fmt(r.structured_max - r.structured_min)}).", ""]
    lines += markdown_table(["order", "kind", f"final `{r.main_eval}`", "seconds"],
                            [[o.name, o.kind, fmt(o.eval_loss[r.main_eval]), fmt(o.seconds, '.2f')]
                             for o in r.random + r.structured])
    return "\n".join(lines) + "\n"
