"""Data ablations by modular training and parameter averaging (Na et al. 2024, arXiv 2410.15661).

"Which subsets of my data should I train on?" without training one model per subset: train
one model per data *partition* from a shared base, and estimate the eval loss of a model
trained on a union of partitions by the eval loss of the parameter average of those
partitions' models (the paper's "modular training evaluation strategy": models trained on
equally sized base-unit partitions, proxy = perplexity of their parameter average)::

    models = train_partitions(cfg, "runs/ablate")                  # one model per domain
    est = MergeEstimator(models)
    est.estimate(["bible+python", "devil"])                        # float64 [2, E], nats/token
    validate_subsets(models, "runs/ablate/validate")               # merged vs real unions
    run_subset_search(models, "runs/ablate/search", n_trials=64)   # Optuna + real verification

Definitions (one place, used by every function below):

* **Partitions**: by default one per domain of the window batches (``plan.domains``),
  optionally split further into ``split`` contiguous groups of the domain's batch ids
  (names ``domain/0 .. domain/{split-1}``). A partition is a list of window batch ids;
  partitions are disjoint and non-empty.
* **Base**: the Trainer's window start (:meth:`Trainer.window_start`): parameters after the
  warm-up phase, and the Adam state, fresh or carried as ``train.carry_optimizer_state`` says.
  It is stored, so validation and search never rerun the warm-up phase.
* **Matched token budget**: every window batch has ``batch_size * seq_len`` tokens, so a token
  budget is a number of steps. Every partition model takes the same number of steps,
  ``n = epochs * max_k |partition_k|`` (the paper's equally sized base units), cycling over its
  batches in ascending id order (smaller partitions wrap around). A real model for a union S
  (and, more generally, a mixture with weights w over S) takes ``N = |S| * n`` steps: partition
  k contributes ``round(w_k N)`` of them (largest remainder; ``w_k = 1/|S|`` gives exactly n,
  the same tokens per partition as its partition model), drawn from the same cyclic partition
  stream, and the partition streams are interleaved evenly (step i of partition k sits at
  fractional position ``(i + 0.5) / c_k``), i.e. a well-mixed union, not blocks. A singleton
  union is therefore exactly its partition model, and the full set of T equally sized
  partitions with ``epochs = 1`` is one pass over the window.
* **Learning rate**: a run of N steps follows ``lr_at(offset + t, offset + N)`` (its own schedule
  after the warm-up offset; a constant schedule, the default, makes this moot).

Losses are eval losses in nats/token per eval set (``plan.eval_names``: the domains, then
``"all"``); perplexity is ``exp(loss)``.

Models directory layout (the trajectory-store conventions of :mod:`currsearch.store`)::

    DIR/manifest.json                          format, schema version, config, hashes of corpus,
                                               plan, initial weights and base, partitions, budget,
                                               files with SHA-256 and size, partitions done
    DIR/base.safetensors                       theta [P], adam_m [P], adam_v [P], adam_step, eval_loss [E]
    DIR/partitions/part_KKK.safetensors        theta [P], eval_loss [E], train_loss [n]

Writes are atomic and the manifest is rewritten after each file, so a killed ``ablate train``
resumes: finished partitions are verified by checksum and skipped.
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .adam import AdamState, lr_at
from .errors import ConfigError, StoreError
from .store import (
    TRAJECTORY_SECTIONS,
    atomic_save_tensors,
    config_diff,
    sha256_file,
    tensor_sha256,
    write_manifest,
)

FORMAT = "currsearch-ablation-models"
SCHEMA_VERSION = 1
PAPER = "Na et al. 2024, arXiv 2410.15661"


# ---------------------------------------------------------------------------- partitions
@dataclass(frozen=True)
class Partition:
    """A named, non-empty set of window batch ids (ascending).

    Attributes:
        name: e.g. ``"bible"`` or ``"bible/1"`` (after a split).
        batches: window batch ids (indices into ``plan.batches``), ascending, no repeats.
    """

    name: str
    batches: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "batches": list(self.batches)}


def default_partitions(domains: Sequence[str], split: int = 1) -> list[Partition]:
    """One partition per domain of the window batches, optionally split further.

    Args:
        domains: domain name of each window batch (``plan.domains``), length T.
        split: groups per domain (>= 1); the domain's batch ids (ascending) are cut into
            ``split`` contiguous groups of near-equal size, named ``domain/0 .. domain/{split-1}``.

    Returns:
        Partitions sorted by name (``domain/i`` sorted by i).

    Raises:
        ConfigError: ``split < 1`` or a domain with fewer than ``split`` batches.
    """
    if split < 1:
        raise ConfigError(f"split must be >= 1, got {split}")
    by: dict[str, list[int]] = {}
    for l, d in enumerate(domains):
        by.setdefault(d, []).append(l)
    out = []
    for d in sorted(by):
        ids = by[d]
        if split == 1:
            out.append(Partition(d, tuple(ids)))
            continue
        if len(ids) < split:
            raise ConfigError(
                f"domain {d!r} has {len(ids)} window batches, fewer than split = {split}; lower --split or raise data.num_batches"
            )
        for i, part in enumerate(np.array_split(np.array(ids), split)):
            out.append(Partition(f"{d}/{i}", tuple(int(x) for x in part)))
    return out


def check_partitions(partitions, T: int) -> list[Partition]:
    """Validate partitions given as :class:`Partition` objects or ``{name: [batch ids]}``.

    Raises:
        ConfigError: fewer than two partitions, an empty partition, a repeated name, an id out
            of ``0..T-1``, a repeated id, or partitions that overlap.
    """
    if isinstance(partitions, dict):
        partitions = [Partition(str(n), tuple(int(x) for x in ids)) for n, ids in partitions.items()]
    parts = [p if isinstance(p, Partition) else Partition(str(p[0]), tuple(int(x) for x in p[1])) for p in partitions]
    if len(parts) < 2:
        names = [p.name for p in parts]
        raise ConfigError(
            f"a data ablation needs at least 2 partitions, got {len(parts)} {names}; split the domains further "
            "(--split K) or use data.batching = 'domain'"
        )
    seen_names, owner = set(), {}
    out = []
    for p in parts:
        if p.name in seen_names:
            raise ConfigError(f"partition name {p.name!r} is repeated")
        seen_names.add(p.name)
        if not p.batches:
            raise ConfigError(f"partition {p.name!r} is empty; every partition needs at least one window batch")
        bad = [l for l in p.batches if not 0 <= l < T]
        if bad:
            raise ConfigError(f"partition {p.name!r} has batch ids {bad} outside 0..{T - 1}")
        if len(set(p.batches)) != len(p.batches):
            raise ConfigError(f"partition {p.name!r} repeats a batch id")
        for l in p.batches:
            if l in owner:
                raise ConfigError(f"batch {l} is in partitions {owner[l]!r} and {p.name!r}; partitions must be disjoint")
            owner[l] = p.name
        out.append(Partition(p.name, tuple(sorted(p.batches))))
    return out


def steps_per_partition(partitions: Sequence[Partition], epochs: int = 1) -> int:
    """n: steps (= batches of ``batch_size * seq_len`` tokens) of every partition model,
    ``epochs * max_k |partition_k|``; every partition model gets the same token budget."""
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}")
    return epochs * max(len(p.batches) for p in partitions)


def partition_stream(p: Partition, steps: int) -> list[int]:
    """The first ``steps`` batch ids of partition ``p``'s fixed stream: its ids in ascending
    order, repeated (a partition smaller than the budget wraps around)."""
    return [p.batches[i % len(p.batches)] for i in range(steps)]


def union_counts(weights: torch.Tensor, n: int) -> list[int]:
    """Steps per partition of a real union/mixture model (see module docstring).

    Args:
        weights: float ``[K]``, non-negative, summing to 1 (normalized subset weights).
        n: steps per partition model.

    Returns:
        K ints: largest-remainder rounding of ``w_k * N`` with ``N = |support(w)| * n``; they
        sum to N, and uniform weights over S give exactly n for each k in S.
    """
    w = torch.as_tensor(weights, dtype=torch.float64)
    size = int((w > 0).sum())
    N = size * n
    raw = w * N
    base = torch.floor(raw + 1e-9).long()
    rest = N - int(base.sum())
    if rest > 0:
        frac = (raw - base.double()).tolist()
        order = sorted(range(len(frac)), key=lambda k: (-frac[k], k))
        for k in order[:rest]:
            base[k] += 1
    return base.tolist()


def union_stream(partitions: Sequence[Partition], weights: torch.Tensor, n: int) -> list[int]:
    """The batch ids, in training order, of the real model for a subset/mixture.

    Partition k contributes the first ``c_k`` ids of its :func:`partition_stream`
    (``c = union_counts(weights, n)``); the streams are interleaved evenly: step i of
    partition k has key ``(i + 0.5) / c_k`` and the ids are sorted by ``(key, k)``.
    """
    counts = union_counts(weights, n)
    items = []
    for k, (p, c) in enumerate(zip(partitions, counts)):
        for i, l in enumerate(partition_stream(p, c)):
            items.append(((i + 0.5) / c, k, l))
    items.sort(key=lambda x: (x[0], x[1]))
    return [l for _, _, l in items]


def train_stream(trainer, theta: torch.Tensor, adam: AdamState, step_offset: int, stream: Sequence[int]):
    """Train ``theta`` on the window batches ``stream`` in order (one AdamW step each).

    The learning rate of step t is ``lr_at(step_offset + t, step_offset + len(stream))``.

    Returns:
        ``(theta [P], train_losses float64 [len(stream)] nats/token, seconds)``.
    """
    theta, adam = theta.clone(), adam.clone()
    total = step_offset + len(stream)
    losses = torch.empty(len(stream), dtype=torch.float64)
    t0 = time.perf_counter()
    for t, l in enumerate(stream):
        lr = lr_at(step_offset + t, total, trainer.cfg.optim)
        theta, adam, losses[t] = trainer.step(theta, adam, lr, trainer.batch(int(l)))
    return theta, losses, time.perf_counter() - t0


# ---------------------------------------------------------------------------- the models directory
class AblationModels:
    """A directory of partition models (see module docstring). Open with :meth:`open`.

    Attributes:
        path: the directory; manifest: the parsed manifest.
        partitions: the K :class:`Partition` s; names: their names.
        K: partitions; P: parameters; steps: n, steps per partition model (matched budget);
        eval_names: the E eval sets (domains, then ``"all"``).
    """

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self.partitions = [Partition(p["name"], tuple(p["batches"])) for p in manifest["partitions"]]
        self.names = [p.name for p in self.partitions]
        self.K = len(self.partitions)
        self.P: int = manifest["P"]
        self.steps: int = manifest["steps_per_partition"]
        self.eval_names: list[str] = manifest["eval_names"]
        self._trainer = None

    @classmethod
    def open(cls, path, verify: bool = True, allow_incomplete: bool = False) -> "AblationModels":
        """Open a models directory, checking format, schema, completeness and checksums.

        Raises:
            StoreError: no or corrupt manifest, another format or schema, incomplete training
                (run ``currsearch ablate train`` again to resume), a missing/truncated/modified file.
        """
        path = Path(path)
        mpath = path / "manifest.json"
        if not mpath.is_file():
            raise StoreError(f"{str(path)!r} holds no partition models (no manifest.json); train them with `currsearch ablate train --out {path}`")
        try:
            m = json.loads(mpath.read_text())
        except json.JSONDecodeError as err:
            raise StoreError(f"manifest {str(mpath)!r} is corrupt ({err}); retrain the partition models") from None
        if m.get("format") != FORMAT:
            raise StoreError(f"{str(mpath)!r} is not a {FORMAT} manifest (format {m.get('format')!r})")
        if m.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(
                f"{str(path)!r} has schema version {m.get('schema_version')}, this currsearch reads version {SCHEMA_VERSION}; "
                "upgrade currsearch or retrain the partition models"
            )
        if not allow_incomplete and m.get("phase") != "complete":
            raise StoreError(
                f"partition models in {str(path)!r} are incomplete ({len(m.get('partitions_done', []))} of "
                f"{len(m.get('partitions', []))} trained); run `currsearch ablate train --out {path}` again to resume"
            )
        models = cls(path, m)
        if verify:
            models.verify()
        return models

    def verify(self) -> None:
        """Check every file of the manifest: present, recorded size and SHA-256.

        Raises:
            StoreError: naming the first missing, truncated or modified file.
        """
        for rel, info in self.manifest["files"].items():
            f = self.path / rel
            if not f.is_file():
                raise StoreError(f"file {str(f)!r} is missing; rerun `currsearch ablate train` on this directory to rebuild it")
            size = f.stat().st_size
            if size != info["bytes"]:
                raise StoreError(f"file {str(f)!r} has {size} bytes, the manifest says {info['bytes']} (truncated or modified)")
            if sha256_file(f) != info["sha256"]:
                raise StoreError(f"file {str(f)!r} does not match its SHA-256 in the manifest (modified or corrupt)")

    def config(self):
        """The full :class:`~currsearch.config.Config` the models were trained with."""
        from .config import config_from_dict

        return config_from_dict(self.manifest["config"], source=str(self.path / "manifest.json"))

    def check_config(self, cfg) -> None:
        """Raise StoreError if ``cfg`` differs from the recorded one in data/model/optim/train (naming the keys)."""
        diff = config_diff(self.manifest["config"], cfg.to_dict(), TRAJECTORY_SECTIONS)
        if diff:
            raise StoreError(
                f"partition models in {str(self.path)!r} were trained with another config; differs in: {', '.join(diff)} "
                "(stored vs given); use the stored config or another --out"
            )

    def check_trainer(self, trainer) -> None:
        """Raise StoreError if a Trainer's corpus, plan or initial weights differ from the recorded hashes."""
        h = self.manifest["hashes"]
        got = {"corpus": trainer.corpus_hash, "plan": trainer.plan.fingerprint(), "init_weights": tensor_sha256(trainer.theta_init)}
        bad = [k for k, v in got.items() if v != h[k]]
        if bad:
            raise StoreError(
                f"partition models in {str(self.path)!r} do not match the data/model they are used with: {bad} hash differs "
                "(another corpus, tokenizer, plan seed or initialization); retrain them"
            )

    def use_trainer(self, trainer) -> None:
        """Make :meth:`trainer` return ``trainer`` (checked against config and hashes)."""
        self.check_config(trainer.cfg)
        self.check_trainer(trainer)
        self._trainer = trainer

    def trainer(self):
        """A :class:`~currsearch.train.Trainer` rebuilt from the stored config, hash-checked (cached).
        Its warm-up phase is never run here: :meth:`window_start` reads the stored base."""
        if self._trainer is None:
            from .train import Trainer

            tr = Trainer.from_config(self.config())
            self.check_trainer(tr)
            self._trainer = tr
        return self._trainer

    def _read(self, rel: str, device="cpu") -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        with safe_open(str(self.path / rel), framework="pt", device=str(device)) as f:
            return {n: f.get_tensor(n) for n in f.keys()}

    def base(self, device="cpu") -> dict[str, torch.Tensor]:
        """The shared base: ``theta``, ``adam_m``, ``adam_v`` (float ``[P]``), ``adam_step`` (int64),
        ``eval_loss`` (float64 ``[E]``, nats/token)."""
        return self._read("base.safetensors", device)

    def window_start(self, device="cpu"):
        """The base as a :class:`~currsearch.train.WindowStart` (theta, Adam state, step offset)."""
        from .train import WindowStart

        b = self.base(device)
        return WindowStart(b["theta"], AdamState(b["adam_m"], b["adam_v"], int(b["adam_step"])), self.manifest["step_offset"])

    def partition(self, k: int, device="cpu") -> dict[str, torch.Tensor]:
        """Partition model k: ``theta`` [P], ``eval_loss`` float64 [E] (nats/token), ``train_loss`` float64 [n]."""
        return self._read(_part_file(k), device)

    def thetas(self, device="cpu") -> torch.Tensor:
        """All partition models' parameters stacked: ``[K, P]`` (the model dtype)."""
        return torch.stack([self.partition(k, device)["theta"] for k in range(self.K)])

    def eval_losses(self) -> torch.Tensor:
        """Eval losses of the partition models: float64 ``[K, E]`` (nats/token)."""
        return torch.stack([self.partition(k)["eval_loss"] for k in range(self.K)])

    def summary(self) -> str:
        """A human-readable summary (what ``currsearch ablate train`` prints)."""
        m = self.manifest
        base = self.base()["eval_loss"].tolist()
        lines = [
            f"partition models {self.path} ({m['phase']}; {PAPER})",
            f"  K = {self.K} partitions, P = {self.P:,} parameters, n = {self.steps} steps per partition model "
            f"({m['epochs']} epoch(s), {self.steps * m['tokens_per_step']:,} tokens), "
            f"Adam state at the base: {'carried' if m['config']['train']['carry_optimizer_state'] else 'fresh'}",
            f"  {'model':<14} {'batches':>7} " + " ".join(f"{n:>9}" for n in self.eval_names) + "   (eval loss, nats/token)",
            f"  {'base':<14} {'':>7} " + " ".join(f"{x:>9.4f}" for x in base),
        ]
        for k, p in enumerate(self.partitions):
            if p.name in m["partitions_done"]:
                ev = self.partition(k)["eval_loss"].tolist()
                lines.append(f"  {p.name:<14} {len(p.batches):>7} " + " ".join(f"{x:>9.4f}" for x in ev))
            else:
                lines.append(f"  {p.name:<14} {len(p.batches):>7}   (not trained yet)")
        lines.append(f"  training time {m['train_seconds']:.1f} s (warm-up phase {m['base_seconds']:.1f} s)")
        return "\n".join(lines)


