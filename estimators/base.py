"""The estimator contract: map candidate orders to estimated final eval losses.

An estimator is fitted once on a recorded trajectory store (``currsearch.store``), then
scores orders in batches::

    est = get_estimator("additive").fit(store)
    losses = est.estimate(orders)          # orders: int64 [n, T] -> float64 [n, E], nats/token

Estimators declare the recorded terms they need (``required_terms``); ``fit`` raises
:class:`~currsearch.errors.StoreError` naming a missing term and the record option
(``record.terms``) that provides it.
"""

from __future__ import annotations

import inspect
import json

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from currsearch.errors import ConfigError, StoreError
from currsearch.orders import validate_orders


class Estimator(ABC):
    """Base class of every surrogate.

    Subclasses set ``name`` and ``required_terms``, implement ``_fit`` and ``_estimate``, and
    declare their optional capabilities as class attributes: ``has_optimum`` (with
    ``assignment_optimum``), ``has_batch_losses`` (with ``estimate_batch_losses``) and
    ``needs_runs`` (``fit`` retrains orders for real). Callers test these attributes, never the
    methods' presence or identity.

    Attributes:
        name: registry name (``get_estimator(name)``).
        required_terms: names of store terms this estimator reads (see ``currsearch.record.TERMS``).
        eval_names: the E eval-set names, in output column order (set by ``fit``).
        T: number of batches in the window (set by ``fit``).
    """

    name: ClassVar[str] = ""
    required_terms: ClassVar[tuple[str, ...]] = ()
    #: capability: the estimator has ``assignment_optimum(eval_set) -> int64 [T]``, an order
    #: minimizing (exactly or locally, see its docstring) its own estimate
    has_optimum: ClassVar[bool] = False
    #: capability: :meth:`estimate_batch_losses` gives per-batch losses (not ``None``)
    has_batch_losses: ClassVar[bool] = False
    #: capability: ``fit`` performs real training runs (the calibrated estimators) and caches
    #: them in the store, so a backend with several workers fits once before starting them
    needs_runs: ClassVar[bool] = False
    #: with ``needs_runs``: the fewest real runs ``fit`` can work with (its ``n_runs`` argument)
    min_runs: ClassVar[int] = 0
    #: cost: an estimate recomputes the window's optimizer steps with exact Hessian-vector
    #: products (``fut1-hvp``: about 3 real runs each, measured), so a job's ledger counts its
    #: estimates by their time and a budgeted job does not search with it (trust-region rounds do)
    estimate_costs_runs: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        """Check the declared capabilities against the methods.

        Raises:
            TypeError: ``has_optimum`` without an ``assignment_optimum`` method, or
                ``has_batch_losses`` without an override of ``estimate_batch_losses``.
        """
        super().__init_subclass__(**kwargs)
        if cls.has_optimum and not callable(getattr(cls, "assignment_optimum", None)):
            raise TypeError(f"{cls.__name__} declares has_optimum but defines no assignment_optimum(eval_set)")
        if cls.has_batch_losses and cls.estimate_batch_losses is Estimator.estimate_batch_losses:
            raise TypeError(f"{cls.__name__} declares has_batch_losses but does not override estimate_batch_losses")

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.store = None
        self.eval_names: list[str] = []
        self.T = 0

    def check_terms(self, store) -> None:
        """Check the store holds ``required_terms`` (reads only its manifest).

        Raises:
            StoreError: a required term is missing from the store, naming the ``record.terms`` that provide it.
        """
        missing = [t for t in self.required_terms if t not in store.terms]
        if missing:
            raise StoreError(
                f"estimator {self.name!r} needs the recorded term(s) {missing}, which the store at "
                f"{str(store.path)!r} lacks (it has {sorted(store.terms)}); re-record with "
                f"record.terms including {missing} (e.g. --set 'record.terms={json.dumps(sorted(set(store.terms) | set(missing)))}')"
            )

    def fit(self, store) -> "Estimator":
        """Check the store holds ``required_terms`` (:meth:`check_terms`), then load what the estimator needs.

        Raises:
            StoreError: a required term is missing from the store.
        """
        self.check_terms(store)
        self.store = store
        self.eval_names = list(store.eval_names)
        self.T = store.T
        self._fit(store)
        return self

    def estimate(self, orders) -> torch.Tensor:
        """Estimated final loss per eval set for each order.

        Args:
            orders: int64 ``[n, T]`` (or ``[T]``) permutations of ``0..T-1``.

        Returns:
            float64 ``[n, E]`` (or ``[E]`` for one order) in nats/token, columns in
            ``eval_names`` order, on the estimator's device.

        Raises:
            OrderError: invalid orders. RuntimeError: ``fit`` was not called.
        """
        if self.store is None:
            raise RuntimeError(f"call {type(self).__name__}.fit(store) before estimate()")
        o = validate_orders(orders, self.T)
        single = o.dim() == 1
        out = self._estimate(o.view(-1, self.T).to(self.device))
        return out[0] if single else out

    def estimate_batch_losses(self, orders) -> torch.Tensor | None:
        """Estimated final loss on each window batch B_l (memorization), float64 ``[n, T]``;
        ``None`` where the estimator cannot give it (``has_batch_losses`` is False)."""
        return None

    def estimate_with_batch_losses(self, orders) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Eval losses and per-batch losses of the same orders in one call.

        Args:
            orders: int64 ``[n, T]`` (or ``[T]``) permutations of ``0..T-1``.

        Returns:
            ``(eval_losses, batch_losses)``: float64 ``[n, E]`` as :meth:`estimate`, and float64
            ``[n, T]`` as :meth:`estimate_batch_losses` (column l: estimated final loss on
            window batch B_l, nats/token) or ``None``; rows lose their n dimension for one order.
            The default calls both methods; estimators whose two outputs share one expensive
            computation (``fut1-hvp``: the final parameters) override it to run it once.

        Raises:
            OrderError: invalid orders. RuntimeError: ``fit`` was not called.
        """
        return self.estimate(orders), self.estimate_batch_losses(orders)

    def fit_orders(self) -> torch.Tensor:
        """The orders ``fit`` retrained for real, int64 ``[n_runs, T]`` (``needs_runs`` estimators,
        after ``fit``; their ``runs["orders"]``): a fidelity benchmark keeps its held-out orders
        disjoint from them.

        Raises:
            RuntimeError: the estimator performs no runs (``needs_runs`` False) or was not fitted.
        """
        self._check_runs()
        return torch.tensor(self.runs["orders"], dtype=torch.int64)

    def fit_runs_read_back(self) -> tuple[float, int]:
        """The real runs ``fit`` read back from the store's calibration caches instead of
        training them (``needs_runs`` estimators, after ``fit``; ``runs["read_back"]``): their
        recorded training wall seconds, summed (seconds), and how many have no recorded time
        (cached by a currsearch that did not keep it). A job's ledger adds the seconds to its
        fit phase (:mod:`currsearch.ledger`).

        Raises:
            RuntimeError: as :meth:`fit_orders`.
        """
        self._check_runs()
        back = [t for t, rb in zip(self.runs["seconds"], self.runs["read_back"]) if rb]
        return float(sum(t for t in back if t is not None)), sum(t is None for t in back)

    def _check_runs(self) -> None:
        if not self.needs_runs or self.store is None:
            raise RuntimeError(f"{type(self).__name__} has no fit runs (needs_runs={self.needs_runs}, fitted={self.store is not None})")

    @abstractmethod
    def _fit(self, store) -> None: ...

    @abstractmethod
    def _estimate(self, orders: torch.Tensor) -> torch.Tensor: ...


# filled by @register; the built-in estimators register when the package loads (importing
# estimators.base runs estimators/__init__.py first, which imports every built-in module)
_REGISTRY: dict[str, type[Estimator]] = {}


def register(cls: type[Estimator]) -> type[Estimator]:
    """Class decorator adding an estimator to the registry under ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def get_estimator(name: str, **kwargs) -> Estimator:
    """Instantiate a registered estimator by name.

    Raises:
        ConfigError: unknown name (the message lists the known ones), a keyword the
            estimator does not take (e.g. ``n_runs``, a fit's real runs, for an estimator
            that is not fitted to real runs; the message lists the ones it takes), or an
            option value the estimator refuses (its ``ValueError``, named).
    """
    if name not in _REGISTRY:
        raise ConfigError(f"unknown estimator {name!r}; choose one of {sorted(_REGISTRY)}")
    cls = _REGISTRY[name]
    params = inspect.signature(cls).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            hint = " (--fit-runs applies only to estimators fitted to real runs)" if "n_runs" in unknown else ""
            raise ConfigError(f"estimator {name!r} takes no option(s) {unknown}{hint}; "
                              f"its options are {sorted(params) or 'none'}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:  # an option value the estimator refuses: one clear error, not a traceback
        raise ConfigError(f"estimator {name!r}: {err}") from None


def available() -> list[str]:
    """Names of the registered estimators."""
    return sorted(_REGISTRY)
