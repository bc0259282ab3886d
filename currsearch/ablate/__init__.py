"""Data ablations by modular training and parameter averaging (Na et al. 2024, arXiv 2410.15661).

"Which subsets of my data should I train on?" without training one model per subset: train
one model per data *partition* from a shared base, and estimate the eval loss of a model
trained on a union of partitions by the eval loss of the parameter average of those
partitions' models (the paper's "modular training evaluation strategy": models trained on
equally sized base-unit partitions, proxy = perplexity of their parameter average)::

    models = train_partitions(cfg, "runs/ablate")                  # one model per domain
    est = MergeEstimator(models)
    est.estimate(["bible+python", "devil"])                        # float64 [2, E], nats/token
    validate_subsets(models)                                       # merged vs real unions
    run_subset_search(models, "runs/ablate/search", n_trials=64)   # Optuna + real verification

Modules, by role:

* :mod:`~currsearch.ablate.partitions`: partitions of the window batches, the matched token
  budget and the training streams (the definitions every other module uses);
* :mod:`~currsearch.ablate.subsets`: subsets as names, membership or mixture weights;
* :mod:`~currsearch.ablate.models`: the models directory (:class:`AblationModels`: base and
  partition models, manifest and checksums);
* :mod:`~currsearch.ablate.training`: training the partition models (resumable) and real
  models for unions;
* :mod:`~currsearch.ablate.merge`: the merged-model estimator (:class:`MergeEstimator`);
* :mod:`~currsearch.ablate.validate`: merged vs real models (Spearman rho, Pearson r);
* :mod:`~currsearch.ablate.search`: Optuna search over subsets and verification by real training;
* :mod:`~currsearch.ablate.results`: the typed results (:class:`SubsetValidation`,
  :class:`SubsetSearchReport`) written as ``validation.json`` / ``search.json``.

Reports: :mod:`currsearch.reports.ablate`.

Losses are eval losses in nats/token per eval set (``plan.eval_names``: the domains, then
``"all"``); perplexity is ``exp(loss)``.
"""

from .merge import MergeEstimator
from .models import FORMAT, SCHEMA_VERSION, AblationModels
from .partitions import (
    PAPER,
    Partition,
    check_partitions,
    default_partitions,
    partition_stream,
    steps_per_partition,
    union_counts,
    union_stream,
)
from .results import (
    CorrelationMetrics,
    EvalSetMetrics,
    MergedOptimum,
    SearchedSubset,
    SubsetCandidate,
    SubsetSearchRecord,
    SubsetSearchReport,
    SubsetSearchSummary,
    SubsetValidation,
    ValidatedSubset,
    ValidationCost,
)
from .search import SubsetSearchResult, run_subset_search, search_subsets, verify_subsets
from .subsets import all_subsets, parse_subsets, sample_subsets, subset_label, subset_weights
from .training import real_union, train_partitions, train_stream, train_union
from .validate import validate_subsets

__all__ = [
    "FORMAT", "PAPER", "SCHEMA_VERSION",
    "AblationModels", "CorrelationMetrics", "EvalSetMetrics", "MergeEstimator", "MergedOptimum", "Partition",
    "SearchedSubset", "SubsetCandidate", "SubsetSearchRecord", "SubsetSearchReport", "SubsetSearchResult",
    "SubsetSearchSummary", "SubsetValidation", "ValidatedSubset", "ValidationCost",
    "all_subsets", "check_partitions", "default_partitions", "parse_subsets", "partition_stream",
    "real_union", "run_subset_search",
    "sample_subsets", "search_subsets", "steps_per_partition", "subset_label", "subset_weights",
    "train_partitions", "train_stream", "train_union", "union_counts", "union_stream",
    "validate_subsets", "verify_subsets",
]
