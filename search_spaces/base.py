"""The search-space contract: decode an Optuna trial into a training order, and back.

A :class:`SearchSpace` turns the parameters of an Optuna trial into an order, an int64
tensor ``[T]`` holding a permutation of ``0..T-1`` (see :mod:`currsearch.orders`): position
t holds the batch used at step t. :meth:`SearchSpace.encode` inverts
:meth:`SearchSpace.suggest`: it returns trial parameters such that
``study.enqueue_trial(params)`` (or ``optuna.trial.FixedTrial(params)``) followed by
``suggest`` gives back exactly the same order, and raises
:class:`~currsearch.errors.OrderError` for an order the space cannot produce.

What a space may use about the batches is a :class:`BatchInfo`: the domain of each batch and
a difficulty score (higher = harder; by default the plan's ``unigram_nll`` proxy).

Spaces are registered by name; :func:`get_space` builds one::

    space = get_space("block", BatchInfo.from_plan(plan), by="difficulty", n_buckets=4)
    order = space.suggest(trial)          # int64 [T]
    study.enqueue_trial(space.encode(order))
"""

from __future__ import annotations

import importlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import optuna
import torch

from currsearch.errors import ConfigError, OrderError
from currsearch.orders import validate_orders


@dataclass
class BatchInfo:
    """What a search space knows about the T batches of a plan.

    Attributes:
        domains: domain name of each batch, length T (``BatchPlan.domains``).
        difficulty: float64 ``[T]``, higher = harder: e.g. the plan's ``unigram_nll``
            (nats/token) or a per-batch reference loss. Only its ranking matters to the
            spaces here; ties are broken by batch index.
        reference_order: int64 ``[T]``, the order a trajectory store was recorded along
            (``store.reference_order``), or None for ``0..T-1``; the ``local`` space centres on it.
    """

    domains: list[str]
    difficulty: torch.Tensor
    reference_order: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.domains = [str(d) for d in self.domains]
        diff = torch.as_tensor(self.difficulty, dtype=torch.float64).flatten()
        if diff.numel() != len(self.domains):
            raise ConfigError(
                f"BatchInfo: difficulty has {diff.numel()} values but there are {len(self.domains)} batches; "
                "give one difficulty per batch"
            )
        if not torch.isfinite(diff).all():
            bad = (~torch.isfinite(diff)).nonzero().flatten().tolist()[:10]
            raise ConfigError(f"BatchInfo: difficulty must be finite; batches {bad} are not")
        if not self.domains:
            raise ConfigError("BatchInfo: a plan needs at least one batch")
        self.difficulty = diff

    @classmethod
    def from_plan(cls, plan, difficulty=None) -> "BatchInfo":
        """Build from a :class:`~currsearch.plan.BatchPlan`.

        Args:
            plan: the plan, or a ``TrajectoryStore`` recorded from it (uses ``.domains`` and,
                by default, ``.metadata``).
            difficulty: optional float ``[T]`` (tensor, array or list), higher = harder;
                default: each batch's ``metadata["unigram_nll"]``.

        Raises:
            ConfigError: a length mismatch, a non-finite value, or no ``unigram_nll`` in the
                metadata when ``difficulty`` is not given.
        """
        if difficulty is None:
            try:
                difficulty = [float(m["unigram_nll"]) for m in plan.metadata]
            except (KeyError, TypeError):
                raise ConfigError(
                    "BatchInfo.from_plan: plan.metadata lacks 'unigram_nll'; pass difficulty= explicitly"
                ) from None
        return cls(domains=list(plan.domains), difficulty=torch.as_tensor(difficulty, dtype=torch.float64),
                   reference_order=getattr(plan, "reference_order", None))

    @property
    def T(self) -> int:
        """Number of batches."""
        return len(self.domains)

    @property
    def domain_names(self) -> list[str]:
        """Sorted distinct domain names (the canonical domain order)."""
        return sorted(set(self.domains))

    def domain_index(self) -> torch.Tensor:
        """int64 ``[T]``: index of each batch's domain in :attr:`domain_names`."""
        pos = {d: i for i, d in enumerate(self.domain_names)}
        return torch.tensor([pos[d] for d in self.domains], dtype=torch.int64)

    def by_difficulty(self, descending: bool = False) -> torch.Tensor:
        """int64 ``[T]``: batch indices sorted easy-to-hard (or hard-to-easy with
        ``descending``); ties keep ascending batch index."""
        key = -self.difficulty if descending else self.difficulty
        return torch.sort(key, stable=True).indices


# ---------------------------------------------------------------- helpers


