"""Gradient kernels shared by the recorder (:mod:`currsearch.record`) and the ``fut1-hvp``
estimator (:mod:`estimators.hvp`): the clipped gradients of many batches at one parameter
vector, and the gradients of the eval-set losses.

Both evaluate the Trainer's flat model (:class:`~currsearch.model.FlatModel`): its
``loss(theta, batch)`` is the mean next-token loss in nats/token.
"""

from __future__ import annotations

import torch

from .train import Trainer


def batch_gradients(trainer: Trainer, theta: torch.Tensor, batches: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped gradients and losses of many batches at one ``theta``.

    Each batch's gradient is clipped to global norm ``optim.grad_clip`` as the optimizer does
    (``clip_grad``, row by row). All batches of a chunk go through one ``torch.func.vmap`` of
    ``torch.func.grad_and_value``.

    Args:
        trainer: its flat model and ``cfg.optim.grad_clip``.
        theta: float ``[P]`` parameters (the model dtype, on its device).
        batches: int64 ``[n, batch_size, seq_len]``.
        chunk: batches per ``vmap`` call (bounds activation memory).

    Returns:
        ``(grads float32 [n, P], losses float64 [n])`` (losses in nats/token).
    """
    fm = trainer.model
    grad_fn = torch.func.vmap(torch.func.grad_and_value(fm.loss), in_dims=(None, 0))
    gs, ls = [], []
    for i in range(0, batches.shape[0], chunk):
        g, l = grad_fn(theta, batches[i : i + chunk].to(fm.device))
        gs.append(g)
        ls.append(l)
    grads = torch.cat(gs)
    clip = trainer.cfg.optim.grad_clip
    if clip is not None:  # clip_grad, row by row
        grads = grads * torch.clamp(clip / (torch.linalg.vector_norm(grads, dim=1, keepdim=True) + 1e-6), max=1.0)
    return grads, torch.cat(ls).double()


def eval_gradients(trainer: Trainer, theta: torch.Tensor) -> torch.Tensor:
    """Gradients of each eval set's mean loss at ``theta``: float32 ``[E, P]``.

    Rows follow ``trainer.plan.eval_names`` (the domains, then ``all``). The ``all`` row is the
    size-weighted mean of the domain rows (the same definition as ``Trainer.evaluate``); each
    domain's gradient is accumulated over chunks of ``train.eval_batch_size`` sequences.

    Args:
        trainer: its flat model, plan (eval sets) and ``cfg.train.eval_batch_size``.
        theta: float ``[P]`` parameters.
    """
    p, fm, bs = trainer.plan, trainer.model, trainer.cfg.train.eval_batch_size
    rows, sizes = [], []
    for name in p.domain_names:
        seqs = p.eval_sets[name]
        g = torch.zeros_like(theta)
        for i in range(0, seqs.shape[0], bs):
            chunk = seqs[i : i + bs]
            g += fm.grad(theta, chunk.to(fm.device))[1] * (chunk.shape[0] / seqs.shape[0])
        rows.append(g)
        sizes.append(seqs.shape[0])
    w = torch.tensor(sizes, dtype=theta.dtype, device=theta.device) / sum(sizes)
    rows.append((torch.stack(rows) * w[:, None]).sum(0))
    return torch.stack(rows)