def _part_file(k: int) -> str:
    return f"partitions/part_{k:03d}.safetensors"


def train_partitions(cfg, out, partitions=None, split: int = 1, epochs: int = 1, progress: bool = False,
                     crash_after: int | None = None, trainer=None) -> AblationModels:
    """Train one model per partition from the shared base and store them (resumable).

    Each partition model continues training from :meth:`Trainer.window_start` (parameters and
    Adam state, fresh or carried per ``train.carry_optimizer_state``) for ``n =
    steps_per_partition(partitions, epochs)`` steps on its :func:`partition_stream` (the same
    token budget for every partition, as the paper's equally sized base units). Na et al.
    2024 (arXiv 2410.15661), modular training of base-unit partitions.

    Args:
        cfg: the experiment config.
        out: models directory (created; an existing one with a manifest is resumed).
        partitions: ``None`` (:func:`default_partitions` of ``plan.domains`` with ``split``), a
            list of :class:`Partition` or ``{name: [batch ids]}``.
        split: groups per domain for the default partitions.
        epochs: passes over the largest partition (sets the budget n).
        progress: progress bars.
        crash_after: testing hook: raise ``KeyboardInterrupt`` after this many partition models
            were written by this call (simulates a kill).
        trainer: a Trainer built from ``cfg`` to reuse (its warm-up phase is cached).

    Returns:
        The complete :class:`AblationModels`.

    Raises:
        ConfigError: bad partitions/split/epochs, or a trainer of another config.
        StoreError: ``out`` is a non-empty directory without a manifest, or holds models of
            another config, partitions, budget or data, or a missing/tampered file.
    """
    from .train import Trainer

    out = Path(out)
    if trainer is not None and trainer.cfg != cfg:
        raise ConfigError("train_partitions(): the given trainer was built from another config; pass the trainer of this config")
    tr = trainer if trainer is not None else Trainer.from_config(cfg)
    parts = check_partitions(default_partitions(tr.plan.domains, split) if partitions is None else partitions, tr.T)
    n = steps_per_partition(parts, epochs)
    t_start = time.perf_counter()

    mpath = out / "manifest.json"
    if mpath.exists():
        models = AblationModels.open(out, verify=True, allow_incomplete=True)
        models.check_config(cfg)
        m = models.manifest
        if [p.to_dict() for p in parts] != m["partitions"] or m["epochs"] != epochs:
            raise StoreError(
                f"partition models in {str(out)!r} were trained with other partitions or epochs "
                f"({[p['name'] for p in m['partitions']]}, epochs {m['epochs']} vs {[p.name for p in parts]}, epochs {epochs}); "
                "use the same --split/--epochs to resume, or another --out"
            )
        models.check_trainer(tr)
    else:
        if out.exists() and any(out.iterdir()):
            raise StoreError(f"output directory {str(out)!r} exists, is not empty and holds no partition models; choose another --out")
        import transformers

        from . import __version__

        m = {
            "format": FORMAT, "schema_version": SCHEMA_VERSION, "method": PAPER,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": cfg.to_dict(),
            "hashes": {"corpus": tr.corpus_hash, "plan": tr.plan.fingerprint(), "init_weights": tensor_sha256(tr.theta_init),
                       "config": cfg.fingerprint(*TRAJECTORY_SECTIONS)},
            "T": tr.T, "P": tr.model.num_params, "eval_names": list(tr.plan.eval_names),
            "batch_domains": list(tr.plan.domains), "tokens_per_step": cfg.data.batch_size * cfg.data.seq_len,
            "partitions": [p.to_dict() for p in parts], "epochs": epochs, "steps_per_partition": n,
            "step_offset": cfg.train.warmup_steps, "budget": "every partition model takes n = epochs * max |partition| steps; "
            "a real union of S takes |S| * n (see currsearch.ablate)",
            "versions": {"currsearch": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                         "python": platform.python_version()},
            "files": {}, "phase": "partitions", "partitions_done": [], "seconds": {}, "base_seconds": 0.0, "train_seconds": 0.0,
        }
    out.mkdir(parents=True, exist_ok=True)
    (out / "partitions").mkdir(exist_ok=True)
    for stray in out.rglob(".*.tmp*"):  # left by a kill in the middle of an atomic write
        stray.unlink()
    base_seconds0, train_seconds0 = m["base_seconds"], m["train_seconds"]

    def save(rel: str, tensors: dict) -> None:
        atomic_save_tensors(out / rel, tensors)
        m["files"][rel] = {"sha256": sha256_file(out / rel), "bytes": (out / rel).stat().st_size}

    if "base.safetensors" not in m["files"]:
        t0 = time.perf_counter()
        s = tr.window_start(progress=progress)
        m["base_seconds"] = base_seconds0 + time.perf_counter() - t0
        save("base.safetensors", {"theta": s.theta, "adam_m": s.adam.m, "adam_v": s.adam.v,
                                  "adam_step": torch.tensor(s.adam.step, dtype=torch.int64), "eval_loss": tr.evaluate(s.theta)})
        m["hashes"]["base"] = tensor_sha256(s.theta)
        write_manifest(out, m)
    models = AblationModels(out, m)
    start = models.window_start(tr.device)

    todo = [k for k, p in enumerate(parts) if p.name not in m["partitions_done"]]
    written = 0
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(parts), initial=len(parts) - len(todo), desc="partition models", unit="model")
    try:
        for k in todo:
            p = parts[k]
            theta, losses, secs = train_stream(tr, start.theta, start.adam, start.step_offset, partition_stream(p, n))
            save(_part_file(k), {"theta": theta, "eval_loss": tr.evaluate(theta), "train_loss": losses})
            m["partitions_done"].append(p.name)
            m["seconds"][p.name] = secs
            m["train_seconds"] = train_seconds0 + time.perf_counter() - t_start
            if len(m["partitions_done"]) == len(parts):
                m["phase"] = "complete"
            write_manifest(out, m)
            written += 1
            if bar is not None:
                bar.update(1)
            if crash_after is not None and written >= crash_after and m["phase"] != "complete":
                raise KeyboardInterrupt(f"simulated crash after {written} partition model(s)")
    finally:
        if bar is not None:
            bar.close()
    if m["phase"] != "complete":  # nothing was left to do but the phase was not marked
        m["phase"] = "complete"
        write_manifest(out, m)
    models = AblationModels.open(out, verify=False)
    models._trainer = tr
    return models


