"""Trainer: real AdamW training of a causal LM over any order of a BatchPlan's batches.

This is the ground truth for every fidelity claim: on CPU the same config and order give
bit-identical parameters (with the same torch thread count: ``torch.set_num_threads`` changes
the reduction order, hence the last bits). Training is an optional warm-up phase on the plan's mixed warm-up
pool, followed by the ordered window of T steps (one batch each). The Adam state at the
window start is fresh, or carried from the warm-up phase (``train.carry_optimizer_state``).
The warm-up phase's end state is cached on disk across processes (``train.warmup_cache``,
:mod:`currsearch.warmup`), so only the first Trainer of a config trains it.
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .adam import AdamState, adam_direction, clip_grad, lr_at
from .config import Config, config_from_dict
from .data import corpus_fingerprint, get_tokenizer, load_corpus
from .model import FlatModel, build_model
from .errors import OrderError
from .orders import validate_orders
from .plan import BatchPlan, build_plan, unigram_baseline
from .warmup import load_warmup, save_warmup


@dataclass
class WindowStart:
    """Parameters and optimizer state at the start of the ordered window.

    Attributes:
        theta: float ``[P]`` parameters theta_0.
        adam: Adam moments (fresh, or carried from the warm-up phase).
        step_offset: global step index of window step 0 (= ``train.warmup_steps``), used by
            the learning-rate schedule.
    """

    theta: torch.Tensor
    adam: AdamState
    step_offset: int


@dataclass
class PrefixState:
    """Parameters and Adam state after the first ``step`` window steps of an order.

    Training is deterministic, so every order that starts with the same ``step`` batches
    passes through this state: :meth:`Trainer.train` can resume from it and train only the
    remaining ``T - step`` steps, bit-identical to training the whole order (on the same
    device and thread count).

    Attributes:
        step: window steps already taken (0 <= step <= T).
        prefix: the ``step`` batch indices trained, in order.
        theta: float ``[P]`` parameters after them.
        adam: Adam moments after them.
    """

    step: int
    prefix: tuple[int, ...]
    theta: torch.Tensor
    adam: AdamState


@dataclass
class TrainResult:
    """Outcome of training one order.

    Attributes:
        order: int64 ``[T]`` the order trained.
        theta: float ``[P]`` final parameters.
        adam: final Adam state.
        train_losses: float64 ``[T]``, loss (nats/token) of the batch at step t, before its update.
        eval_losses: float64 ``[E]``, final loss per eval set (nats/token), in ``eval_names`` order.
        eval_names: the E eval set names (domains, then ``"all"``).
        seconds: wall time of the window steps trained (warm-up phase and evaluation excluded), seconds.
        start_step: the window step training started at (0, or a resumed :class:`PrefixState`'s step);
            ``train_losses`` before it are NaN.
        states: the :class:`PrefixState` at each step asked for with ``keep`` (after ``start_step``).
        eval_seconds: wall time of the final evaluation, seconds.
    """

    order: torch.Tensor
    theta: torch.Tensor
    adam: AdamState
    train_losses: torch.Tensor
    eval_losses: torch.Tensor
    eval_names: list[str]
    seconds: float
    start_step: int = 0
    states: dict[int, PrefixState] = field(default_factory=dict)
    eval_seconds: float = 0.0

    def eval_dict(self) -> dict[str, float]:
        """``{eval set: loss in nats/token}``."""
        return {n: float(x) for n, x in zip(self.eval_names, self.eval_losses)}

    def perplexity(self) -> dict[str, float]:
        """``{eval set: exp(loss)}``."""
        return {n: math.exp(float(x)) for n, x in zip(self.eval_names, self.eval_losses)}

    def summary(self) -> dict:
        """JSON-serializable summary (order, losses, perplexities, seconds)."""
        return {
            "order": self.order.tolist(),
            "eval_loss": self.eval_dict(),
            "perplexity": self.perplexity(),
            "train_loss": self.train_losses.tolist(),
            "seconds": self.seconds,
        }


@functools.lru_cache(maxsize=4)
def _prepare_data(data_json: str, warmup_steps: int):
    cfg = config_from_dict({"data": json.loads(data_json), "train": {"warmup_steps": warmup_steps}})
    corpus = load_corpus(cfg.data)
    chash = corpus_fingerprint(corpus)
    tok = get_tokenizer(cfg.data, corpus, chash)
    plan = build_plan(cfg, corpus, tok)
    return chash, tok, plan


class Trainer:
    """AdamW training over orders of a :class:`BatchPlan` (see module docstring).

    Args:
        cfg: experiment config (``optim`` and ``train`` sections are used here).
        plan: the batch plan.
        model: the flat model; its module's current parameters are the initial weights.
        corpus_hash: SHA-256 of the corpus (recorded in stores), optional.
        tokenizer: the tokenizer (kept for callers), optional.
    """

    def __init__(self, cfg: Config, plan: BatchPlan, model: FlatModel, corpus_hash: str = "", tokenizer=None):
        self.cfg = cfg
        self.plan = plan
        self.model = model
        self.corpus_hash = corpus_hash
        self.tokenizer = tokenizer
        self.theta_init = model.flatten()
        self.device = model.device
        self._start: WindowStart | None = None
        #: whether :meth:`window_start` loaded the warm-up phase from the on-disk cache (False until it ran)
        self.warmup_from_cache = False

    @classmethod
    def from_config(cls, cfg: Config) -> "Trainer":
        """Load the corpus, tokenizer, plan and model of ``cfg`` (data cached per process).

        Raises:
            CorpusError, ModelError, ConfigError: as the loaders do (and a ``train.device``
            this machine lacks), before any training.
        """
        cfg.train.check_device()
        chash, tok, plan = _prepare_data(cfg.data.model_dump_json(), cfg.train.warmup_steps)
        model = FlatModel(build_model(cfg, len(tok)))
        return cls(cfg, plan, model, chash, tok)

    @property
    def T(self) -> int:
        return self.plan.num_batches

    @property
    def total_steps(self) -> int:
        """Steps of the learning-rate schedule: warm-up phase plus window."""
        return self.cfg.train.warmup_steps + self.T

    def batch(self, l: int) -> torch.Tensor:
        """Window batch ``l`` on the model's device, int64 ``[batch_size, seq_len]``."""
        return self.plan.batches[l].to(self.device)

    def lr(self, t: int) -> float:
        """Learning rate of window step ``t`` (0-based)."""
        return lr_at(self.cfg.train.warmup_steps + t, self.total_steps, self.cfg.optim)

    def step(self, theta: torch.Tensor, adam: AdamState, lr: float, batch: torch.Tensor):
        """One AdamW step: returns ``(theta_next [P], adam_next, loss)`` (loss before the step, nats/token)."""
        loss, g = self.model.grad(theta, batch)
        g = clip_grad(g, self.cfg.optim.grad_clip)
        gamma, adam = adam_direction(g, adam, theta, self.model.decay_mask, self.cfg.optim)
        return theta - lr * gamma, adam, float(loss)

    def warmup(self, progress: bool = False) -> tuple[torch.Tensor, AdamState]:
        """Train the warm-up phase from the initial weights (no cache involved).

        Returns:
            ``(theta [P], AdamState)`` after ``train.warmup_steps`` AdamW steps on the plan's
            warm-up batches (the Adam state as training left it, ``step = warmup_steps``).
        """
        tc = self.cfg.train
        theta, adam = self.theta_init.clone(), AdamState.fresh(self.theta_init)
        steps = range(tc.warmup_steps)
        if progress and tc.warmup_steps:
            steps = tqdm(steps, desc="warm-up phase", unit="step")
        for s in steps:
            b = self.plan.warmup_batch(s, self.cfg.data.batch_size, tc.seed).to(self.device)
            theta, adam, _ = self.step(theta, adam, lr_at(s, self.total_steps, self.cfg.optim), b)
        return theta, adam

    def window_start(self, progress: bool = False) -> WindowStart:
        """The window's starting point: the warm-up phase's end state, computed once per Trainer
        and cached on disk across processes (``train.warmup_cache``, :mod:`currsearch.warmup`:
        loaded bit-identical, checked, recomputed with a warning when an entry is unusable);
        the Adam state is then reset unless ``train.carry_optimizer_state``."""
        if self._start is None:
            tc = self.cfg.train
            cached = load_warmup(self) if tc.warmup_steps else None
            if cached is None:
                t0 = time.perf_counter()
                theta, adam = self.warmup(progress=progress)
                if tc.warmup_steps:
                    save_warmup(self, theta, adam, time.perf_counter() - t0)
            else:
                theta, adam = cached
            self.warmup_from_cache = cached is not None
            if not tc.carry_optimizer_state:
                adam = AdamState.fresh(theta)
            self._start = WindowStart(theta, adam, tc.warmup_steps)
        return WindowStart(self._start.theta.clone(), self._start.adam.clone(), self._start.step_offset)

    def unigram_baseline(self) -> torch.Tensor:
        """Unigram-entropy baseline per eval set (nats/token, :func:`currsearch.plan.unigram_baseline`:
        add-one smoothed over the model's vocabulary): float64 ``[E]`` in ``plan.eval_names`` order."""
        base = unigram_baseline(self.plan, self.model.module.get_input_embeddings().num_embeddings)
        return torch.tensor([base[n] for n in self.plan.eval_names], dtype=torch.float64)

    def evaluate(self, theta: torch.Tensor) -> torch.Tensor:
        """Loss (nats/token) per eval set at ``theta``: float64 ``[E]`` in ``plan.eval_names`` order."""
        p, bs = self.plan, self.cfg.train.eval_batch_size
        per = [self.model.eval_loss(theta, p.eval_sets[n], bs) for n in p.domain_names]
        sizes = [p.eval_sets[n].shape[0] for n in p.domain_names]
        overall = sum(x * s for x, s in zip(per, sizes)) / sum(sizes)
        return torch.tensor(per + [overall], dtype=torch.float64)

    def train(self, order, progress: bool = False, start: PrefixState | None = None, keep=()) -> TrainResult:
        """Train the window in ``order`` (int64 ``[T]``) from :meth:`window_start`, or from ``start``.

        Args:
            order: the T batch indices, in training order.
            progress: a tqdm bar over the window steps.
            start: resume from this state (its ``prefix`` must be the first ``start.step``
                batches of ``order``): only the remaining steps are trained, and the result is
                bit-identical to training ``order`` from the window start.
            keep: window steps ``s`` (``start.step < s < T``) at which to keep the
                :class:`PrefixState` (``TrainResult.states``), so later orders sharing the first
                ``s`` batches can resume there.

        Raises:
            OrderError: ``order`` is not a permutation of ``0..T-1``, or does not start with ``start.prefix``.
        """
        order = validate_orders(order, self.T)
        if order.dim() != 1:
            raise ValueError("Trainer.train takes one order [T]; loop over rows for several")
        if start is None:
            ws = self.window_start(progress=progress)
            start = PrefixState(0, (), ws.theta, ws.adam)
        elif tuple(order[:start.step].tolist()) != tuple(start.prefix) or len(start.prefix) != start.step:
            raise OrderError(f"cannot resume this order from a state after {start.step} steps: its first {start.step} "
                             "batches differ from the state's prefix; resume from a state of an order it shares them with")
        theta, adam = start.theta.clone(), start.adam.clone()
        keep = {int(k) for k in keep if start.step < int(k) < self.T}
        states: dict[int, PrefixState] = {}
        t0 = time.perf_counter()
        losses = torch.full((self.T,), math.nan, dtype=torch.float64)
        steps = range(start.step, self.T)
        if progress:
            steps = tqdm(steps, desc="window", unit="step")
        for t in steps:
            if t in keep:
                states[t] = PrefixState(t, tuple(order[:t].tolist()), theta.clone(), adam.clone())
            theta, adam, losses[t] = self.step(theta, adam, self.lr(t), self.batch(int(order[t])))
        seconds = time.perf_counter() - t0
        evals = self.evaluate(theta)
        return TrainResult(order, theta, adam, losses, evals, list(self.plan.eval_names), seconds, start.step, states,
                           time.perf_counter() - t0 - seconds)
