"""What a benchmark regime looks like: model size, how far the window starts beyond unigram
statistics, what one real run costs against the default config, and how much the order moves
the final loss.

A regime is worth measuring estimators on only if (issue 14) its window starts well below the
unigram-entropy baseline of the eval sets (the model has learned more than token
frequencies), one run costs much more than a default run (otherwise brute force is cheap),
and the final loss of random orders spreads enough to rank them (std >= 0.002 nats/token on
``all``). :func:`measure_regime` measures all of it with real training::

    result = measure_regime(load_config("examples/medium.toml"), n_random=10)

Timing: each real run of the config is followed by one real run of the baseline config (by
default the defaults, :class:`~currsearch.config.Config`) in the same process, so both see the
same machine load; a run's seconds are the wall time of :meth:`Trainer.train` (window and
final evaluation; the warm-up phases are done, and cached, before timing starts). Run it
single-threaded (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``) for the issue's numbers.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .config import Config
from .errors import ConfigError
from .fidelity import heldout_orders
from .train import Trainer


@dataclass
class OrderLoss:
    """Final eval losses of one real run.

    Attributes:
        name: held-out order name (:func:`currsearch.fidelity.heldout_orders`), e.g. ``"random-03"``.
        kind: ``"random"``, ``"domain-block"``, ``"easy-to-hard"`` or ``"hard-to-easy"``.
        order: the T batch indices.
        eval_loss: ``{eval set: nats/token}`` after the window.
        seconds: wall seconds of the run (window and final evaluation).
    """

    name: str
    kind: str
    order: list[int]
    eval_loss: dict[str, float]
    seconds: float


@dataclass
class RegimeResult:
    """Measurements of one regime (see the module docstring); losses in nats/token.

    Attributes:
        config: the measured config (dict); baseline_config: the config of the cost baseline.
        params: P, parameters of the model; baseline_params: the baseline's.
        T: window steps; warmup_steps: steps of the warm-up phase; tokens_per_step: batch_size * seq_len.
        threads: torch intra-op threads during the measurement.
        load_average: the machine's 1-minute load average (``os.getloadavg``) before and after the
            runs (timings on a shared machine are comparable only side by side).
        warmup_seconds: wall seconds to reach the window start (training the warm-up phase, or
            loading it from the cache when ``warmup_cached``).
        eval_names: the eval sets.
        unigram_baseline: per eval set, the unigram-entropy baseline (:func:`currsearch.plan.unigram_baseline`).
        window_start_loss: per eval set, the loss at the window start.
        mixed_continuation_loss: per eval set, the loss after T steps of mixed warm-up batches
            from the window start (:func:`mixed_continuation`; below ``window_start_loss`` when
            the window is a phase of real learning).
        below_baseline: per eval set, ``unigram_baseline - window_start_loss``.
        run_seconds: seconds of each real run of the config, in run order.
        baseline_run_seconds: seconds of the baseline run made after each of them.
        cost_ratio: ``mean(run_seconds) / mean(baseline_run_seconds)``.
        random: the random orders' runs; random_mean, random_std: mean and sample std (ddof 1) of
            their final ``main_eval`` loss.
        structured: the structured orders' runs; structured_min, structured_max: the range of
            their final ``main_eval`` loss.
        main_eval: the eval set of the summary numbers (``"all"``).
    """

    config: dict
    baseline_config: dict
    params: int
    baseline_params: int
    T: int
    warmup_steps: int
    tokens_per_step: int
    threads: int
    load_average: list[float]
    warmup_seconds: float
    warmup_cached: bool
    eval_names: list[str]
    unigram_baseline: dict[str, float]
    window_start_loss: dict[str, float]
    mixed_continuation_loss: dict[str, float]
    below_baseline: dict[str, float]
    run_seconds: list[float]
    baseline_run_seconds: list[float]
    cost_ratio: float
    main_eval: str
    random: list[OrderLoss]
    random_mean: float
    random_std: float
    structured: list[OrderLoss]
    structured_min: float
    structured_max: float


def few_structured(trainer: Trainer, seed: int = 0) -> list:
    """A few structured orders of ``trainer``'s plan (:func:`currsearch.fidelity.heldout_orders`):
    for each domain, the first domain-block order that ends with it (the last domain moves the
    final loss most), then easy-to-hard and hard-to-easy.

    Returns:
        :class:`~currsearch.fidelity.HeldoutOrder` list (without the reference order).
    """
    difficulty = torch.tensor([m["unigram_nll"] for m in trainer.plan.metadata], dtype=torch.float64)
    orders = heldout_orders(trainer.T, trainer.plan.domains, difficulty, n_random=0, n_near=0, seed=seed)
    out, last_seen = [], set()
    for h in orders:
        if h.kind == "domain-block":
            last = trainer.plan.domains[int(h.order[-1])]
            if last not in last_seen:
                last_seen.add(last)
                out.append(h)
        elif h.kind in ("easy-to-hard", "hard-to-easy"):
            out.append(h)
    return out


def mixed_continuation(trainer: Trainer) -> torch.Tensor:
    """Eval losses after T more steps of the warm-up phase's own mixed batches, from the window
    start, at the window's learning rates: how much T steps still lower the loss when no
    domain order is at play (about zero in the flat tail of a decayed schedule).

    Returns:
        float64 ``[E]``, nats/token, in ``plan.eval_names`` order.
    """
    start, tc = trainer.window_start(), trainer.cfg.train
    theta, adam = start.theta, start.adam
    for t in range(trainer.T):
        b = trainer.plan.warmup_batch(tc.warmup_steps + t, trainer.cfg.data.batch_size, tc.seed).to(trainer.device)
        theta, adam, _ = trainer.step(theta, adam, trainer.lr(t), b)
    return trainer.evaluate(theta)


def _timed(trainer: Trainer, order: torch.Tensor) -> tuple[dict[str, float], float]:
    t0 = time.perf_counter()
    res = trainer.train(order)
    return res.eval_dict(), time.perf_counter() - t0


def measure_regime(cfg: Config, n_random: int = 10, seed: int = 0, baseline: Config | None = None,
                   progress: bool = True) -> RegimeResult:
    """Measure the regime of ``cfg`` with real training (see the module docstring).

    Args:
        cfg: the config to measure.
        n_random: number of uniformly random orders trained (their std is the ranking signal).
        seed: seed of the orders (:func:`currsearch.fidelity.heldout_orders`); the baseline's
            runs use random orders of its own plan drawn from ``seed`` too.
        baseline: the config of the cost baseline (default: the defaults).
        progress: tqdm bars.

    Returns:
        A :class:`RegimeResult`.

    Raises:
        ConfigError: ``n_random < 2`` (no std). Loader and Trainer errors pass through.
    """
    if n_random < 2:
        raise ConfigError(f"n_random must be at least 2 to give a std, got {n_random}")
    trainer = Trainer.from_config(cfg)
    t0 = time.perf_counter()
    start = trainer.window_start(progress=progress)
    warmup_seconds = time.perf_counter() - t0
    names = list(trainer.plan.eval_names)
    start_loss = dict(zip(names, trainer.evaluate(start.theta).tolist()))
    base_loss = dict(zip(names, trainer.unigram_baseline().tolist()))
    mixed_loss = dict(zip(names, mixed_continuation(trainer).tolist()))
    base_cfg = baseline if baseline is not None else Config()
    base_trainer = Trainer.from_config(base_cfg)
    base_trainer.window_start(progress=progress)
    difficulty = torch.tensor([m["unigram_nll"] for m in trainer.plan.metadata], dtype=torch.float64)
    randoms = [h for h in heldout_orders(trainer.T, trainer.plan.domains, difficulty, n_random=n_random, n_near=0,
                                         seed=seed) if h.kind == "random"]
    todo = randoms + few_structured(trainer, seed)
    g = torch.Generator().manual_seed(seed)
    runs, base_seconds, load = [], [], [os.getloadavg()[0]]
    for h in tqdm(todo, desc="real runs", unit="run", disable=not progress):
        loss, s = _timed(trainer, h.order)
        runs.append(OrderLoss(h.name, h.kind, h.order.tolist(), loss, s))
        base_seconds.append(_timed(base_trainer, torch.randperm(base_trainer.T, generator=g))[1])
    load.append(os.getloadavg()[0])
    main = "all" if "all" in names else names[-1]
    rand = [r.eval_loss[main] for r in runs if r.kind == "random"]
    struct = [r.eval_loss[main] for r in runs if r.kind != "random"] or [float("nan")]
    seconds = [r.seconds for r in runs]
    d = cfg.data
    return RegimeResult(
        config=cfg.to_dict(), baseline_config=base_cfg.to_dict(), params=trainer.model.num_params,
        baseline_params=base_trainer.model.num_params, T=trainer.T, warmup_steps=cfg.train.warmup_steps,
        tokens_per_step=d.batch_size * d.seq_len, threads=torch.get_num_threads(), load_average=load,
        warmup_seconds=warmup_seconds, warmup_cached=trainer.warmup_from_cache, eval_names=names,
        unigram_baseline=base_loss, window_start_loss=start_loss, mixed_continuation_loss=mixed_loss,
        below_baseline={n: base_loss[n] - start_loss[n] for n in names}, run_seconds=seconds,
        baseline_run_seconds=base_seconds, cost_ratio=statistics.fmean(seconds) / statistics.fmean(base_seconds),
        main_eval=main, random=[r for r in runs if r.kind == "random"], random_mean=statistics.fmean(rand),
        random_std=statistics.stdev(rand), structured=[r for r in runs if r.kind != "random"],
        structured_min=min(struct), structured_max=max(struct),
    )
