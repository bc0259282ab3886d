"""Training in data ablations: the partition models (resumable) and real models for unions.

Every model continues from the stored base (:meth:`AblationModels.window_start`) with the
matched token budget of :mod:`currsearch.ablate.partitions`. **Learning rate**: a run of N
steps follows ``lr_at(offset + t, offset + N)`` (its own schedule after the warm-up offset; a
constant schedule, the default, makes this moot).

Writes are atomic and the manifest is rewritten after each file, so a killed ``ablate train``
resumes: finished partitions are verified by checksum and skipped.
"""

from __future__ import annotations

import datetime
import logging
import platform
import time
from pathlib import Path
from typing import Sequence

import torch
import transformers
from tqdm.auto import tqdm

from .. import __version__

from ..adam import AdamState, lr_at
from ..errors import ConfigError, StoreError
from ..manifest import (
    TRAJECTORY_SECTIONS,
    check_output_dir,
    config_diff,
    make_output_dir,
    remove_partial_writes,
    save_listed_tensors,
    tensor_sha256,
    trainer_hashes,
    write_manifest,
)
from ..train import Trainer
from .models import FORMAT, SCHEMA_VERSION, AblationModels, as_models, partition_file
from .partitions import (
    PAPER,
    check_partitions,
    default_partitions,
    partition_stream,
    steps_per_partition,
    union_counts,
    union_stream,
)
from .subsets import subset_weights

logger = logging.getLogger(__name__)


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


