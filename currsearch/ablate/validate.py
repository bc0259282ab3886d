"""Validation of the merged-model proxy: merged estimates vs models trained for real on the unions,
with Spearman rho and Pearson r per eval set (the judgement of Na et al. 2024, arXiv 2410.15661)."""

from __future__ import annotations

import time
import numpy as np
import torch
from scipy import stats
from tqdm.auto import tqdm

from .merge import MergeEstimator
from .models import as_models
from .partitions import PAPER
from .results import CorrelationMetrics, EvalSetMetrics, SubsetValidation, ValidatedSubset, ValidationCost
from .subsets import all_subsets, sample_subsets, subset_label
from .training import real_union


def _corr(est: np.ndarray, true: np.ndarray) -> CorrelationMetrics:
    n = int(est.size)
    ok = n >= 3 and np.ptp(est) > 0 and np.ptp(true) > 0
    nan = float("nan")
    pe, pt = np.exp(est), np.exp(true)
    return CorrelationMetrics(
        n=n,
        spearman=float(stats.spearmanr(est, true).statistic) if ok else nan,
        pearson_ppl=float(stats.pearsonr(pe, pt).statistic) if ok else nan,
        pearson_loss=float(stats.pearsonr(est, true).statistic) if ok else nan,
        absdiff=float(np.mean(np.abs(est - true))) if n else nan,
        spread=float(np.ptp(true)) if n else nan,
    )


def _metrics(ev: list[str], merged: torch.Tensor, real: torch.Tensor, sizes: torch.Tensor) -> dict[str, EvalSetMetrics]:
    """``{eval set: EvalSetMetrics}`` of merged vs real losses (float64 ``[n, E]``, nats/token);
    ``sizes``: int ``[n]`` partitions per subset."""
    metrics = {}
    multi = (sizes >= 2).numpy()
    for j, name in enumerate(ev):
        e, t = merged[:, j].numpy(), real[:, j].numpy()
        by_size = {str(k): _corr(e[(sizes == k).numpy()], t[(sizes == k).numpy()])
                   for k in sorted(set(sizes.tolist())) if int((sizes == k).sum()) >= 3 and 1 < k}
        metrics[name] = EvalSetMetrics(_corr(e, t), _corr(e[multi], t[multi]), by_size)
    return metrics


def validate_subsets(models, max_subsets: int = 16, seed: int = 0, progress: bool = False) -> SubsetValidation:
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
        (write ``validation.json``, ``validation.md`` and ``validation_scatter.png`` with
        :func:`currsearch.reports.ablate.write_validation_report`)
        max_subsets: exhaustive up to this many subsets, else a sample of this size.
        seed: seed of the sample.

    Returns:
        :class:`SubsetValidation`: one :class:`ValidatedSubset` per subset (merged and real
        losses, nats/token; steps; seconds), ``{eval set: EvalSetMetrics}`` (each
        :class:`CorrelationMetrics` NaN where n < 3 or constant) and the :class:`ValidationCost`
        (seconds per subset).
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
    for i in tqdm(range(subs.shape[0]), desc="real union models", unit="subset", disable=not progress):
        r = real_union(models, subs[i])
        real.append(r["eval_loss"])
        rows.append(ValidatedSubset(
            label=subset_label(subs[i], names), size=int(subs[i].sum()), weights=subs[i].double().tolist(),
            merged=dict(zip(ev, merged[i].tolist())), real=dict(zip(ev, r["eval_loss"].tolist())),
            steps=r["steps"], seconds=r["seconds"], reused_partition_model=r["reused"]))
    metrics = _metrics(ev, merged, torch.stack(real), subs.sum(1))
    real_seconds = sum(r.seconds for r in rows)
    n = subs.shape[0]
    cost = ValidationCost(estimate_seconds_per_subset=est_seconds / n, real_seconds_per_subset=real_seconds / n,
                          speedup=(real_seconds / n) / max(est_seconds / n, 1e-12),
                          partition_training_seconds=models.manifest["train_seconds"])
    return SubsetValidation(method=PAPER, models=str(models.path), partitions=list(models.partitions), eval_names=list(ev),
                            steps_per_partition=models.steps, exhaustive=exhaustive, seed=seed, subsets=rows,
                            metrics=metrics, cost=cost)