def _as_models(models) -> AblationModels:
    return models if isinstance(models, AblationModels) else AblationModels.open(models)


# ---------------------------------------------------------------------------- subsets
def parse_subsets(spec, names: Sequence[str]) -> torch.Tensor:
    """Parse subsets given by name into raw (unnormalized) weights.

    ``spec`` is one string or a list of strings; each string is one subset: partition names
    joined by ``+``, each optionally with a weight ``name:w`` (``"bible+python"``,
    ``"bible:3+python:1"``); ``*`` is the full set; a domain name that was split selects all of
    its parts (``"bible"`` = ``bible/0 + bible/1 + ...``).

    Returns:
        float64 ``[n, K]`` non-negative weights (columns in ``names`` order).

    Raises:
        ConfigError: an empty subset, an unknown name (the known ones are listed), a repeated
            partition, a weight that is not a non-negative finite number.
    """
    if isinstance(spec, str):
        spec = [spec]
    names = list(names)
    rows = []
    for s in spec:
        row = torch.zeros(len(names), dtype=torch.float64)
        named: set[int] = set()
        tokens = [t.strip() for t in str(s).split("+") if t.strip()]
        if not tokens:
            raise ConfigError(f"subset {s!r} is empty; name at least one partition of {names}")
        for tok in tokens:
            name, w = tok, 1.0
            if ":" in tok:
                head, _, tail = tok.rpartition(":")
                try:
                    w = float(tail)
                except ValueError:
                    raise ConfigError(f"subset {s!r}: weight {tail!r} of {head!r} is not a number") from None
                name = head.strip()
            if not math.isfinite(w) or w < 0:
                raise ConfigError(f"subset {s!r}: weight {w} of {name!r} must be a non-negative finite number")
            if name == "*":
                cols = list(range(len(names)))
            elif name in names:
                cols = [names.index(name)]
            else:
                cols = [k for k, n in enumerate(names) if n.startswith(name + "/")]
                if not cols:
                    raise ConfigError(f"subset {s!r}: unknown partition {name!r}; partitions are {names}")
            for c in cols:
                if c in named:
                    raise ConfigError(f"subset {s!r} names partition {names[c]!r} twice")
                named.add(c)
                row[c] = w
        if not bool((row > 0).any()):
            raise ConfigError(f"subset {s!r} has no partition with a positive weight")
        rows.append(row)
    return torch.stack(rows)