def _new_manifest(cfg, tr, parts, epochs: int, n: int) -> dict:
    """The manifest of a fresh partition-models directory (nothing trained yet)."""
    return {
        "format": FORMAT, "schema_version": SCHEMA_VERSION, "method": PAPER,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": cfg.to_dict(),
        "hashes": {**trainer_hashes(tr), "config": cfg.fingerprint(*TRAJECTORY_SECTIONS)},
        "T": tr.T, "P": tr.model.num_params, "eval_names": list(tr.plan.eval_names),
        "batch_domains": list(tr.plan.domains), "tokens_per_step": cfg.data.batch_size * cfg.data.seq_len,
        "partitions": [p.to_dict() for p in parts], "epochs": epochs, "steps_per_partition": n,
        "step_offset": cfg.train.warmup_steps, "budget": "every partition model takes n = epochs * max |partition| steps; "
        "a real union of S takes |S| * n (see currsearch.ablate)",
        "versions": {"currsearch": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "files": {}, "phase": "partitions", "partitions_done": [], "seconds": {}, "base_seconds": 0.0, "train_seconds": 0.0,
    }


def _forget_damaged(out: Path, m: dict, parts, damaged: list[str]) -> None:
    """Make a manifest forget damaged files (missing, truncated, modified or unlisted) so that
    :func:`train_partitions` writes them again, in place: a damaged partition model is trained
    again, a damaged base is recomputed from the warm-up phase (when it comes out other than
    the stored hash, every partition model is trained again). Each damaged file is deleted and
    its entry removed."""
    names = {partition_file(k): p.name for k, p in enumerate(parts)}
    for rel in damaged:
        m["files"].pop(rel, None)
        (out / rel).unlink(missing_ok=True)
        m["phase"] = "partitions"
        if rel in names:
            m["partitions_done"] = [n for n in m["partitions_done"] if n != names[rel]]
            m["seconds"].pop(names[rel], None)


def _train_missing(tr, out: Path, m: dict, parts, n: int, start, train_seconds0: float, progress: bool,
                   crash_after: int | None) -> None:
    """Train and save (manifest after each) the partition models not yet in ``m["partitions_done"]``."""
    t_start = time.perf_counter()  # partition training only (the warm-up phase is base_seconds)
    todo = [k for k, p in enumerate(parts) if p.name not in m["partitions_done"]]
    written = 0
    bar = None
    if progress and todo:
        bar = tqdm(total=len(parts), initial=len(parts) - len(todo), desc="partition models", unit="model")
    try:
        for k in todo:
            p = parts[k]
            theta, losses, secs = train_stream(tr, start.theta, start.adam, start.step_offset, partition_stream(p, n))
            save_listed_tensors(out, m, partition_file(k), {"theta": theta, "eval_loss": tr.evaluate(theta), "train_loss": losses})
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
            another config, partitions, budget or data. A missing, truncated or modified file
            is not an error: it is deleted and trained again (a warning names it).
    """
    check_output_dir(out)
    out = Path(out)
    if trainer is not None and config_diff(trainer.cfg.to_dict(), cfg.to_dict()):
        raise ConfigError("train_partitions(): the given trainer was built from another config; pass the trainer of this config")
    tr = trainer if trainer is not None else Trainer.from_config(cfg)
    parts = check_partitions(default_partitions(tr.plan.domains, split) if partitions is None else partitions, tr.T)
    n = steps_per_partition(parts, epochs)

    mpath = out / "manifest.json"
    if mpath.exists():
        models = AblationModels.open(out, verify=False, allow_incomplete=True)
        models.check_config(cfg)
        m = models.manifest
        if [p.to_dict() for p in parts] != m["partitions"] or m["epochs"] != epochs:
            raise StoreError(
                f"partition models in {str(out)!r} were trained with other partitions or epochs "
                f"({[p['name'] for p in m['partitions']]}, epochs {m['epochs']} vs {[p.name for p in parts]}, epochs {epochs}); "
                "use the same --split/--epochs to resume, or another --out"
            )
        models.check_trainer(tr)
        damaged = models.problems()
        if damaged:
            _forget_damaged(out, m, parts, [rel for rel, _ in damaged])
            write_manifest(out, m)  # the repair is on disk even if this call is killed before retraining
            logger.warning("partition models %s: retraining %d damaged file(s): %s", out, len(damaged),
                           "; ".join(e for _, e in damaged))
    else:
        if out.exists() and any(out.iterdir()):
            raise StoreError(f"output directory {str(out)!r} exists, is not empty and holds no partition models; choose another --out")
        m = _new_manifest(cfg, tr, parts, epochs, n)
    make_output_dir(out / "partitions")
    remove_partial_writes(out)
    base_seconds0, train_seconds0 = m["base_seconds"], m["train_seconds"]

    if "base.safetensors" not in m["files"]:
        t0 = time.perf_counter()
        s = tr.window_start(progress=progress)
        m["base_seconds"] = base_seconds0 + time.perf_counter() - t0
        base = tensor_sha256(s.theta)
        if m["hashes"].get("base", base) != base:  # a recomputed base that differs: the kept models sit on the old one
            logger.warning("partition models %s: the recomputed base differs from the stored one; training every "
                           "partition model again", out)
            _forget_damaged(out, m, parts, [partition_file(k) for k, p in enumerate(parts) if p.name in m["partitions_done"]])
        save_listed_tensors(out, m, "base.safetensors", {
            "theta": s.theta, "adam_m": s.adam.m, "adam_v": s.adam.v,
            "adam_step": torch.tensor(s.adam.step, dtype=torch.int64), "eval_loss": tr.evaluate(s.theta)})
        m["hashes"]["base"] = base
        write_manifest(out, m)
    models = AblationModels(out, m)
    _train_missing(tr, out, m, parts, n, models.window_start(tr.device), train_seconds0, progress, crash_after)
    if m["phase"] != "complete":  # nothing was left to do but the phase was not marked
        m["phase"] = "complete"
        write_manifest(out, m)
    models = AblationModels.open(out, verify=False)
    models.use_trainer(tr)
    return models


def train_union(models, subset) -> dict:
    """Train the real model for one subset/mixture from the stored base (matched budget).

    ``|S| * n`` steps on :func:`union_stream` (the matched budget of
    :mod:`currsearch.ablate.partitions`); a singleton gives exactly its partition model.

    Args:
        models: an :class:`AblationModels` (or directory).
        subset: one subset (bool/float ``[K]`` or a name string such as ``"bible+python"``).

    Returns:
        ``{"theta" [P], "eval_loss" float64 [E] (nats/token), "steps", "counts" (steps per
        partition), "seconds"}``.
    """
    models = as_models(models)
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
    models = as_models(models)
    w = subset_weights(subset, models.names)[0]
    if int((w > 0).sum()) == 1:
        k = int(torch.argmax(w))
        return {"eval_loss": models.partition(k)["eval_loss"], "steps": models.steps,
                "seconds": float(models.manifest["seconds"].get(models.names[k], 0.0)), "reused": True}
    r = train_union(models, w)
    return {"eval_loss": r["eval_loss"], "steps": r["steps"], "seconds": r["seconds"], "reused": False}
