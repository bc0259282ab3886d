"""Typed results of the data ablations (Na et al. 2024, arXiv 2410.15661): the validation of the
merged-model proxy (:func:`~currsearch.ablate.validate_subsets`) and the verified subset search
(:func:`~currsearch.ablate.run_subset_search`, :func:`~currsearch.ablate.verify_subsets`).

Every result is a frozen dataclass; :func:`currsearch.results.to_json` gives the form written
to ``validation.json`` / ``search.json`` (keys in field order) and ``from_json`` reads it back
(a JSON ``null`` metric is read as NaN). Losses are eval losses in nats/token per eval set
(``plan.eval_names``: the domains, then ``"all"``); times are wall seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

from .partitions import Partition


def _float(x) -> float:
    """A JSON number, or NaN for ``null`` (NaN is written as null)."""
    return float("nan") if x is None else float(x)


def _losses(d: dict) -> dict[str, float]:
    return {k: _float(v) for k, v in d.items()}


def _trained_subset(cls, d: dict, loss_keys: tuple[str, ...]):
    """``cls`` (:class:`ValidatedSubset` or :class:`SubsetCandidate`) from its JSON entry ``d``:
    the loss dicts ``loss_keys`` read by :func:`_losses`, the other fields typed."""
    return cls(**{**d, **{k: _losses(d[k]) for k in loss_keys}, "weights": [float(x) for x in d["weights"]],
                  "steps": int(d["steps"]), "seconds": float(d["seconds"]),
                  "reused_partition_model": bool(d["reused_partition_model"])})


@dataclass(frozen=True)
class CorrelationMetrics:
    """Merged estimates vs real losses of a set of subsets, on one eval set.

    Attributes:
        n: subsets compared.
        spearman: Spearman rho between merged and real losses (the perplexity rank alike).
        pearson_ppl: Pearson r between merged and real perplexity (``exp(loss)``).
        pearson_loss: Pearson r between merged and real loss (nats/token).
        absdiff: mean ``|merged - real|`` (nats/token).
        spread: ``max - min`` of the real losses (nats/token).

    The correlations are NaN when ``n < 3`` or either side is constant; ``absdiff`` and
    ``spread`` are NaN when ``n == 0``.
    """

    n: int
    spearman: float
    pearson_ppl: float
    pearson_loss: float
    absdiff: float
    spread: float

    @classmethod
    def from_json(cls, d: dict) -> CorrelationMetrics:
        """The metrics of one ``validation.json`` metrics entry."""
        return cls(int(d["n"]), _float(d["spearman"]), _float(d["pearson_ppl"]), _float(d["pearson_loss"]),
                   _float(d["absdiff"]), _float(d["spread"]))


def _read_only(self, *args, **kwargs):
    raise TypeError("EvalSetMetrics is read-only")


class EvalSetMetrics(dict):
    """The metrics of one eval set, as a read-only dict ``{"all", "size>=2", "by_size"}``.

    A dict rather than a dataclass because its JSON key ``"size>=2"`` (kept from the earlier
    ``validation.json``) is not a Python identifier; the attributes give typed access.

    Attributes:
        all: :class:`CorrelationMetrics` over all subsets.
        multi: over subsets of >= 2 partitions (JSON ``"size>=2"``; singletons are exact by
            construction: the real singleton model is the partition model).
        by_size: ``{str(size): CorrelationMetrics}`` among subsets of one size (equal real
            token budget), for each size >= 2 with >= 3 subsets.
    """

    __slots__ = ()
    __setitem__ = __delitem__ = __ior__ = _read_only
    clear = pop = popitem = setdefault = update = _read_only

    def __init__(self, all: CorrelationMetrics, multi: CorrelationMetrics, by_size: dict[str, CorrelationMetrics]):
        super().__init__({"all": all, "size>=2": multi, "by_size": dict(by_size)})

    @property
    def all(self) -> CorrelationMetrics:
        return self["all"]

    @property
    def multi(self) -> CorrelationMetrics:
        return self["size>=2"]

    @property
    def by_size(self) -> dict[str, CorrelationMetrics]:
        return self["by_size"]

    def __reduce__(self):  # pickling (e.g. Ray): rebuild through __init__, not __setitem__
        return type(self), (self.all, self.multi, self.by_size)

    @classmethod
    def from_json(cls, d: dict) -> EvalSetMetrics:
        """The metrics of one eval set of ``validation.json``."""
        return cls(CorrelationMetrics.from_json(d["all"]), CorrelationMetrics.from_json(d["size>=2"]),
                   {k: CorrelationMetrics.from_json(v) for k, v in d["by_size"].items()})


@dataclass(frozen=True)
class ValidatedSubset:
    """One subset: merged estimate next to the model trained for real on the union.

    Attributes:
        label: e.g. ``"bible+python"``; size: partitions in the subset.
        weights: membership ``[K]`` (1.0 per member, else 0.0).
        merged: ``{eval set: loss}`` of the uniform parameter average (nats/token).
        real: ``{eval set: loss}`` of the real union model (nats/token).
        steps: training steps of the real model (``size * steps_per_partition``).
        seconds: wall seconds of its training (a reused partition model: its stored time).
        reused_partition_model: a singleton, read from the stored partition model.
    """

    label: str
    size: int
    weights: list[float]
    merged: dict[str, float]
    real: dict[str, float]
    steps: int
    seconds: float
    reused_partition_model: bool

    @classmethod
    def from_json(cls, d: dict) -> ValidatedSubset:
        """The subset of one ``validation.json`` ``subsets`` entry."""
        return _trained_subset(cls, {**d, "size": int(d["size"])}, ("merged", "real"))


@dataclass(frozen=True)
class ValidationCost:
    """What the proxy saves, in wall seconds.

    Attributes:
        estimate_seconds_per_subset: merged estimate, seconds per subset.
        real_seconds_per_subset: real union training, seconds per subset.
        speedup: ``real_seconds_per_subset / estimate_seconds_per_subset``.
        partition_training_seconds: training the partition models once (from the manifest).
    """

    estimate_seconds_per_subset: float
    real_seconds_per_subset: float
    speedup: float
    partition_training_seconds: float


@dataclass(frozen=True)
class SubsetValidation:
    """Merged-model estimates vs real union training (:func:`~currsearch.ablate.validate_subsets`).

    Attributes:
        method: the paper (``PAPER``); models: the models directory.
        partitions: the K :class:`Partition` s; eval_names: the E eval sets.
        steps_per_partition: steps of each partition model (a union of |S| gets ``|S| *`` this).
        exhaustive: all ``2^K - 1`` subsets (else a seeded sample); seed: seed of the sample.
        subsets: one :class:`ValidatedSubset` per subset, in the order evaluated.
        metrics: ``{eval set: EvalSetMetrics}``; cost: :class:`ValidationCost`.
    """

    method: str
    models: str
    partitions: list[Partition]
    eval_names: list[str]
    steps_per_partition: int
    exhaustive: bool
    seed: int
    subsets: list[ValidatedSubset]
    metrics: dict[str, EvalSetMetrics]
    cost: ValidationCost

    @classmethod
    def from_json(cls, d: dict) -> SubsetValidation:
        """The result of a ``validation.json``."""
        return cls(d["method"], d["models"], [Partition(p["name"], tuple(p["batches"])) for p in d["partitions"]],
                   list(d["eval_names"]), int(d["steps_per_partition"]), bool(d["exhaustive"]), int(d["seed"]),
                   [ValidatedSubset.from_json(r) for r in d["subsets"]],
                   {k: EvalSetMetrics.from_json(v) for k, v in d["metrics"].items()},
                   ValidationCost(**{k: _float(v) for k, v in d["cost"].items()}))


@dataclass(frozen=True)
class SubsetCandidate:
    """One candidate subset/mixture trained for real (:func:`~currsearch.ablate.verify_subsets`).

    Attributes:
        label: e.g. ``"bible+python"`` (``"bible:0.75+python:0.25"`` for a mixture).
        weights: normalized weights ``[K]`` (sum 1).
        estimated: ``{eval set: merged-model loss}`` (nats/token).
        verified: ``{eval set: real-model loss}`` (nats/token).
        steps: training steps of the real model; seconds: its wall seconds.
        reused_partition_model: a single partition, read from its stored model.
    """

    label: str
    weights: list[float]
    estimated: dict[str, float]
    verified: dict[str, float]
    steps: int
    seconds: float
    reused_partition_model: bool

    @classmethod
    def from_json(cls, d: dict) -> SubsetCandidate:
        """The candidate of one ``search.json`` ``candidates`` entry."""
        return _trained_subset(cls, d, ("estimated", "verified"))


@dataclass(frozen=True)
class SearchedSubset:
    """One distinct subset/mixture scored by the search: label, normalized ``weights`` ``[K]``,
    ``estimates`` ``{eval set: merged loss}`` (nats/token)."""

    label: str
    weights: list[float]
    estimates: dict[str, float]


@dataclass(frozen=True)
class SubsetSearchRecord:
    """The Optuna search of a :func:`~currsearch.ablate.run_subset_search`.

    Attributes:
        study: study name; storage: its storage (a ``.journal`` path or URL), or None (in memory).
        n_trials: finished trials in the study; n_run: trials run by this call.
        seconds: wall seconds of the search (verification excluded).
        weights: mixture weights searched too; sampler: sampler name.
        distinct: distinct subsets/mixtures scored.
        top: the best ``max(top_k, 10)`` :class:`SearchedSubset` s, best first.
    """

    study: str
    storage: str | None
    n_trials: int
    n_run: int
    seconds: float
    weights: bool
    sampler: str
    distinct: int
    top: list[SearchedSubset]

    @classmethod
    def from_json(cls, d: dict) -> SubsetSearchRecord:
        """The record of a ``search.json`` ``search`` entry."""
        return cls(d["study"], d["storage"], int(d["n_trials"]), int(d["n_run"]), float(d["seconds"]), bool(d["weights"]),
                   d["sampler"], int(d["distinct"]),
                   [SearchedSubset(t["label"], [float(x) for x in t["weights"]], _losses(t["estimates"])) for t in d["top"]])


@dataclass(frozen=True)
class MergedOptimum:
    """The exhaustive optimum of the merged estimate: subset ``label`` and its ``estimated`` loss (nats/token)."""

    label: str
    estimated: float


@dataclass(frozen=True)
class SubsetSearchSummary:
    """The best verified searched subset against the full set and the single partitions, on
    ``objective`` (real losses, nats/token).

    Attributes:
        objective: the eval set.
        best_searched: candidate name (``search_i``) with the lowest real loss, or None;
            best_searched_label, best_searched_loss: its label and loss (None without one).
        full_loss: real loss of the full set.
        best_single: the best ``single:<partition>`` candidate; best_single_loss: its loss.
        beats_full, best_is_full, beats_best_single: comparisons of the best searched subset
            (None without one).
        merged_optimum: the exhaustive :class:`MergedOptimum` (None with mixture weights or K > 10);
        search_found_merged_optimum: the search's best estimate is that optimum (None likewise).
    """

    objective: str
    best_searched: str | None
    best_searched_label: str | None
    best_searched_loss: float | None
    full_loss: float
    best_single: str
    best_single_loss: float
    beats_full: bool | None
    best_is_full: bool | None
    beats_best_single: bool | None
    merged_optimum: MergedOptimum | None
    search_found_merged_optimum: bool | None

    @classmethod
    def from_json(cls, d: dict) -> SubsetSearchSummary:
        """The summary of a ``search.json``."""
        mo = d["merged_optimum"]
        return cls(**{**d, "merged_optimum": MergedOptimum(mo["label"], float(mo["estimated"])) if mo else None})


@dataclass(frozen=True)
class SubsetSearchReport:
    """Subset search verified by real training (:func:`~currsearch.ablate.run_subset_search`).

    Attributes:
        method: the paper (``PAPER``); models: the models directory.
        partitions: the K partition names; eval_names: the E eval sets.
        search: the :class:`SubsetSearchRecord`.
        candidates: ``{name: SubsetCandidate}``: ``search_1..k`` (best estimate first), ``full``
            and ``single:<partition>`` for each partition.
        summary: the :class:`SubsetSearchSummary`.
    """

    method: str
    models: str
    partitions: list[str]
    eval_names: list[str]
    search: SubsetSearchRecord
    candidates: dict[str, SubsetCandidate]
    summary: SubsetSearchSummary

    @classmethod
    def from_json(cls, d: dict) -> SubsetSearchReport:
        """The result of a ``search.json``."""
        return cls(d["method"], d["models"], list(d["partitions"]), list(d["eval_names"]),
                   SubsetSearchRecord.from_json(d["search"]),
                   {k: SubsetCandidate.from_json(v) for k, v in d["candidates"].items()},
                   SubsetSearchSummary.from_json(d["summary"]))
