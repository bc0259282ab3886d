"""Encodings of training orders and curriculum families for Optuna.

A :class:`SearchSpace` decodes an Optuna trial into an order (int64 ``[T]``, a permutation
of ``0..T-1``) with :meth:`~SearchSpace.suggest` and encodes an order back into trial
parameters with :meth:`~SearchSpace.encode` (for ``study.enqueue_trial``). Spaces, by name
(:func:`get_space`):

* ``lehmer``, ``random_keys`` (:mod:`.permutation`): every permutation (small T).
* ``block`` (:mod:`.block`): permutation of domain blocks or difficulty buckets plus a
  within-block rule.
* ``curriculum`` (:mod:`.curriculum`): difficulty ranking + linear/root/step pacing
  (DeepSpeed curriculum learning).
* ``lfr`` (:mod:`.lfr`): Learn-Focus-Review style schedule (arXiv 2409.06131), adapted.
* ``interleave`` (:mod:`.interleave`): domain proportions by weighted round robin.
* ``local`` (:mod:`.local`): orders within a few transpositions of a center (trust region).

:func:`heuristic_orders` gives named heuristic curricula (baselines and enqueued starts).
"""

from .base import BatchInfo, SearchSpace, available_spaces, get_space, register_space
from .block import BlockSpace
from .curriculum import CurriculumSpace
from .heuristics import heuristic_orders, heuristic_params
from .interleave import InterleaveSpace
from .lfr import LFRSpace, lfr_baseline
from .local import LocalSpace
from .permutation import LehmerSpace, RandomKeysSpace

__all__ = [
    "BatchInfo",
    "SearchSpace",
    "available_spaces",
    "get_space",
    "register_space",
    "BlockSpace",
    "CurriculumSpace",
    "InterleaveSpace",
    "LFRSpace",
    "LocalSpace",
    "LehmerSpace",
    "RandomKeysSpace",
    "heuristic_orders",
    "heuristic_params",
    "lfr_baseline",
]
