"""Validation of the merged-model proxy: merged estimates vs models trained for real on the unions,
with Spearman rho and Pearson r per eval set (the judgement of Na et al. 2024, arXiv 2410.15661)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from ..reports import fmt, pyplot, save_figure, write_result_files
from .merge import MergeEstimator
from .models import as_models
from .partitions import PAPER
from .subsets import all_subsets, sample_subsets, subset_label
from .training import real_union


def _corr(est: np.ndarray, true: np.ndarray) -> dict:
    from scipy import stats

    n = int(est.size)
    ok = n >= 3 and np.ptp(est) > 0 and np.ptp(true) > 0
    nan = float("nan")
    pe, pt = np.exp(est), np.exp(true)
    return {
        "n": n,
        "spearman": float(stats.spearmanr(est, true).statistic) if ok else nan,
        "pearson_ppl": float(stats.pearsonr(pe, pt).statistic) if ok else nan,
        "pearson_loss": float(stats.pearsonr(est, true).statistic) if ok else nan,
        "absdiff": float(np.mean(np.abs(est - true))) if n else nan,
        "spread": float(np.ptp(true)) if n else nan,
    }


def validate_subsets(models, out=None, max_subsets: int = 16, seed: int = 0, progress: bool = False) -> dict:
    """Merged-model estimates vs real union training, per eval set.

    The subsets are all non-empty subsets when there are at most ``max_subsets`` of them
    (``2^K - 1``), else a seeded :func:`sample_subsets` of ``max_subsets``. Each is trained for
    real (:func:`real_union`: ``|S| * n`` steps from the same base, the same tokens per
    partition as the partition models; a singleton is its stored partition model) and
    estimated by its uniform parameter average
    (:class:`MergeEstimator`). Metrics per eval set: Spearman rho (perplexity and loss rank
    alike), Pearson r between merged and real perplexity (and loss), mean |difference|
    (nats/token); on all subsets and on those with >= 2 partitions (singletons are exact by
    construction: the real singleton model is the partition model) and, per subset size with
    >= 3 subsets, among subsets of one size (equal real token budget). As in Na et al. 2024
    (arXiv 2410.15661), the proxy is judged by its correlation with real perplexity.

    Args:
        models: an :class:`AblationModels` or its directory.
        out: directory for ``validation.json``, ``validation.md`` and ``validation_scatter.png``
            (``None``: no files).
        max_subsets: exhaustive up to this many subsets, else a sample of this size.
        seed: seed of the sample.

    Returns:
        ``{"partitions", "eval_names", "subsets": [{"label", "size", "weights", "merged",
        "real" (nats/token per eval set), "steps", "seconds"}], "metrics": {eval set: {"all":
        {...}, "size>=2": {...}, "by_size": {size: {...}}}}, "cost": {...}, "exhaustive"}``; each
        metrics entry is ``{"n", "spearman", "pearson_ppl", "pearson_loss", "absdiff", "spread"}``
        (NaN when n < 3 or constant).
    """
    models = as_models(models)
    est = MergeEstimator(models)
    K, names, ev = models.K, models.names, models.eval_names
    exhaustive = K < 30 and 2**K - 1 <= max_subsets
    subs = all_subsets(K) if exhaustive else sample_subsets(K, max_subsets, seed)
    t0 = time.perf_counter()
    merged = est.estimate(subs)
    est_seconds = time.perf_counter() - t0
    real, rows = [], []
    it = range(subs.shape[0])
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="real union models", unit="subset")
    for i in it:
        r = real_union(models, subs[i])
        real.append(r["eval_loss"])
        rows.append({"label": subset_label(subs[i], names), "size": int(subs[i].sum()), "weights": subs[i].double().tolist(),
                     "merged": dict(zip(ev, merged[i].tolist())), "real": dict(zip(ev, r["eval_loss"].tolist())),
                     "steps": r["steps"], "seconds": r["seconds"], "reused_partition_model": r["reused"]})
    real_t = torch.stack(real)
    sizes = subs.sum(1)
    metrics = {}
    for j, name in enumerate(ev):
        e, t = merged[:, j].numpy(), real_t[:, j].numpy()
        multi = (sizes >= 2).numpy()
        by_size = {str(k): _corr(e[(sizes == k).numpy()], t[(sizes == k).numpy()])
                   for k in sorted(set(sizes.tolist())) if int((sizes == k).sum()) >= 3 and 1 < k}
        metrics[name] = {"all": _corr(e, t), "size>=2": _corr(e[multi], t[multi]), "by_size": by_size}
    real_seconds = sum(r["seconds"] for r in rows)
    n = subs.shape[0]
    result = {
        "method": PAPER,
        "models": str(models.path),
        "partitions": [p.to_dict() for p in models.partitions],
        "eval_names": ev,
        "steps_per_partition": models.steps,
        "exhaustive": exhaustive,
        "seed": seed,
        "subsets": rows,
        "metrics": metrics,
        "cost": {"estimate_seconds_per_subset": est_seconds / n, "real_seconds_per_subset": real_seconds / n,
                 "speedup": (real_seconds / n) / max(est_seconds / n, 1e-12),
                 "partition_training_seconds": models.manifest["train_seconds"]},
    }
    if out is not None:
        result["files"] = [str(p) for p in write_validation_report(result, out)]
    return result


def _fmt(x, spec: str = ".3f") -> str:
    return fmt(x, spec)


def render_validation_markdown(result: dict) -> str:
    """Markdown of a :func:`validate_subsets` result: metrics per eval set, then every subset."""
    ev = result["eval_names"]
    n, K = len(result["subsets"]), len(result["partitions"])
    c = result["cost"]
    lines = [
        "# Data ablation: merged vs real models", "",
        f"Proxy of {PAPER}: eval perplexity of the uniform parameter average of partition models vs a model trained "
        f"for real on the union (|S| x {result['steps_per_partition']} steps from the same base). "
        f"{n} subsets of K = {K} partitions ({'all of them' if result['exhaustive'] else 'a seeded sample'}). "
        f"Estimate {c['estimate_seconds_per_subset']:.3g} s/subset vs real training {c['real_seconds_per_subset']:.3g} s/subset.", "",
        "| eval set | Spearman rho | Pearson r (ppl) | rho, size>=2 | r (ppl), size>=2 | mean abs diff (nats/token) | real spread |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ev:
        a, b = result["metrics"][name]["all"], result["metrics"][name]["size>=2"]
        lines.append(f"| {name} | {_fmt(a['spearman'])} | {_fmt(a['pearson_ppl'])} | {_fmt(b['spearman'])} | "
                     f"{_fmt(b['pearson_ppl'])} | {_fmt(a['absdiff'], '.4f')} | {_fmt(a['spread'], '.4f')} |")
    sizes = sorted({k for name in ev for k in result["metrics"][name].get("by_size", {})}, key=int)
    if sizes:
        lines += ["", "Within one subset size (equal real token budget): Spearman rho / Pearson r (ppl), n subsets:", "",
                  "| eval set | " + " | ".join(f"size {k}" for k in sizes) + " |", "|---|" + "---|" * len(sizes)]
        for name in ev:
            bs = result["metrics"][name]["by_size"]
            lines.append(f"| {name} | " + " | ".join(
                f"{_fmt(bs[k]['spearman'], '.2f')} / {_fmt(bs[k]['pearson_ppl'], '.2f')} (n={bs[k]['n']})" if k in bs else "n/a"
                for k in sizes) + " |")
    lines += ["", "Perplexity per subset (merged / real):", "",
              "| subset | size | " + " | ".join(ev) + " |", "|---|---|" + "---|" * len(ev)]
    for r in sorted(result["subsets"], key=lambda r: r["real"][ev[-1]]):
        lines.append(f"| {r['label']} | {r['size']} | " + " | ".join(
            f"{math.exp(r['merged'][e]):.2f} / {math.exp(r['real'][e]):.2f}" for e in ev) + " |")
    return "\n".join(lines) + "\n"


def write_validation_report(result: dict, out_dir) -> list[Path]:
    """Write ``validation.json`` (NaN as null), ``validation.md`` and ``validation_scatter.png``
    (merged vs real perplexity, one panel per eval set, colored by subset size); returns the paths."""
    out = Path(out_dir)
    paths = write_result_files(out, "validation", result, render_validation_markdown(result))
    plt = pyplot()
    ev = result["eval_names"]
    ncols = min(len(ev), 3)
    nrows = math.ceil(len(ev) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.9 * nrows), squeeze=False, layout="constrained")
    sizes = np.array([r["size"] for r in result["subsets"]])
    cmap = plt.get_cmap("viridis")
    for ax, name in zip(axes.flat, ev):
        x = np.exp([r["real"][name] for r in result["subsets"]])
        y = np.exp([r["merged"][name] for r in result["subsets"]])
        for k in sorted(set(sizes.tolist())):
            sel = sizes == k
            ax.scatter(x[sel], y[sel], s=22, color=cmap((k - 1) / max(sizes.max() - 1, 1)), label=f"{k} partition(s)")
        lo, hi = min(x.min(), y.min()), max(x.max(), y.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.7, label="y = x")
        m = result["metrics"][name]["all"]
        ax.set(xlabel="real perplexity", ylabel="merged perplexity",
               title=f"{name}: rho {_fmt(m['spearman'], '.2f')}, r {_fmt(m['pearson_ppl'], '.2f')}")
    axes.flat[0].legend(fontsize=7)
    for ax in list(axes.flat)[len(ev):]:
        ax.axis("off")
    return paths + [save_figure(fig, out / "validation_scatter.png", dpi=90)]  # constrained layout: kept