def subset_weights(subsets, names: Sequence[str]) -> torch.Tensor:
    """Validate subsets and return normalized mixture weights.

    Args:
        subsets: bool ``[n, K]`` or ``[K]`` (membership: uniform average), float ``[n, K]``
            (non-negative mixture weights, normalized per row), or names (:func:`parse_subsets`).
        names: the K partition names.

    Returns:
        float64 ``[n, K]``, rows non-negative and summing to 1.

    Raises:
        ConfigError: wrong shape, an empty subset (all-False / all-zero row), a negative or
            non-finite weight, unknown names.
    """
    K = len(names)
    if isinstance(subsets, str) or (isinstance(subsets, (list, tuple)) and subsets and isinstance(subsets[0], str)):
        w = parse_subsets(subsets, names)
    else:
        w = torch.as_tensor(subsets)
        if w.dim() == 1:
            w = w[None]
        if w.dim() != 2 or w.shape[1] != K:
            raise ConfigError(f"subsets must have shape [n, K={K}] (one column per partition {list(names)}), got {tuple(w.shape)}")
        w = w.to(torch.float64)
        if not bool(torch.isfinite(w).all()):
            rows = (~torch.isfinite(w)).any(1).nonzero().flatten().tolist()
            raise ConfigError(f"subset rows {rows[:5]} have non-finite weights")
        if bool((w < 0).any()):
            r, c = (w < 0).nonzero()[0].tolist()
            raise ConfigError(f"subset row {r}: weight {float(w[r, c])} of partition {names[c]!r} is negative; weights must be >= 0")
    empty = (w.sum(1) <= 0).nonzero().flatten().tolist()
    if empty:
        raise ConfigError(f"subset rows {empty[:5]} are empty (no partition selected); every subset needs at least one partition")
    return w / w.sum(1, keepdim=True)


def subset_label(weights, names: Sequence[str]) -> str:
    """``"bible+python"`` for a uniform subset, ``"bible:0.700+python:0.300"`` for a mixture."""
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    sel = [k for k in range(len(names)) if w[k] > 0]
    vals = w[sel]
    if vals.numel() and float(vals.max() - vals.min()) <= 1e-9:
        return "+".join(names[k] for k in sel)
    return "+".join(f"{names[k]}:{float(w[k]):.3f}" for k in sel)


