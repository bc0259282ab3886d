"""The merged-model estimator of data ablations (Na et al. 2024, arXiv 2410.15661).

The eval loss of a model trained on a union of partitions is estimated by the eval loss of
the (weighted) parameter average of the partition models (:class:`MergeEstimator`).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .models import as_models
from .subsets import subset_weights


class MergeEstimator:
    """Eval loss of (weighted) parameter averages of partition models.

    The proxy of Na et al. 2024 (arXiv 2410.15661; modular training evaluation strategy):
    the loss of a model trained on a union of partitions S is estimated by the loss of
    ``theta_S = sum_k w_k theta_k`` with ``w_k = 1/|S|`` on S (uniform average) or given
    mixture weights (an extension: weighted averages as a proxy for a data mixture).

    Args:
        models: an :class:`AblationModels` or its directory.
        chunk: merged models materialized at a time (memory: ``chunk * P`` floats).

    Attributes:
        names: the K partition names (columns of subsets); eval_names: the E eval sets.
    """

    def __init__(self, models, chunk: int = 64):
        self.models = as_models(models)
        self.trainer = self.models.trainer()
        self.names = list(self.models.names)
        self.K = self.models.K
        self.eval_names = list(self.models.eval_names)
        self.chunk = chunk
        self.thetas = self.models.thetas(self.trainer.device)  # [K, P]
        self._thetas64 = self.thetas.to(torch.float64)
        self._cache: dict[tuple, torch.Tensor] = {}  # normalized weights (exact) -> [E]

    def weights(self, subsets) -> torch.Tensor:
        """Normalized weights float64 ``[n, K]`` of ``subsets`` (see :func:`subset_weights`)."""
        return subset_weights(subsets, self.names)

    def merge(self, subsets) -> torch.Tensor:
        """Merged parameters ``[n, P]`` (model dtype): ``W @ Theta`` with W the normalized
        weights ``[n, K]`` and Theta the partition models ``[K, P]`` (float64 arithmetic, so a
        one-hot row returns its partition model bit for bit).

        Raises:
            ConfigError: invalid subsets (:func:`subset_weights`).
        """
        w = self.weights(subsets).to(self.thetas.device)
        return (w @ self._thetas64).to(self.thetas.dtype)

    def estimate(self, subsets, progress: bool = False) -> torch.Tensor:
        """Estimated eval loss of training on each subset/mixture.

        Args:
            subsets: bool ``[n, K]`` membership (uniform average), float ``[n, K]`` mixture
                weights (normalized per row), or strings such as ``"bible+python"``.

        Returns:
            float64 ``[n, E]``: eval loss (nats/token) of each merged model per eval set
            (``eval_names`` order); perplexity is ``exp`` of it. Results are memoized per
            normalized weight vector, so a repeated subset is evaluated once.

        Raises:
            ConfigError: an empty subset, an unknown name, a negative or non-finite weight, a
                wrong number of columns.
        """
        w = self.weights(subsets)
        keys = [tuple(r) for r in w.tolist()]
        todo = list(dict.fromkeys(k for k in keys if k not in self._cache))
        bar = None
        if progress and todo:
            bar = tqdm(total=len(todo), desc="merged models", unit="subset")
        W = torch.tensor(todo, dtype=torch.float64, device=self.thetas.device).view(-1, self.K)
        for i in range(0, W.shape[0], self.chunk):
            merged = (W[i : i + self.chunk] @ self._thetas64).to(self.thetas.dtype)  # [c, P]
            for j, theta in enumerate(merged):
                self._cache[todo[i + j]] = self.trainer.evaluate(theta)
            if bar is not None:
                bar.update(merged.shape[0])
        if bar is not None:
            bar.close()
        out = torch.empty(w.shape[0], len(self.eval_names), dtype=torch.float64)
        for i, k in enumerate(keys):
            out[i] = self._cache[k]
        return out
