"""Use a found order in your own training loop: a PyTorch sampler and a JSON export.

:class:`OrderSampler` yields the batch indices of an order, so a dataset whose item ``l``
is batch ``l`` of the plan is iterated in that order::

    from torch.utils.data import DataLoader
    from currsearch.export import OrderSampler
    loader = DataLoader(dataset_of_batches, batch_size=None, sampler=OrderSampler(order))

With the Hugging Face ``transformers.Trainer`` (which shuffles with its own sampler; see
transformers issue #11693), override ``_get_train_sampler`` so that the dataset, here with
one *example* per item, is read in the found order (expand a batch order to example indices
first, e.g. ``[l * B + i for l in order for i in range(B)]``)::

    from transformers import Trainer

    class OrderedTrainer(Trainer):
        def __init__(self, *args, order=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.order = order

        def _get_train_sampler(self, *args, **kwargs):
            return OrderSampler(self.order)

Keep ``per_device_train_batch_size`` equal to the plan's batch size and train one epoch, so
that step t sees batch ``order[t]``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Sampler

from .errors import OrderError
from .orders import save_order, validate_orders


class OrderSampler(Sampler[int]):
    """Yield the indices of ``order`` (one epoch), in order.

    Args:
        order: a sequence or int tensor of indices ``[n]``.
        allow_repeats: accept an order that is not a permutation of ``0..n-1`` (e.g. expanded
            example indices or a subset); indices must still be >= 0.

    Raises:
        OrderError: not a 1-D integer sequence, or (without ``allow_repeats``) not a
            permutation of ``0..n-1``.
    """

    def __init__(self, order, allow_repeats: bool = False):
        t = torch.as_tensor(order)
        if t.dim() != 1:
            raise OrderError(f"OrderSampler takes one 1-D order, got shape {tuple(t.shape)}")
        if allow_repeats:
            if t.is_floating_point() or t.dtype == torch.bool or (t.numel() and int(t.min()) < 0):
                raise OrderError("OrderSampler: indices must be non-negative integers")
            t = t.long()
        else:
            t = validate_orders(t, t.numel())
        self.order = [int(i) for i in t]

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def export_order(path: str | Path, order, **meta) -> Path:
    """Write ``{"order": [...], **meta}`` as JSON (readable by ``currsearch train --order FILE``).

    Raises:
        OrderError: ``order`` is not a permutation of ``0..T-1``.
        ConfigError: a parent of ``path`` is a file.
    """
    order = validate_orders(order, len(order))
    path = Path(path)
    save_order(path, order, **meta)  # creates the parent directory (a file in its way: ConfigError)
    return path