def lehmer_decode(code: list[int], n: int) -> list[int]:
    """Permutation of ``0..n-1`` from a Lehmer code (Optuna FAQ, "How can I deal with
    permutation as a parameter?"): ``code[i]`` in ``0..n-1-i`` picks the element of that
    rank among those not yet placed. ``code`` may omit the last entry (always 0)."""
    rest = list(range(n))
    out = [rest.pop(int(c)) for c in code]
    out += rest
    return out


def lehmer_encode(perm: list[int]) -> list[int]:
    """Lehmer code of a permutation of ``0..n-1`` (length n; the last entry is 0)."""
    rest = list(range(len(perm)))
    code = []
    for p in perm:
        i = rest.index(int(p))
        code.append(i)
        rest.pop(i)
    return code


def round_half_up(x: float) -> int:
    """``floor(x + 0.5)``: round to nearest, halves up (not banker's rounding)."""
    return int(math.floor(x + 0.5))


# ---------------------------------------------------------------- the contract


class SearchSpace(ABC):
    """An encoding of training orders as Optuna parameters.

    Subclasses set ``name`` and ``default_options`` (the accepted keyword options with
    their defaults) and implement :meth:`suggest` and :meth:`_encode`.

    Attributes:
        info: the :class:`BatchInfo`.
        T: number of batches.
        options: ``default_options`` updated with the given options.
    """

    name: ClassVar[str]
    default_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, info: BatchInfo, **options) -> None:
        if not isinstance(info, BatchInfo):
            raise ConfigError(f"search space {self.name!r} needs a BatchInfo, got {type(info).__name__}")
        unknown = sorted(set(options) - set(self.default_options))
        if unknown:
            known = ", ".join(sorted(self.default_options)) or "none"
            raise ConfigError(f"search space {self.name!r}: unknown option(s) {unknown}; known options: {known}")
        self.info = info
        self.T = info.T
        self.options = {**self.default_options, **options}

    # -- decoding
    @abstractmethod
    def suggest(self, trial: optuna.trial.BaseTrial) -> torch.Tensor:
        """Ask ``trial`` for this space's parameters and decode them into an order
        (int64 ``[T]``, a permutation of ``0..T-1``)."""

    def _finish(self, order) -> torch.Tensor:
        return validate_orders(torch.as_tensor(order, dtype=torch.int64), self.T)

    # -- encoding
    def encode(self, order) -> dict[str, Any]:
        """Trial parameters that decode to exactly ``order``.

        ``study.enqueue_trial(space.encode(order))`` then ``space.suggest(study.ask())``
        (or ``space.suggest(optuna.trial.FixedTrial(params))``) returns ``order``. Values
        are plain Python ints, floats and strings.

        Raises:
            OrderError: ``order`` is not a valid order for T batches, or this space cannot
                produce it (the message says why).
        """
        order = validate_orders(order, self.T)
        if order.dim() != 1:
            raise OrderError(f"encode takes one order [T], got shape {tuple(order.shape)}")
        params = self._encode(order)
        back = self.suggest(optuna.trial.FixedTrial(params))
        if not torch.equal(back, order):  # a bug, not a user error; say so clearly
            raise OrderError(
                f"search space {self.name!r}: internal error, parameters {params} decode to a different order"
            )
        return params

    @abstractmethod
    def _encode(self, order: torch.Tensor) -> dict[str, Any]:
        """Parameters for a validated int64 ``[T]`` order; raise OrderError if none."""

    def representable(self, order) -> bool:
        """Whether :meth:`encode` succeeds for ``order``."""
        try:
            self.encode(order)
        except OrderError:
            return False
        return True

    def default_params(self) -> list[dict[str, Any]]:
        """Parameter sets of this space's own natural heuristics (for ``enqueue_trial``);
        may be empty. See also :func:`search_spaces.heuristics.heuristic_params`."""
        return []

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}(T={self.T}{', ' if opts else ''}{opts})"


# ---------------------------------------------------------------- registry

_REGISTRY: dict[str, type[SearchSpace]] = {}


def register_space(cls: type[SearchSpace]) -> type[SearchSpace]:
    """Class decorator: register a :class:`SearchSpace` under ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def available_spaces() -> list[str]:
    """Sorted names of the registered spaces."""
    importlib.import_module("search_spaces")  # registers the built-in spaces
    return sorted(_REGISTRY)


def get_space(name: str, info: BatchInfo, **options) -> SearchSpace:
    """Build the search space registered as ``name`` for ``info`` with ``options``.

    Raises:
        ConfigError: an unknown name (the message lists the known ones) or option.
    """
    known = available_spaces()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown search space {name!r}; known spaces: {', '.join(known)}")
    return _REGISTRY[name](info, **options)