def all_subsets(K: int) -> torch.Tensor:
    """Every non-empty subset of K partitions: bool ``[2^K - 1, K]``, ordered by size, then
    lexicographically (singletons first, the full set last)."""
    rows = []
    for size in range(1, K + 1):
        for comb in itertools.combinations(range(K), size):
            r = torch.zeros(K, dtype=torch.bool)
            r[list(comb)] = True
            rows.append(r)
    return torch.stack(rows)


def sample_subsets(K: int, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` distinct non-empty subsets of K partitions (seeded): the full set, then subsets
    whose size is uniform in 1..K and members uniform; bool ``[n, K]``.

    Raises:
        ConfigError: ``n`` exceeds ``2^K - 1`` or is < 1.
    """
    if n < 1 or (K < 60 and n > 2**K - 1):
        raise ConfigError(f"cannot sample {n} distinct non-empty subsets of {K} partitions")
    g = torch.Generator().manual_seed(seed)
    seen = {tuple(range(K))}
    rows = [torch.ones(K, dtype=torch.bool)]
    while len(rows) < n:
        size = int(torch.randint(1, K + 1, (1,), generator=g))
        members = tuple(sorted(torch.randperm(K, generator=g)[:size].tolist()))
        if members not in seen:
            seen.add(members)
            r = torch.zeros(K, dtype=torch.bool)
            r[list(members)] = True
            rows.append(r)
    return torch.stack(rows)


# ---------------------------------------------------------------------------- the estimator
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
        self.models = _as_models(models)
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
            from tqdm.auto import tqdm

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


def train_union(models, subset) -> dict:
    """Train the real model for one subset/mixture from the stored base (matched budget).

    ``|S| * n`` steps on :func:`union_stream` (see the module docstring); a singleton gives
    exactly its partition model.

    Args:
        models: an :class:`AblationModels` (or directory).
        subset: one subset (bool/float ``[K]`` or a name string such as ``"bible+python"``).

    Returns:
        ``{"theta" [P], "eval_loss" float64 [E] (nats/token), "steps", "counts" (steps per
        partition), "seconds"}``.
    """
    models = _as_models(models)
    tr = models.trainer()
    w = subset_weights(subset, models.names)[0]
    stream = union_stream(models.partitions, w, models.steps)
    s = models.window_start(tr.device)
    theta, _, secs = train_stream(tr, s.theta, s.adam, s.step_offset, stream)
    return {"theta": theta, "eval_loss": tr.evaluate(theta), "steps": len(stream),
            "counts": union_counts(w, models.steps), "seconds": secs}


def real_union(models, subset) -> dict:
    """The real model's eval losses for one subset/mixture, as :func:`train_union`, except that a
    single partition reads its stored partition model: training it again would repeat the same
    computation (same base, stream and budget; ``tests/test_ablate.py`` checks the equality).

    Returns:
        ``{"eval_loss" float64 [E] (nats/token), "steps", "seconds", "reused" (bool)}``.
    """
    models = _as_models(models)
    w = subset_weights(subset, models.names)[0]
    if int((w > 0).sum()) == 1:
        k = int(torch.argmax(w))
        return {"eval_loss": models.partition(k)["eval_loss"], "steps": models.steps,
                "seconds": float(models.manifest["seconds"].get(models.names[k], 0.0)), "reused": True}
    r = train_union(models, w)
    return {"eval_loss": r["eval_loss"], "steps": r["steps"], "seconds": r["seconds"], "reused": False}


# ---------------------------------------------------------------------------- validation
def _corr(est: np.ndarray, true: np.ndarray) -> dict:
    from scipy import stats

    n = int(est.size)
    ok = n >= 3 and np.ptp(est) > 0 and np.ptp(true) > 0
    nan = float("nan")
    pe, pt = np.exp(est), np.exp(true)
    return {
        "n": n,
        "spearman": float(stats.spearmanr(est, true).statistic) if ok else nan,
        "pearson_ppl": float(stats.pearsonr(pe, pt).statistic) if ok else nan,
        "pearson_loss": float(stats.pearsonr(est, true).statistic) if ok else nan,
        "absdiff": float(np.mean(np.abs(est - true))) if n else nan,
        "spread": float(np.ptp(true)) if n else nan,
    }


def validate_subsets(models, out=None, max_subsets: int = 16, seed: int = 0, progress: bool = False) -> dict:
    """Merged-model estimates vs real union training, per eval set.

    The subsets are all non-empty subsets when there are at most ``max_subsets`` of them
    (``2^K - 1``), else a seeded :func:`sample_subsets` of ``max_subsets``. Each is trained for
    real (:func:`real_union`: ``|S| * n`` steps from the same base, the same tokens per
    partition as the partition models; a singleton is its stored partition model) and
    estimated by its uniform parameter average
    (:class:`MergeEstimator`). Metrics per eval set: Spearman rho (perplexity and loss rank
    alike), Pearson r between merged and real perplexity (and loss), mean |difference|
    (nats/token); on all subsets and on those with >= 2 partitions (singletons are exact by
    construction: the real singleton model is the partition model) and, per subset size with
    >= 3 subsets, among subsets of one size (equal real token budget). As in Na et al. 2024
    (arXiv 2410.15661), the proxy is judged by its correlation with real perplexity.

    Args:
        models: an :class:`AblationModels` or its directory.
        out: directory for ``validation.json``, ``validation.md`` and ``validation_scatter.png``
            (``None``: no files).
        max_subsets: exhaustive up to this many subsets, else a sample of this size.
        seed: seed of the sample.

    Returns:
        ``{"partitions", "eval_names", "subsets": [{"label", "size", "weights", "merged",
        "real" (nats/token per eval set), "steps", "seconds"}], "metrics": {eval set: {"all":
        {...}, "size>=2": {...}, "by_size": {size: {...}}}}, "cost": {...}, "exhaustive"}``; each
        metrics entry is ``{"n", "spearman", "pearson_ppl", "pearson_loss", "absdiff", "spread"}``
        (NaN when n < 3 or constant).
    """
    models = _as_models(models)
    est = MergeEstimator(models)
    K, names, ev = models.K, models.names, models.eval_names
    exhaustive = K < 30 and 2**K - 1 <= max_subsets
    subs = all_subsets(K) if exhaustive else sample_subsets(K, max_subsets, seed)
    t0 = time.perf_counter()
    merged = est.estimate(subs)
    est_seconds = time.perf_counter() - t0
    real, rows = [], []
    it = range(subs.shape[0])
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="real union models", unit="subset")
    for i in it:
        r = real_union(models, subs[i])
        real.append(r["eval_loss"])
        rows.append({"label": subset_label(subs[i], names), "size": int(subs[i].sum()), "weights": subs[i].double().tolist(),
                     "merged": dict(zip(ev, merged[i].tolist())), "real": dict(zip(ev, r["eval_loss"].tolist())),
                     "steps": r["steps"], "seconds": r["seconds"], "reused_partition_model": r["reused"]})
    real_t = torch.stack(real)
    sizes = subs.sum(1)
    metrics = {}
    for j, name in enumerate(ev):
        e, t = merged[:, j].numpy(), real_t[:, j].numpy()
        multi = (sizes >= 2).numpy()
        by_size = {str(k): _corr(e[(sizes == k).numpy()], t[(sizes == k).numpy()])
                   for k in sorted(set(sizes.tolist())) if int((sizes == k).sum()) >= 3 and 1 < k}
        metrics[name] = {"all": _corr(e, t), "size>=2": _corr(e[multi], t[multi]), "by_size": by_size}
    real_seconds = sum(r["seconds"] for r in rows)
    n = subs.shape[0]
    result = {
        "method": PAPER,
        "models": str(models.path),
        "partitions": [p.to_dict() for p in models.partitions],
        "eval_names": ev,
        "steps_per_partition": models.steps,
        "exhaustive": exhaustive,
        "seed": seed,
        "subsets": rows,
        "metrics": metrics,
        "cost": {"estimate_seconds_per_subset": est_seconds / n, "real_seconds_per_subset": real_seconds / n,
                 "speedup": (real_seconds / n) / max(est_seconds / n, 1e-12),
                 "partition_training_seconds": models.manifest["train_seconds"]},
    }
    if out is not None:
        result["files"] = [str(p) for p in write_validation_report(result, out)]
    return result


def _fmt(x, spec=".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def render_validation_markdown(result: dict) -> str:
    """Markdown of a :func:`validate_subsets` result: metrics per eval set, then every subset."""
    ev = result["eval_names"]
    n, K = len(result["subsets"]), len(result["partitions"])
    c = result["cost"]
    lines = [
        "# Data ablation: merged vs real models", "",
        f"Proxy of {PAPER}: eval perplexity of the uniform parameter average of partition models vs a model trained "
        f"for real on the union (|S| x {result['steps_per_partition']} steps from the same base). "
        f"{n} subsets of K = {K} partitions ({'all of them' if result['exhaustive'] else 'a seeded sample'}). "
        f"Estimate {c['estimate_seconds_per_subset']:.3g} s/subset vs real training {c['real_seconds_per_subset']:.3g} s/subset.", "",
        "| eval set | Spearman rho | Pearson r (ppl) | rho, size>=2 | r (ppl), size>=2 | mean abs diff (nats/token) | real spread |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ev:
        a, b = result["metrics"][name]["all"], result["metrics"][name]["size>=2"]
        lines.append(f"| {name} | {_fmt(a['spearman'])} | {_fmt(a['pearson_ppl'])} | {_fmt(b['spearman'])} | "
                     f"{_fmt(b['pearson_ppl'])} | {_fmt(a['absdiff'], '.4f')} | {_fmt(a['spread'], '.4f')} |")
    sizes = sorted({k for name in ev for k in result["metrics"][name].get("by_size", {})}, key=int)
    if sizes:
        lines += ["", "Within one subset size (equal real token budget): Spearman rho / Pearson r (ppl), n subsets:", "",
                  "| eval set | " + " | ".join(f"size {k}" for k in sizes) + " |", "|---|" + "---|" * len(sizes)]
        for name in ev:
            bs = result["metrics"][name]["by_size"]
            lines.append(f"| {name} | " + " | ".join(
                f"{_fmt(bs[k]['spearman'], '.2f')} / {_fmt(bs[k]['pearson_ppl'], '.2f')} (n={bs[k]['n']})" if k in bs else "n/a"
                for k in sizes) + " |")
    lines += ["", "Perplexity per subset (merged / real):", "",
              "| subset | size | " + " | ".join(ev) + " |", "|---|---|" + "---|" * len(ev)]
    for r in sorted(result["subsets"], key=lambda r: r["real"][ev[-1]]):
        lines.append(f"| {r['label']} | {r['size']} | " + " | ".join(
            f"{math.exp(r['merged'][e]):.2f} / {math.exp(r['real'][e]):.2f}" for e in ev) + " |")
    return "\n".join(lines) + "\n"


def write_validation_report(result: dict, out_dir) -> list[Path]:
    """Write ``validation.json`` (NaN as null), ``validation.md`` and ``validation_scatter.png``
    (merged vs real perplexity, one panel per eval set, colored by subset size); returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .fidelity import _finite

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "validation.json").write_text(json.dumps(_finite(result), indent=1, allow_nan=False))
    (out / "validation.md").write_text(render_validation_markdown(result))
    ev = result["eval_names"]
    ncols = min(len(ev), 3)
    nrows = math.ceil(len(ev) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.9 * nrows), squeeze=False, layout="constrained")
    sizes = np.array([r["size"] for r in result["subsets"]])
    cmap = plt.get_cmap("viridis")
    for ax, name in zip(axes.flat, ev):
        x = np.exp([r["real"][name] for r in result["subsets"]])
        y = np.exp([r["merged"][name] for r in result["subsets"]])
        for k in sorted(set(sizes.tolist())):
            sel = sizes == k
            ax.scatter(x[sel], y[sel], s=22, color=cmap((k - 1) / max(sizes.max() - 1, 1)), label=f"{k} partition(s)")
        lo, hi = min(x.min(), y.min()), max(x.max(), y.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.7, label="y = x")
        m = result["metrics"][name]["all"]
        ax.set(xlabel="real perplexity", ylabel="merged perplexity",
               title=f"{name}: rho {_fmt(m['spearman'], '.2f')}, r {_fmt(m['pearson_ppl'], '.2f')}")
    axes.flat[0].legend(fontsize=7)
    for ax in list(axes.flat)[len(ev):]:
        ax.axis("off")
    path = out / "validation_scatter.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [out / "validation.json", out / "validation.md", path]


# ---------------------------------------------------------------------------- search
@dataclass
class SubsetSearchResult:
    """Distinct subsets/mixtures scored by an Optuna study, best first.

    Attributes:
        study: the Optuna study (earlier runs of a resumed study included).
        names: the K partition names; eval_names: the E eval sets; objective: the minimized one.
        weights: float64 ``[m, K]`` normalized weights of the distinct completed trials, best first.
        estimates: float64 ``[m, E]`` merged eval losses (nats/token).
        values: float64 ``[m]`` the objective column of ``estimates``.
        n_trials: finished trials in the study (complete + pruned empty subsets).
        n_run: trials asked by this call; seconds: its wall time.
    """

    study: object
    names: list[str]
    eval_names: list[str]
    objective: str
    weights: torch.Tensor
    estimates: torch.Tensor
    values: torch.Tensor
    n_trials: int
    n_run: int
    seconds: float
    labels: list[str] = field(default_factory=list)

    def top(self, k: int = 1) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """The ``k`` best: list of ``(label, weights float64 [K], estimates float64 [E])``."""
        return [(self.labels[i], self.weights[i], self.estimates[i]) for i in range(min(k, self.weights.shape[0]))]


def _decode(trial, names: Sequence[str], use_weights: bool, min_weight: float) -> list[float]:
    use = [trial.suggest_categorical(f"use:{n}", [0, 1]) for n in names]
    if not use_weights:
        return [float(u) for u in use]
    return [trial.suggest_float(f"weight:{n}", min_weight, 1.0) if u else 0.0 for n, u in zip(names, use)]


def _key(w: torch.Tensor) -> tuple:
    return tuple(round(float(x), 6) for x in w)


def search_subsets(estimator, n_trials: int = 64, sampler="tpe", weights: bool = False, objective: str = "all",
                   storage=None, study_name: str | None = None, seed: int = 0, batch_size: int = 8,
                   min_weight: float = 0.05, progress: bool = False) -> SubsetSearchResult:
    """Search subsets (and optionally mixture weights) minimizing the merged eval loss.

    Optuna ask/tell (the driver of :mod:`currsearch.search`: :func:`make_sampler`,
    :func:`make_storage`, resumable with a ``.journal`` storage): one categorical 0/1 parameter
    ``use:<partition>`` per partition and, with ``weights``, ``weight:<partition>`` in
    ``[min_weight, 1]`` for each used partition (normalized). An empty subset is told PRUNED.
    Trials are asked ``batch_size`` at a time and their subsets scored in one
    :meth:`MergeEstimator.estimate` call (identical subsets are scored once). A fresh study is
    seeded with the full set and every single partition.

    Args:
        estimator: a :class:`MergeEstimator` (or an :class:`AblationModels` / directory).
        n_trials: finished trials wanted in the study (a resumed study counts its own).
        sampler: ``tpe``, ``cmaes``, ``gp``, ``nsga2``, ``random`` or an Optuna sampler.
        weights: search mixture weights too (merged model = weighted average).
        objective: eval set whose merged loss is minimized.
        storage: ``None``, a ``*.journal`` path or an Optuna storage URL.
        study_name: default ``"ablate-subsets-<objective>"`` / ``"ablate-weights-<objective>"``.

    Returns:
        :class:`SubsetSearchResult`.

    Raises:
        ConfigError: unknown objective or sampler, ``n_trials < 0``, ``batch_size < 1``, a bad
            ``min_weight``, a resumed study of other partitions/models/objective/mode.
    """
    import optuna

    from .search import _check_resume, make_sampler, make_storage

    t0 = time.perf_counter()
    est = estimator if isinstance(estimator, MergeEstimator) else MergeEstimator(estimator)
    names, ev = est.names, est.eval_names
    if objective not in ev:
        raise ConfigError(f"unknown objective eval set {objective!r}; eval sets are {ev}")
    if n_trials < 0 or batch_size < 1:
        raise ConfigError(f"n_trials must be >= 0 and batch_size >= 1 (got {n_trials}, {batch_size})")
    if not 0 < min_weight <= 1:
        raise ConfigError(f"min_weight must be in (0, 1], got {min_weight}")
    j = ev.index(objective)
    sampler_obj = make_sampler(sampler, seed=seed) if isinstance(sampler, str) else sampler
    name = study_name or f"ablate-{'weights' if weights else 'subsets'}-{objective}"
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(max(verbosity, optuna.logging.WARNING))
    try:
        study = optuna.create_study(storage=make_storage(storage), sampler=sampler_obj, study_name=name,
                                    direction="minimize", load_if_exists=True)
        fresh = len(study.get_trials(deepcopy=False)) == 0
        _check_resume(study, {"partitions": names, "objective": objective, "weights": bool(weights),
                              "models": est.models.manifest["hashes"].get("base", ""), "min_weight": min_weight})
        if fresh:
            full = {f"use:{n}": 1 for n in names}
            if weights:
                full.update({f"weight:{n}": 1.0 for n in names})
            study.enqueue_trial(full, user_attrs={"source": "full"})
            for n in names:
                p = {f"use:{m}": int(m == n) for m in names}
                if weights:
                    p[f"weight:{n}"] = 1.0
                study.enqueue_trial(p, user_attrs={"source": f"single:{n}"})
        done_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        budget = max(0, n_trials - len(study.get_trials(deepcopy=False, states=done_states)))
        cache: dict[tuple, torch.Tensor] = {}
        bar = None
        if progress and budget:
            from tqdm.auto import tqdm

            bar = tqdm(total=budget, desc=f"search {name}", unit="trial")
        n_run = 0
        try:
            while n_run < budget:
                k = min(batch_size, budget - n_run)
                trials = [study.ask() for _ in range(k)]
                n_run += k
                told = 0
                try:
                    raw = [torch.tensor(_decode(t, names, weights, min_weight), dtype=torch.float64) for t in trials]
                    normed = [r / r.sum() if r.sum() > 0 else None for r in raw]
                    new = list(dict.fromkeys(_key(w) for w in normed if w is not None and _key(w) not in cache))
                    if new:
                        scores = est.estimate(torch.tensor(new, dtype=torch.float64))
                        cache.update(zip(new, scores))
                    for t, w in zip(trials, normed):
                        if w is None:
                            t.set_user_attr("reason", "empty subset")
                            study.tell(t, state=optuna.trial.TrialState.PRUNED)
                        else:
                            s = cache[_key(w)]
                            t.set_user_attr("weights", w.tolist())
                            t.set_user_attr("estimates", s.tolist())
                            t.set_user_attr("label", subset_label(w, names))
                            study.tell(t, float(s[j]))
                        told += 1
                except BaseException:
                    for t in trials[told:]:
                        study.tell(t, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
                    raise
                if bar is not None:
                    bar.update(k)
        finally:
            if bar is not None:
                bar.close()
        trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        seen: dict[tuple, int] = {}
        W, E = [], []
        for t in trials:
            w = t.user_attrs.get("weights")
            e = t.user_attrs.get("estimates")
            if w is None or e is None:
                continue
            key = _key(torch.tensor(w))
            if key not in seen:
                seen[key] = len(W)
                W.append(w)
                E.append(e)
        Wt = torch.tensor(W, dtype=torch.float64).view(-1, len(names))
        Et = torch.tensor(E, dtype=torch.float64).view(-1, len(ev))
        rank = torch.sort(Et[:, j], stable=True).indices
        Wt, Et = Wt[rank], Et[rank]
        n_finished = len(study.get_trials(deepcopy=False, states=done_states))
        return SubsetSearchResult(study, names, ev, objective, Wt, Et, Et[:, j], n_finished, n_run,
                                  time.perf_counter() - t0, [subset_label(w, names) for w in Wt])
    finally:
        optuna.logging.set_verbosity(verbosity)


def verify_subsets(models, candidates: dict, estimator: MergeEstimator | None = None, progress: bool = False) -> dict:
    """Train each candidate subset/mixture for real (:func:`real_union`) next to its merged estimate.

    Args:
        candidates: ``{name: subset}`` (weights ``[K]``, bool ``[K]`` or a name string).

    Returns:
        ``{name: {"label", "weights", "estimated", "verified" ({eval set: nats/token}), "steps",
        "seconds", "reused_partition_model"}}``; identical subsets are trained once.
    """
    models = _as_models(models)
    est = estimator or MergeEstimator(models)
    ev = models.eval_names
    done: dict[tuple, tuple] = {}
    out = {}
    for name, sub in candidates.items():
        w = subset_weights(sub, models.names)[0]
        key = _key(w)
        if key not in done:
            r = real_union(models, w)
            e = est.estimate(w[None])[0]
            done[key] = (r, e)
            if progress:
                print(f"verified {name} ({subset_label(w, models.names)}): {ev[-1]} = {float(r['eval_loss'][-1]):.4f} "
                      f"nats/token real, {float(e[-1]):.4f} merged ({r['seconds']:.2f} s)", flush=True)
        r, e = done[key]
        out[name] = {"label": subset_label(w, models.names), "weights": w.tolist(),
                     "estimated": dict(zip(ev, e.tolist())), "verified": dict(zip(ev, r["eval_loss"].tolist())),
                     "steps": r["steps"], "seconds": r["seconds"], "reused_partition_model": r["reused"]}
    return out


def run_subset_search(models, out=None, n_trials: int = 64, sampler="tpe", weights: bool = False, objective: str = "all",
                      top_k: int = 3, seed: int = 0, batch_size: int = 8, storage=None, progress: bool = False) -> dict:
    """Search subsets with :func:`search_subsets`, verify the top-k by real training, and report
    them against the full set and the best single partition (both also trained for real).

    Args:
        models: an :class:`AblationModels` or its directory.
        out: directory for ``search.json``, ``search.md``, ``optimization_history.png`` and the
            study journal (``study.journal`` unless ``storage`` is given); ``None``: in memory.
        top_k: distinct searched subsets to verify.
        Others: as :func:`search_subsets`.

    Returns:
        ``{"search": {...top subsets...}, "candidates": {name: verify_subsets entry}, "summary":
        {"best_searched", "full", "best_single", losses on the objective, "beats_full", "best_is_full",
        "beats_best_single", "merged_optimum" (exhaustive merged optimum when K is small and
        no weights), "search_found_merged_optimum"}}``.
    """
    models = _as_models(models)
    est = MergeEstimator(models)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        storage = storage or str(out / "study.journal")
    res = search_subsets(est, n_trials=n_trials, sampler=sampler, weights=weights, objective=objective, storage=storage,
                         seed=seed, batch_size=batch_size, progress=progress)
    names = models.names
    cands = {f"search_{i + 1}": w for i, (_, w, _) in enumerate(res.top(top_k))}
    cands["full"] = torch.ones(models.K, dtype=torch.float64)
    for k, n in enumerate(names):
        cands[f"single:{n}"] = torch.nn.functional.one_hot(torch.tensor(k), models.K).double()
    verified = verify_subsets(models, cands, est, progress=progress)
    loss = {n: v["verified"][objective] for n, v in verified.items()}
    searched = [n for n in verified if n.startswith("search_")]
    singles = [n for n in verified if n.startswith("single:")]
    best = min(searched, key=lambda n: (loss[n], n)) if searched else None
    best_single = min(singles, key=lambda n: (loss[n], n))
    summary = {
        "objective": objective,
        "best_searched": best, "best_searched_label": verified[best]["label"] if best else None,
        "best_searched_loss": loss[best] if best else None,
        "full_loss": loss["full"], "best_single": best_single, "best_single_loss": loss[best_single],
        "beats_full": (loss[best] < loss["full"]) if best else None,
        "best_is_full": (verified[best]["label"] == verified["full"]["label"]) if best else None,
        "beats_best_single": (loss[best] < loss[best_single]) if best else None,
        "merged_optimum": None, "search_found_merged_optimum": None,
    }
    if not weights and models.K <= 10:
        subs = all_subsets(models.K)
        allest = est.estimate(subs)[:, res.eval_names.index(objective)]
        i = int(torch.argmin(allest))
        summary["merged_optimum"] = {"label": subset_label(subs[i], names), "estimated": float(allest[i])}
        summary["search_found_merged_optimum"] = bool(res.labels) and res.labels[0] == summary["merged_optimum"]["label"]
    result = {
        "method": PAPER, "models": str(models.path), "partitions": names, "eval_names": res.eval_names,
        "search": {"study": res.study.study_name, "storage": str(storage) if storage else None, "n_trials": res.n_trials,
                   "n_run": res.n_run, "seconds": res.seconds, "weights": weights, "sampler": sampler if isinstance(sampler, str) else type(sampler).__name__,
                   "distinct": int(res.weights.shape[0]),
                   "top": [{"label": l, "weights": w.tolist(), "estimates": dict(zip(res.eval_names, e.tolist()))}
                           for l, w, e in res.top(max(top_k, 10))]},
        "candidates": verified,
        "summary": summary,
    }
    if out is not None:
        result["files"] = [str(p) for p in write_search_report(result, out, res.study)]
    return result


def render_search_markdown(result: dict) -> str:
    """Markdown of a :func:`run_subset_search` result."""
    s, ev, obj = result["summary"], result["eval_names"], result["summary"]["objective"]
    se = result["search"]
    lines = [
        "# Data ablation: subset search", "",
        f"Optuna study `{se['study']}` ({se['sampler']}, {'subsets and mixture weights' if se['weights'] else 'subsets'}): "
        f"{se['n_trials']} trials, {se['distinct']} distinct candidates, objective = merged eval loss on `{obj}` "
        f"({PAPER} proxy). Verified candidates were trained for real from the same base with matched budget.", "",
        f"| candidate | subset | merged {obj} | real {obj} | " + " | ".join(f"real {e}" for e in ev if e != obj) + " | steps |",
        "|---|---|---|---|" + "---|" * (len(ev) - 1) + "---|",
    ]
    for name, v in sorted(result["candidates"].items(), key=lambda kv: kv[1]["verified"][obj]):
        lines.append(f"| {name} | {v['label']} | {v['estimated'][obj]:.4f} | {v['verified'][obj]:.4f} | "
                     + " | ".join(f"{v['verified'][e]:.4f}" for e in ev if e != obj) + f" | {v['steps']} |")
    if s["best_searched"]:
        vs_full = "is the full set" if s.get("best_is_full") else f"{'beats' if s['beats_full'] else 'does not beat'} the full set"
        lines += ["", f"Best verified searched subset `{s['best_searched_label']}`: {s['best_searched_loss']:.4f} nats/token "
                  f"on `{obj}`; it {vs_full} ({s['full_loss']:.4f}) and "
                  f"{'beats' if s['beats_best_single'] else 'does not beat'} the best single partition "
                  f"(`{s['best_single']}`, {s['best_single_loss']:.4f})."]
    if s.get("merged_optimum"):
        lines.append(f"Exhaustive optimum of the merged estimate: `{s['merged_optimum']['label']}` "
                     f"({s['merged_optimum']['estimated']:.4f}); found by the search: {s['search_found_merged_optimum']}.")
    return "\n".join(lines) + "\n"


def write_search_report(result: dict, out_dir, study=None) -> list[Path]:
    """Write ``search.json``, ``search.md`` and (with a study) ``optimization_history.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    from .fidelity import _finite

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "search.json").write_text(json.dumps(_finite(result), indent=1, allow_nan=False))
    (out / "search.md").write_text(render_search_markdown(result))
    paths = [out / "search.json", out / "search.md"]
    if study is not None:
        trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if trials:
            xs = [t.number for t in trials]
            ys = [math.exp(t.value) for t in trials]
            run = [min(ys[: i + 1]) for i in range(len(ys))]
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.scatter(xs, ys, s=8, alpha=0.5, label="trial")
            ax.step(xs, run, where="post", color="C1", label="best so far")
            ax.set(xlabel="trial number", ylabel=f"merged perplexity, {result['summary']['objective']}",
                   title="subset search: optimization history")
            ax.legend(fontsize=7)
            fig.tight_layout()
            paths.append(out / "optimization_history.png")
            fig.savefig(paths[-1], dpi=100)
            plt.close(fig)
    return paths
