"""Recorder: train the reference order once and record what estimators need.

Two phases, both resumable from the last completed checkpoint:

1. **Reference run** (one training run of the reference order, ``0..T-1`` unless another
   permutation is given): at every anchor
   checkpoint t (``record.anchor_stride`` s: t = 0, s, 2s, ...) the state theta_t and the
   reference Adam moments (m, v, step) *before* step t, and the eval losses at theta_t, are
   saved; at the end theta_T and its eval losses.
2. **Pairs**: at every anchor t and for every batch B_l, the pluggable terms of
   ``record.terms`` are computed from the gradient g(theta_t, B_l) (clipped) and the Adam
   update term Gamma(theta_t, B_l) that the optimizer would take with the reference moments
   (arXiv 2505.22042, Sec. 3; math in ``currsearch.adam``). All T batch gradients at a
   checkpoint are computed in one ``torch.func.vmap`` call (chunked).

Terms (``TERMS``; an estimator declares the ones it needs):

* ``batch_losses``: ``batch_loss`` [T] float64, L(theta_t; B_l) in nats/token.
* ``updates``: ``update_proj`` [T, k] float32, the JL projection of Gamma(theta_t, B_l).
* ``grads``: ``grad_proj`` [T, k] float32, the JL projection of g(theta_t, B_l).
* ``readouts``: exact full-dimension inner products with the eval gradients at the end of
  the reference run (design note lesson 3): ``readout_update_final`` [T, E] =
  <grad L_e(theta_T), Gamma(theta_t, B_l)>, ``readout_grad_final`` [T, E] =
  <grad L_e(theta_T), g(theta_t, B_l)>, float64.
* ``readouts_checkpoint`` (opt-in): the same with the eval gradients at theta_t
  (``readout_update``, ``readout_grad``); costs E eval-set gradients per anchor.
* ``eval_grads`` (opt-in): ``eval_grad_proj`` [E, k] float32, projected eval-set gradients
  at theta_t; costs the same.
* ``response`` (opt-in; anchor stride 1): the linear response of the final eval losses to the
  batch at each step (``currsearch.adjoint``): ``response_readout``, ``transport_readout`` and
  ``transport_v_readout`` [T, E] float64, R_e[t, l] of each :data:`~currsearch.adjoint.RECORDED_VARIANTS`.
  The pair phase then runs backward (t = T-1 .. 0) and carries the adjoint (one Hessian-vector
  product of the recorded batch per step, vmapped over the E eval sets).
* ``precedence`` (opt-in): ``precedence`` [T, T, E] float64, the curvature-precedence matrix
  C_e[a, b] at the middle anchor only (``currsearch.adjoint.precedence_matrix``; T HVPs vmapped
  over E).

``record.checkpoint_eval`` also evaluates the reference model at every anchor (the
reference eval-loss curve, ``TrajectoryStore.reference_eval_losses``).

New terms are added with :func:`register_term`; each declares its tensors' shapes so the
recorder can predict the store size before it starts.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import importlib.metadata
import logging
import math
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from . import __version__
from .adam import AdamState, adam_direction
from .adjoint import RECORDED_VARIANTS, AdjointState, adjoint_step, clipped_hvp, precedence_matrix, readouts
from .config import Config
from .errors import BudgetError, ConfigError, StoreError
from .gradients import batch_gradients, eval_gradients
from .manifest import (
    check_output_dir,
    config_diff,
    file_lock,
    is_partial_write,
    make_output_dir,
    remove_partial_writes,
    save_listed_tensors,
    trainer_hashes,
    write_manifest,
)
from .orders import validate_orders
from .projection import Projector
from .store import FORMAT, SCHEMA_VERSION, TrajectoryStore, checkpoint_file, pairs_file
from .train import Trainer
from .warmup import environment

__all__ = ["TERMS", "AnchorContext", "Term", "batch_gradients", "estimate_cost", "eval_gradients", "record", "register_term",
           "store_formula"]
logger = logging.getLogger(__name__)

_DTYPE_BYTES = {torch.float32: 4, torch.float64: 8, torch.int64: 8}
# tensors' dims are written with these symbols and filled in from the store's sizes
Dims = dict  # {"T": int, "P": int, "k": int, "E": int}


@dataclass(frozen=True)
class Term:
    """A recordable term.

    Attributes:
        name: term name used in ``record.terms`` and ``Estimator.required_terms``.
        doc: one line on what it holds.
        tensors: per anchor, ``{tensor name: (shape as dim symbols, dtype)}``.
        compute: ``AnchorContext -> {tensor name: tensor}`` for one anchor.
        once: computed at one anchor only (:func:`once_anchor`, the middle one) instead of every anchor.
        hvps: Hessian-vector product calls (of E tangents) where computed, for the cost model:
            ``""`` none, ``"1"`` one, ``"T"`` one per batch.
    """

    name: str
    doc: str
    tensors: dict[str, tuple[tuple[str, ...], torch.dtype]]
    compute: Callable[["AnchorContext"], dict[str, torch.Tensor]]
    once: bool = False
    hvps: str = ""

    def shapes(self, dims: Dims) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """``{tensor name: (shape, dtype)}`` per anchor with the dim symbols filled in from ``dims``
        (``{"T", "P", "k", "E"}``)."""
        return {n: (tuple(dims[d] for d in shape), dt) for n, (shape, dt) in self.tensors.items()}


TERMS: dict[str, Term] = {}
#: seconds between saves of the adjoint during the backward pair phase (``response``)
ADJOINT_SAVE_SECONDS = 60.0


def once_anchor(anchors: list[int]) -> int:
    """The anchor where ``once`` terms are computed: the middle one (``anchors[len // 2]``)."""
    return anchors[len(anchors) // 2]


def register_term(term: Term) -> Term:
    """Add a term to the registry (replacing one of the same name)."""
    TERMS[term.name] = term
    return term


class AnchorContext:
    """Quantities at one anchor checkpoint t, computed lazily and shared by all terms.

    Attributes (lazy): ``grads`` float32 [T, P] clipped g(theta_t, B_l); ``batch_losses``
    float64 [T]; ``updates`` float32 [T, P] Gamma(theta_t, B_l); ``eval_grads`` float32 [E, P]
    at theta_t; ``eval_grads_final`` float32 [E, P] at theta_T; ``projector``. Set by the
    recorder: ``lr`` (eta_t) and, with the ``response`` term, ``adjoint`` (lambda_{t+1} per
    recorded variant) and ``variants`` (the recorded :class:`~currsearch.adjoint.Variant` s).
    """

    def __init__(self, trainer: Trainer, theta: torch.Tensor, adam: AdamState, eval_grads_final, projector, chunk: int,
                 lr: float = 0.0, adjoint: list[AdjointState] | None = None, variants=RECORDED_VARIANTS):
        self.trainer, self.theta, self.adam = trainer, theta, adam
        self.eval_grads_final, self.projector, self.chunk = eval_grads_final, projector, chunk
        self.lr, self.adjoint, self.variants = lr, adjoint, variants

    @functools.cached_property
    def _grads_losses(self) -> tuple[torch.Tensor, torch.Tensor]:
        return batch_gradients(self.trainer, self.theta, self.trainer.plan.batches, self.chunk)

    @property
    def grads(self) -> torch.Tensor:
        return self._grads_losses[0]

    @property
    def batch_losses(self) -> torch.Tensor:
        return self._grads_losses[1]

    @functools.cached_property
    def updates(self) -> torch.Tensor:
        cfg = self.trainer.cfg.optim
        gamma, _ = adam_direction(self.grads, self.adam, self.theta, self.trainer.model.decay_mask, cfg)
        return gamma

    @functools.cached_property
    def eval_grads(self) -> torch.Tensor:
        return eval_gradients(self.trainer, self.theta)


def _readouts(eval_grads: torch.Tensor, ctx: AnchorContext, suffix: str) -> dict[str, torch.Tensor]:
    # float32 products (relative error ~1e-6, i.e. ~1e-9 nats/token once scaled by eta), stored as float64
    return {f"readout_update{suffix}": (ctx.updates @ eval_grads.T).double(), f"readout_grad{suffix}": (ctx.grads @ eval_grads.T).double()}


register_term(Term("batch_losses", "loss of every batch at the checkpoint, nats/token",
                   {"batch_loss": (("T",), torch.float64)}, lambda c: {"batch_loss": c.batch_losses}))
register_term(Term("updates", "JL projection of the Adam update term Gamma(theta_t, B_l)",
                   {"update_proj": (("T", "k"), torch.float32)}, lambda c: {"update_proj": c.projector.project(c.updates)}))
register_term(Term("grads", "JL projection of the clipped gradient g(theta_t, B_l)",
                   {"grad_proj": (("T", "k"), torch.float32)}, lambda c: {"grad_proj": c.projector.project(c.grads)}))
register_term(Term("eval_grads", "JL projection of the eval-set gradients at theta_t",
                   {"eval_grad_proj": (("E", "k"), torch.float32)}, lambda c: {"eval_grad_proj": c.projector.project(c.eval_grads)}))
register_term(Term("readouts", "exact inner products of the final eval gradients with update terms and gradients",
                   {"readout_update_final": (("T", "E"), torch.float64), "readout_grad_final": (("T", "E"), torch.float64)},
                   lambda c: _readouts(c.eval_grads_final, c, "_final")))
register_term(Term("readouts_checkpoint", "exact inner products of the eval gradients at theta_t with update terms and gradients",
                   {"readout_update": (("T", "E"), torch.float64), "readout_grad": (("T", "E"), torch.float64)},
                   lambda c: _readouts(c.eval_grads, c, "")))


def _response(c: AnchorContext) -> dict[str, torch.Tensor]:
    cfg = c.trainer.cfg.optim
    return {f"{v.name}_readout": readouts(lam, v, c.updates, c.grads, c.lr, cfg) for lam, v in zip(c.adjoint, c.variants)}


def _precedence(c: AnchorContext) -> dict[str, torch.Tensor]:
    tr = c.trainer
    return {"precedence": precedence_matrix(tr.model.loss, c.theta, c.adam, tr.plan.batches, c.grads, c.eval_grads_final, tr.cfg.optim)}


register_term(Term("response", "linear response of the final eval losses to the batch at each step (adjoint read-outs)",
                   {f"{v.name}_readout": (("T", "E"), torch.float64) for v in RECORDED_VARIANTS}, _response, hvps="1"))
register_term(Term("precedence", "curvature-precedence matrix C_e[a, b] at the middle anchor",
                   {"precedence": (("T", "T", "E"), torch.float64)}, _precedence, once=True, hvps="T"))


# ---------------------------------------------------------------------------- planning
def _dims(trainer: Trainer, cfg: Config) -> Dims:
    return {"T": trainer.T, "P": trainer.model.num_params, "k": cfg.record.projection_dim, "E": len(trainer.plan.eval_names)}


def _safetensors_bytes(shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> int:
    return sum(math.prod(s) * _DTYPE_BYTES[dt] for s, dt in shapes.values())


def store_formula(trainer: Trainer, cfg: Config) -> dict[str, int]:
    """Predicted store size in bytes (tensor payloads; headers and manifest excluded).

    ``A (3 P 4 + 8 [+ E 8 with checkpoint_eval])`` for the checkpoints, ``A * sum(term bytes)`` for the pair terms
    and ``P 4 + E 8 + E k 4`` for the final state and its projected eval gradients (float32
    parameters, float64 losses).
    """
    dims = _dims(trainer, cfg)
    P, E = dims["P"], dims["E"]
    A = len(range(0, trainer.T, cfg.record.anchor_stride))
    pa = sum(_safetensors_bytes(TERMS[t].shapes(dims)) for t in cfg.record.terms if not TERMS[t].once)
    once = sum(_safetensors_bytes(TERMS[t].shapes(dims)) for t in cfg.record.terms if TERMS[t].once)
    psize = {torch.float32: 4, torch.float64: 8}[trainer.model.dtype]
    ckpt = A * (3 * P * psize + 8 + (E * 8 if cfg.record.checkpoint_eval else 0))
    final = P * psize + E * 8 + E * dims["k"] * 4
    return {"checkpoints": ckpt, "pairs": A * pa + once, "final": final, "total": ckpt + A * pa + once + final}


def _steps(trainer: Trainer, cfg: Config) -> tuple[int, int]:
    """``(steps of one run, steps of the recording)`` in units of one batch gradient: a run is
    T training steps plus the final evaluation's batches; the recording adds, when
    ``record.terms`` names any pair term, ``T + E'`` gradients at each of the A anchors
    (E' = eval batches when a term needs eval gradients at every anchor), and ``1 + E``
    gradients per Hessian-vector product call of E tangents (``response``: one per anchor;
    ``precedence``: T at one anchor): a vmapped forward-over-reverse HVP of 5 tangents took
    0.75 s against 0.10 s per batch gradient on the default model (measured side by side; the
    overheads in ``benchmarks/response_cost.py``)."""
    T, d = trainer.T, cfg.data
    A = len(range(0, T, cfg.record.anchor_stride))
    eval_batches = sum(math.ceil(trainer.plan.eval_sets[n].shape[0] * 1.0 / d.batch_size) for n in trainer.plan.domain_names)
    per_anchor_eval = eval_batches if {"eval_grads", "readouts_checkpoint"} & set(cfg.record.terms) else 0
    pair_steps = A * (T + per_anchor_eval) if cfg.record.terms else 0  # no pair terms: checkpoints only
    E = len(trainer.plan.eval_names)
    hvp_calls = sum((A if not TERMS[t].once else 1) * (T if TERMS[t].hvps == "T" else 1)
                    for t in cfg.record.terms if TERMS[t].hvps)
    return T + eval_batches, T + eval_batches + pair_steps + hvp_calls * (1 + E)  # an HVP of E tangents ~ 1 + E gradients


def record_run_equivalents(trainer: Trainer, cfg: Config) -> float:
    """Cost of recording ``cfg``'s store in real runs (gradient counts, see :func:`_steps`):
    1 plus the pair terms' gradients; the compute ledger's unit for the record phase."""
    run, rec = _steps(trainer, cfg)
    return rec / run


def estimate_cost(trainer: Trainer, cfg: Config) -> dict[str, float]:
    """Estimated seconds, peak bytes of memory and bytes of disk of a recording, and its cost
    in real runs (``run_equivalents``, :func:`record_run_equivalents`).

    Time: one timed training step t_step (measured now) times the recording's gradient count
    (:func:`_steps`), an upper bound since vmapped gradients are a little cheaper than
    sequential steps. Memory: the [T, P] gradient and update matrices, eval gradients and
    activations of one vmap chunk.
    """
    start = trainer.window_start()
    b = trainer.batch(0)
    trainer.step(start.theta, start.adam, 0.0, b)  # warm caches
    t0 = time.perf_counter()
    for _ in range(2):
        trainer.step(start.theta, start.adam, 0.0, b)
    t_step = (time.perf_counter() - t0) / 2
    T, P, E = trainer.T, trainer.model.num_params, len(trainer.plan.eval_names)
    run_steps, rec_steps = _steps(trainer, cfg)
    d = cfg.data
    mcfg = trainer.model.module.config
    width = getattr(mcfg, "n_embd", getattr(mcfg, "hidden_size", 256))
    layers = getattr(mcfg, "n_layer", getattr(mcfg, "num_hidden_layers", 4))
    act = min(T, cfg.record.vmap_chunk) * d.batch_size * d.seq_len * (24 * width * layers + 3 * getattr(mcfg, "vocab_size", 1)) * 4
    memory = 4 * P * (3 * T + 2 * E + 8) + act
    return {"seconds": t_step * rec_steps, "memory_bytes": memory, "disk_bytes": store_formula(trainer, cfg)["total"],
            "step_seconds": t_step, "run_equivalents": rec_steps / run_steps}


def _record_settings(cfg: Config) -> dict:
    r = cfg.record
    return {"terms": list(r.terms), "anchor_stride": r.anchor_stride, "checkpoint_eval": r.checkpoint_eval, "projection": r.projection,
            "projection_dim": r.projection_dim, "projection_seed": r.projection_seed}


# ---------------------------------------------------------------------------- recording
def _rewound(m: dict, damaged: list[str]) -> dict:
    """A copy of manifest ``m`` that forgets the ``damaged`` files, so the recorder writes them
    again (in place; the caller deletes them).

    A damaged checkpoint t rewinds the reference run to the last intact checkpoint before it
    (the later checkpoints and the final state are recomputed, bit-identically); a damaged final
    state reruns the reference run from its last checkpoint; damaged pair or eval-gradient files
    are recomputed in the pair phase; any other listed file (a calibration cache, the verified runs) is dropped.
    Each damaged file's entry is removed.
    """
    m = copy.deepcopy(m)
    for rel in damaged:
        m["files"].pop(rel, None)
        ckpt, pair = re.fullmatch(r"checkpoints/ckpt_(\d+)\.safetensors", rel), re.fullmatch(r"pairs/pairs_(\d+)\.safetensors", rel)
        if ckpt or rel == "final.safetensors":
            if ckpt:
                m["checkpoints_done"] = [t for t in m["checkpoints_done"] if t < int(ckpt.group(1))]
            m["phase"] = "reference"
        elif pair:
            m["pairs_done"] = [t for t in m["pairs_done"] if t != int(pair.group(1))]
        if m["phase"] == "complete" and (pair or rel == "final_eval_grads.safetensors"):
            m["phase"] = "pairs"
    return m


#: the lock file a recording holds in its output directory (:func:`recording_lock`)
RECORD_LOCK = ".record.lock"


@contextlib.contextmanager
def recording_lock(out: Path):
    """Hold an exclusive ``flock`` on ``OUT/.record.lock`` (created with ``OUT``) while a
    recording runs, so that a second process recording into the same directory is refused at
    once instead of deleting the first one's temporary files and interleaving its manifest
    writes. A directory where the lock file cannot be created (read-only) is entered without
    it: nothing can be recorded there.

    Raises:
        StoreError: another process is recording into ``out``.
    """
    with contextlib.suppress(OSError):
        make_output_dir(out)
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(file_lock(Path(out) / RECORD_LOCK, wait=False, optional=True))
        except BlockingIOError:
            raise StoreError(f"another process is recording into {str(out)!r}; wait for it to finish (a later run "
                             "resumes its store) or use another --out") from None
        yield


class _Recorder:
    def __init__(self, cfg: Config, out: Path, progress: bool, trainer: Trainer | None, reference_order=None,
                 response_variants=RECORDED_VARIANTS):
        unknown = [t for t in cfg.record.terms if t not in TERMS]
        if unknown:
            raise ConfigError(f"unknown record.terms {unknown}; known terms: {sorted(TERMS)}")
        if {"response"} & set(cfg.record.terms) and cfg.record.anchor_stride != 1:
            raise ConfigError(f"record.terms 'response' needs a checkpoint at every step; set record.anchor_stride = 1 "
                              f"(got {cfg.record.anchor_stride})")
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        if trainer is not None and config_diff(trainer.cfg.to_dict(), cfg.to_dict()):
            raise ConfigError("record(): the given trainer was built from another config (other data/model/optim/train "
                              "settings); pass a trainer of this config")
        self.trainer = trainer if trainer is not None else Trainer.from_config(cfg)
        tr = self.trainer
        self.T, self.P = tr.T, tr.model.num_params
        ref = torch.arange(self.T) if reference_order is None else reference_order
        self.reference_order = validate_orders(ref, self.T).view(-1).tolist()
        self.anchors = list(range(0, self.T, cfg.record.anchor_stride))
        self.projector = Projector(cfg.record.projection, self.P, cfg.record.projection_dim, cfg.record.projection_seed)
        self.variants = tuple(response_variants)

    # -- manifest
    def _new_manifest(self) -> dict:
        tr, cfg = self.trainer, self.cfg
        shapes = {}
        dims = _dims(tr, cfg)
        for t in cfg.record.terms:
            for n, (s, dt) in TERMS[t].shapes(dims).items():
                shapes[n] = {"shape": list(s), "dtype": str(dt).replace("torch.", ""), "term": t}
                if TERMS[t].once:
                    shapes[n]["anchor"] = once_anchor(self.anchors)
            if t == "response":  # the read-outs of the variants this recorder was given
                for n in TERMS[t].tensors:
                    shapes.pop(n)
                for v in self.variants:
                    shapes[f"{v.name}_readout"] = {"shape": [dims["T"], dims["E"]], "dtype": "float64", "term": t}
        return {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": cfg.to_dict(),
            "hashes": {**trainer_hashes(tr), "config": cfg.fingerprint(*("data", "model", "optim", "train"))},
            "T": self.T, "P": self.P, "eval_names": list(tr.plan.eval_names),
            "batch_domains": list(tr.plan.domains), "batch_metadata": tr.plan.metadata,
            "reference_order": self.reference_order,
            "environment": environment(tr.device),  # a resumed recording must train bit-identically
            "anchors": self.anchors, "anchor_stride": cfg.record.anchor_stride, "terms": list(cfg.record.terms),
            "tensors": shapes, "projection": self.projector.describe(),
            "dtypes": {"params": str(tr.model.dtype).replace("torch.", ""), "losses": "float64"},
            "versions": {"currsearch": __version__, "torch": torch.__version__, "transformers": importlib.metadata.version("transformers"),
                         "python": platform.python_version()},
            "formula_bytes": store_formula(tr, cfg)["total"],
            "files": {}, "phase": "reference", "checkpoints_done": [], "pairs_done": [],
            "reference_train_loss": [], "reference_seconds": 0.0, "record_seconds": 0.0,
        }

    def _check_environment(self, m: dict) -> None:
        """Refuse to resume or repair a recording in another numerical environment (thread count,
        versions, CPU, device: :func:`~currsearch.warmup.environment`), whose runs are not
        bit-identical to the recorded ones: the new files would not fit those already written.
        A store of an older currsearch holds no environment and is resumed as it is.

        Raises:
            StoreError: naming what differs.
        """
        old, new = m.get("environment"), environment(self.trainer.device)
        diff = [f"{k} ({old.get(k)!r} then, {new.get(k)!r} now)" for k in sorted(set(old or {}) | set(new))
                if old is not None and old.get(k) != new.get(k)]
        if diff:
            raise StoreError(
                f"store {str(self.out)!r} was recorded in another numerical environment: {', '.join(diff)}; its files "
                "would not fit a continuation trained here. Resume with the same thread count (torch.set_num_threads, "
                "OMP_NUM_THREADS), versions and device, or record into another --out")

    def _load_or_create(self) -> dict:
        mpath = self.out / "manifest.json"
        if not mpath.exists():
            # a kill in the first manifest write leaves only its temporary file (removed by run())
            if self.out.exists() and any(not is_partial_write(p) and p.name != RECORD_LOCK for p in self.out.iterdir()):
                (self.out / RECORD_LOCK).unlink(missing_ok=True)  # created by recording_lock in a folder that is no store
                raise StoreError(f"output directory {str(self.out)!r} exists, is not empty and holds no store; choose another --out")
            return self._new_manifest()
        store = TrajectoryStore.open(self.out, verify=False, allow_incomplete=True)
        m = store.manifest
        store.check_config(self.cfg)
        rec_old, rec_new = m["config"]["record"], self.cfg.to_dict()["record"]
        changed = [k for k in _record_settings(self.cfg) if rec_old.get(k) != rec_new.get(k)]
        if changed:
            raise StoreError(
                f"store {str(self.out)!r} was recorded with other record settings {changed}; use the same settings to resume, or another --out"
            )
        store.check_trainer(self.trainer)
        have = sorted(n for n, e in m["tensors"].items() if e["term"] == "response")
        if "response" in self.cfg.record.terms and have != sorted(f"{v.name}_readout" for v in self.variants):
            raise StoreError(f"store {str(self.out)!r} holds the response read-outs {have}, not those of the given "
                             "response_variants; record them into another directory")
        if store.reference_order.tolist() != self.reference_order:
            raise StoreError(
                f"store {str(self.out)!r} was recorded along another reference order (manifest reference_order); "
                "record with the same reference_order to resume, or into another directory"
            )
        damaged = store.problems()
        repaired = _rewound(m, [rel for rel, _ in damaged])
        if repaired["phase"] != "complete":  # it will train (a resume, or a repair beyond dropping a run cache)
            self._check_environment(m)
        if damaged:
            for rel, _ in damaged:
                (self.out / rel).unlink(missing_ok=True)
            m = repaired
            write_manifest(self.out, m)  # the repair is on disk even if nothing else needs writing
            logger.warning("store %s: re-recording %d damaged file(s): %s", self.out, len(damaged), "; ".join(e for _, e in damaged))
        return m

    def _save(self, m: dict, rel: str, tensors: dict[str, torch.Tensor], done: list | None = None, t: int = -1) -> None:
        """Write one file atomically, then one manifest naming it (and marking ``t`` done)."""
        save_listed_tensors(self.out, m, rel, tensors)
        if done is not None:
            done.append(t)
        self._commit(m)

    def _commit(self, m: dict) -> None:
        m["record_seconds"] = self.base_seconds + time.perf_counter() - self.t_start
        write_manifest(self.out, m)

    def _bar(self, total: int, initial: int, desc: str):
        return tqdm(total=total, initial=initial, desc=desc, unit="ckpt", disable=not self.progress)

    # -- phases
    def run(self) -> TrajectoryStore:
        with recording_lock(self.out):
            return self._run()

    def _run(self) -> TrajectoryStore:
        m = self._load_or_create()
        if m["phase"] == "complete":
            return TrajectoryStore.open(self.out)
        self.base_seconds = m["record_seconds"]
        self.trainer.window_start(progress=self.progress)  # warm-up phase: shared pretraining, not record time
        self.t_start = time.perf_counter()
        make_output_dir(self.out)
        remove_partial_writes(self.out)
        if not m["files"]:
            self._commit(m)
        if m["phase"] == "reference":
            self._reference(m)
        self._pairs(m)
        m["phase"] = "complete"
        self._commit(m)
        return TrajectoryStore.open(self.out)

    def _reference(self, m: dict) -> None:
        tr = self.trainer
        done = m["checkpoints_done"]
        if done:
            c = TrajectoryStore(self.out, m).checkpoint(done[-1], device=tr.device)
            theta, adam, t0 = c["theta"], AdamState(c["adam_m"], c["adam_v"], int(c["adam_step"])), done[-1]
        else:
            s = tr.window_start(progress=self.progress)
            theta, adam, t0 = s.theta, s.adam, 0
        ran = len(m["reference_train_loss"])
        if ran > t0:  # a rewind (a damaged checkpoint) reruns steps t0.. and times them again: keep the
            m["reference_seconds"] *= t0 / ran  # seconds of the steps kept (at their mean), not of those rerun
            m["reference_train_loss"] = m["reference_train_loss"][:t0]
        bar = self._bar(len(self.anchors), len(done), "reference run")
        for t in range(t0, self.T):
            if t in self.anchors and t not in done:
                state = {"theta": theta, "adam_m": adam.m, "adam_v": adam.v, "adam_step": torch.tensor(adam.step, dtype=torch.int64)}
                if self.cfg.record.checkpoint_eval:
                    state["eval_loss"] = tr.evaluate(theta)
                self._save(m, checkpoint_file(t), state, done, t)
                bar.update(1)
            t1 = time.perf_counter()
            theta, adam, loss = tr.step(theta, adam, tr.lr(t), tr.batch(self.reference_order[t]))
            m["reference_seconds"] += time.perf_counter() - t1
            if not math.isfinite(loss):  # before hours of recording a trajectory of NaNs
                raise ConfigError(f"the reference run diverged at window step {t} (training loss {loss}); nothing "
                                  "is recorded past it: lower optim.lr or set optim.grad_clip")
            m["reference_train_loss"].append(loss)
        bar.close()
        self._save(m, "final.safetensors", {"theta": theta, "eval_loss": tr.evaluate(theta)})
        m["phase"] = "pairs"
        self._commit(m)

    def _pairs(self, m: dict) -> None:
        """Pair terms at every anchor; with ``response``, backward from the last anchor, carrying the adjoint."""
        tr = self.trainer
        store = TrajectoryStore(self.out, m)
        theta_T = store.final()["theta"].to(tr.device)
        eg_final = eval_gradients(tr, theta_T)
        if "final_eval_grads.safetensors" not in m["files"]:
            self._save(m, "final_eval_grads.safetensors", {"eval_grad_proj": self.projector.project(eg_final)})
        backward = "response" in self.cfg.record.terms
        self._adjoint_saved = time.perf_counter()
        lams, lam_at = self._adjoint_resume(m, eg_final) if backward else (None, self.T)
        done = m["pairs_done"]
        todo = [t for t in self.anchors if t not in done]
        once_t = once_anchor(self.anchors)
        bar = self._bar(len(self.anchors), len(done), "pairs (T batches per checkpoint)")
        for t in (reversed(self.anchors) if backward else self.anchors):
            if t in done:
                # a done anchor with one to redo below it (a resumed sweep, or a repaired store with
                # done anchors between two to redo): carry lambda through it without its pair terms
                # (one gradient and one HVP call; the same computation as the sweep, so bit-identical)
                if backward and todo and min(todo) < t < lam_at:
                    c = store.checkpoint(t, device=tr.device)
                    lams = self._adjoint_back(m, t, c["theta"], AdamState(c["adam_m"], c["adam_v"], int(c["adam_step"])), lams)
                continue
            c = store.checkpoint(t, device=tr.device)
            adam = AdamState(c["adam_m"], c["adam_v"], int(c["adam_step"]))
            ctx = AnchorContext(tr, c["theta"], adam, eg_final, self.projector, self.cfg.record.vmap_chunk, tr.lr(t), lams,
                                self.variants)
            tensors: dict[str, torch.Tensor] = {}
            for name in self.cfg.record.terms:
                if not TERMS[name].once or t == once_t:
                    tensors.update(TERMS[name].compute(ctx))
            if backward:
                lams = self._adjoint_back(m, t, ctx.theta, adam, lams)
            self._save(m, pairs_file(t), tensors, done, t)
            if backward and m.get("adjoint_at") == t:
                self._drop_adjoint(m, keep=t)
            bar.update(1)
        bar.close()
        if backward:
            self._drop_adjoint(m, keep=None)

    # -- the adjoint sweep of the ``response`` term (backward pair phase)
    @staticmethod
    def _adjoint_file(t: int) -> str:
        return f"adjoint/lambda_{t:05d}.safetensors"

    def _adjoint_resume(self, m: dict, eg_final: torch.Tensor) -> tuple[list[AdjointState], int]:
        """``(lambda_at, at)``: where the backward sweep starts. The last saved adjoint when it
        lies above every anchor still to do (after a repair, done anchors may lie below one to
        redo, and a saved adjoint there is of no use), else lambda_T (``at = T``, e.g. a damaged
        store); the sweep carries it through the done anchors below ``at`` (:meth:`_pairs`)."""
        todo = [t for t in self.anchors if t not in m["pairs_done"]]
        at = m.get("adjoint_at")
        rel = self._adjoint_file(at) if at is not None and todo and at > max(todo) else None
        if rel is not None and rel in m["files"]:
            d = TrajectoryStore(self.out, m)._read(rel, None, self.trainer.device)
            return [AdjointState.from_tensors(d, f"{v.name}_") for v in self.variants], at
        return [AdjointState.final(eg_final) for _ in self.variants], self.T

    def _adjoint_back(self, m: dict, t: int, theta: torch.Tensor, adam: AdamState, lams: list[AdjointState]) -> list[AdjointState]:
        """lambda_t from lambda_{t+1} through the recorded step t. Saved (listed; the manifest is
        written with the pairs file that marks t done) when ``ADJOINT_SAVE_SECONDS`` have passed
        since the last save: writing [E, P] tensors per variant at every step would cost more than
        the sweep; a resumed sweep carries lambda from the last save (:meth:`_adjoint_resume`)."""
        tr = self.trainer
        b = self.reference_order[t]
        # the clipped g(theta_t, B_t), computed alone (not taken from the pair phase's vmapped chunk) so that a
        # resume, which carries lambda through anchors without their pair terms, gets the same bits
        g = batch_gradients(tr, theta, tr.plan.batches[b : b + 1], 1)[0][0]
        hvp = clipped_hvp(tr.model.loss, theta, tr.batch(b), tr.cfg.optim.grad_clip)
        lams = adjoint_step(lams, self.variants, hvp, g, adam, tr.lr(t), tr.model.decay_mask, tr.cfg.optim)
        if time.perf_counter() - self._adjoint_saved >= ADJOINT_SAVE_SECONDS:
            save_listed_tensors(self.out, m, self._adjoint_file(t), {k: x for lam, v in zip(lams, self.variants)
                                                                      for k, x in lam.tensors(f"{v.name}_").items()})
            m["adjoint_at"] = t
            self._adjoint_saved = time.perf_counter()
        return lams

    def _drop_adjoint(self, m: dict, keep: int | None) -> None:
        """Delete the saved adjoints other than ``keep``'s (all of them once the sweep is complete):
        unlist them, then delete every such file in ``adjoint/``, also those a kill between the two
        left on disk unlisted (a complete store may hold no unlisted data file)."""
        kept = None if keep is None else self._adjoint_file(keep)
        stale = [rel for rel in m["files"] if rel.startswith("adjoint/") and rel != kept]
        for rel in stale:
            m["files"].pop(rel)
        if stale:
            self._commit(m)
        for f in (self.out / "adjoint").glob("*.safetensors"):
            if f.relative_to(self.out).as_posix() != kept:
                f.unlink()
        if keep is None and (self.out / "adjoint").is_dir() and not any((self.out / "adjoint").iterdir()):
            (self.out / "adjoint").rmdir()


def record(cfg: Config, out: str | Path, progress: bool = True, check_budget: bool = True,
           trainer: Trainer | None = None, reference_order=None, response_variants=RECORDED_VARIANTS) -> TrajectoryStore:
    """Record (or resume, or repair, or reuse) the trajectory store of ``cfg`` in ``out``.

    Logs the estimated time, memory and disk before starting (``logging`` INFO, with ``progress``).
    A store whose manifest is intact but some of whose files are missing, truncated, modified or
    unlisted is repaired: those files are recorded again (bit-identical to an uninterrupted
    recording), and so is what depends on them.

    Args:
        cfg: experiment config; ``cfg.record`` picks terms, anchor stride, projection, budgets.
        out: store directory; an existing store of the same config resumes (or is repaired, or
            is returned as is when complete and intact).
        progress: log the estimate and show progress bars.
        check_budget: refuse when an estimate exceeds ``record.max_seconds``,
            ``record.max_memory_bytes`` or ``record.max_disk_bytes``.
        trainer: a :class:`~currsearch.train.Trainer` with ``cfg``'s data/model/optim/train
            settings to record with (its cached warm-up phase is reused; its ``record``
            section may differ); default: built from ``cfg``.
        reference_order: the order (int64 ``[T]``) of the recorded reference run, e.g. the
            incumbent of a trust-region round; default ``0..T-1``. Estimators expand around
            this run, so they are most accurate for orders near it.
        response_variants: the :class:`~currsearch.adjoint.Variant` s whose read-outs the
            ``response`` term records (default :data:`~currsearch.adjoint.RECORDED_VARIANTS`, what
            the estimators read; ablation studies add others, e.g. ``benchmarks/response_ablation.py``).

    Returns:
        the opened, verified :class:`TrajectoryStore`; its ``trainer()`` is the one recorded with.

    Raises:
        ConfigError: unknown term, ``out`` is a file or lies under one, ``train.device`` missing here. OrderError: ``reference_order`` is not a permutation. BudgetError: an estimate exceeds its budget.
        StoreError: ``out`` holds another store (other config, record settings, data or
            model), a store with a corrupt or malformed manifest, or unrelated files; or an
            incomplete or damaged store recorded in another numerical environment (thread
            count, versions, CPU, device), which a resume would not continue bit-identically.
    """
    check_output_dir(out)
    rec = _Recorder(cfg, Path(out), progress, trainer, reference_order, response_variants)
    if not (Path(out) / "manifest.json").exists():
        est = estimate_cost(rec.trainer, cfg)
        r = cfg.record
        if progress:
            logger.info(f"recording T={rec.T} batches x {len(rec.anchors)} checkpoints, P={rec.P:,} parameters, "
                        f"terms {list(r.terms)}: estimated <= {est['seconds']:.0f} s, ~{est['memory_bytes'] / 2**20:.0f} MiB memory, "
                        f"{est['disk_bytes'] / 2**20:.1f} MiB disk")
        if check_budget:
            over = [(what, est[key], lim) for what, key, lim in (
                ("time (s)", "seconds", r.max_seconds), ("memory (bytes)", "memory_bytes", r.max_memory_bytes),
                ("disk (bytes)", "disk_bytes", r.max_disk_bytes)) if est[key] > lim]
            if over:
                raise BudgetError("recording would exceed its budget: " + "; ".join(
                    f"{w} estimated {v:.3g} > limit {l:.3g}" for w, v, l in over)
                    + "; raise record.max_* or use a larger record.anchor_stride / smaller record.projection_dim")
    store = rec.run()
    store.use_trainer(rec.trainer)
    return store
