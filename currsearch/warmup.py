"""On-disk cache of the warm-up phase's end state, so repeated jobs do not train it again.

:meth:`currsearch.train.Trainer.window_start` trains ``train.warmup_steps`` AdamW steps on the
plan's mixed warm-up pool before the ordered window. Every job of a config (train, record,
fidelity, search, ablation) builds a Trainer and needs that same state, which on a realistic
config (``examples/medium.toml``) costs minutes. This module stores it once per key::

    ROOT/<key>/manifest.json        format, schema version, key and the fields it hashes,
                                    full config, hashes, step, seconds, files + SHA-256
    ROOT/<key>/start.safetensors    theta, adam_m, adam_v: float [P] each

``ROOT`` is ``train.warmup_cache`` (:func:`cache_root`; ``"off"`` disables the cache). The
key (:func:`warmup_key`) is the SHA-256 of the canonical JSON of everything that determines
the end state: the data, model and optim sections, the train section without the keys that
do not touch the warm-up phase (:data:`NOT_WARMUP_KEYS`), the corpus, plan and initial-weight
hashes of the Trainer, and the numerical environment (torch and transformers versions, the
torch thread count, the CPU capability and the device), since CPU training is bit-identical
only under the same thread count. The Adam state is stored before the window's optional
reset (``train.carry_optimizer_state``), so fresh and warm settings share one entry.

An entry is written like the stores (:mod:`currsearch.manifest`: atomic writes, SHA-256 of
every file). On load it is checked (format, schema, file checksums, key, hashes, tensor
shapes and dtypes, step); any problem logs a warning and the warm-up phase is trained again
and the entry rewritten: a cached start is never used unchecked, and the loaded tensors are
bit-identical to the ones that were computed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from pydantic import StrictInt, StrictStr

from .adam import AdamState
from .data import cache_dir
from .errors import ConfigError, StoreError
from .manifest import (ManifestDirectory, ManifestModel, remove_partial_writes, save_listed_tensors, trainer_hashes,
                       write_manifest)

logger = logging.getLogger(__name__)

FORMAT = "currsearch-warmup"
SCHEMA_VERSION = 1
#: the safetensors file of an entry (tensors ``theta``, ``adam_m``, ``adam_v``)
STATE_FILE = "start.safetensors"
#: train-section keys that do not change the warm-up phase's end state (left out of the key)
NOT_WARMUP_KEYS = ("carry_optimizer_state", "eval_batch_size", "warmup_cache")


def cache_root(warmup_cache: str) -> Optional[Path]:
    """The cache directory a ``train.warmup_cache`` value names.

    Returns:
        ``None`` for ``"off"``; ``cache_dir() / "warmup"`` for ``"auto"`` (``$CURRSEARCH_CACHE``,
        default ``~/.cache/currsearch``, see :func:`currsearch.data.cache_dir`); otherwise the
        value as a path (``~`` expanded).
    """
    if warmup_cache == "off":
        return None
    if warmup_cache == "auto":
        return cache_dir() / "warmup"
    return Path(warmup_cache).expanduser()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment(device: torch.device) -> dict[str, Any]:
    """What besides the config changes the bits of a training run: torch and transformers
    versions, torch's intra-op thread count, CPU architecture and capability, and the device
    (with the GPU's name on CUDA)."""
    env = {"torch": torch.__version__, "transformers": _version("transformers"), "threads": torch.get_num_threads(),
           "machine": platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "device": str(device)}
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def warmup_key_fields(trainer) -> dict[str, Any]:
    """The JSON-serializable fields :func:`warmup_key` hashes (see the module docstring).

    Args:
        trainer: a :class:`~currsearch.train.Trainer` (its config, plan, initial weights, device).
    """
    d = trainer.cfg.to_dict()
    config = {s: d[s] for s in ("data", "model", "optim")}
    config["train"] = {k: v for k, v in d["train"].items() if k not in NOT_WARMUP_KEYS}
    return {"format": FORMAT, "schema_version": SCHEMA_VERSION, "config": config, "hashes": trainer_hashes(trainer),
            "environment": environment(trainer.device)}


def warmup_key(fields: dict[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON (sorted keys) of :func:`warmup_key_fields`."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


class WarmupManifest(ManifestModel):
    """``manifest.json`` of a warm-up cache entry: the common keys plus ``key`` (hex), ``key_fields``
    (what it hashes), ``step`` (Adam steps taken, = ``train.warmup_steps``)."""

    key: StrictStr
    key_fields: dict[str, Any]
    step: StrictInt


class WarmupEntry(ManifestDirectory):
    """One cache entry (``ROOT/<key>``); open with :meth:`open` (checks format, schema, checksums)."""

    FORMAT: ClassVar[str] = FORMAT
    SCHEMA_VERSION: ClassVar[int] = SCHEMA_VERSION
    SCHEMA: ClassVar[type[ManifestModel]] = WarmupManifest
    DATA_GLOBS: ClassVar[tuple[str, ...]] = ()  # only the listed state file is ever read
    MESSAGES: ClassVar[dict[str, str]] = {
        "no_manifest": "no manifest.json in {path!r}",
        "corrupt": "manifest {mpath!r} does not parse ({err})",
        "format": "manifest {mpath!r} has format {got!r}, not {format!r}",
        "schema": "entry {path!r} has schema version {version}, this currsearch reads {expected}",
        "incomplete": "entry {path!r} is incomplete ({progress})",
        "file_missing": "file {file!r} is missing",
        "file_size": "file {file!r} has {size} bytes, the manifest says {expected}",
        "file_hash": "file {file!r} does not match its SHA-256 in the manifest (modified or corrupt)",
        "config": "entry {path!r} was written for another config ({diff})",
        "trainer": "entry {path!r} was written for other data or initial weights (differing hashes: {bad})",
    }

    def check_key(self, key: str) -> None:
        """Raise StoreError unless the entry was written under ``key`` (and its fields hash to it)."""
        m = self.manifest
        if m["key"] != key or warmup_key(m["key_fields"]) != key:
            raise StoreError(f"entry {str(self.path)!r} holds key {m['key'][:16]}..., expected {key[:16]}... "
                             "(written for another config, data or environment, or edited)")

    def state(self, like: torch.Tensor, steps: int) -> tuple[torch.Tensor, AdamState]:
        """The stored ``(theta [P], AdamState)`` on ``like``'s device, checked against ``like``.

        Raises:
            StoreError: a tensor missing or not of ``like``'s shape and dtype, or a step other than ``steps``.
        """
        t = self._read(STATE_FILE, ["theta", "adam_m", "adam_v"], device=like.device)
        bad = [f"{n} {tuple(x.shape)} {x.dtype}" for n, x in t.items() if x.shape != like.shape or x.dtype != like.dtype]
        if bad:
            raise StoreError(f"entry {str(self.path)!r} holds {bad}, expected {tuple(like.shape)} {like.dtype}")
        if self.manifest["step"] != steps:
            raise StoreError(f"entry {str(self.path)!r} holds the state after {self.manifest['step']} steps, expected {steps}")
        return t["theta"], AdamState(t["adam_m"], t["adam_v"], steps)


def load_warmup(trainer) -> Optional[tuple[torch.Tensor, AdamState]]:
    """The cached end state of ``trainer``'s warm-up phase, or ``None`` (cache off, no entry, or
    an unusable entry: logged as a warning, so the caller trains and :func:`save_warmup` rewrites it).

    Args:
        trainer: a :class:`~currsearch.train.Trainer` with ``train.warmup_steps > 0``.

    Returns:
        ``(theta [P], AdamState)`` on the trainer's device, exactly the stored values (the Adam
        state as the warm-up phase left it, before any window reset), or ``None``.
    """
    root = cache_root(trainer.cfg.train.warmup_cache)
    if root is None:
        return None
    key = warmup_key(warmup_key_fields(trainer))
    path = root / key
    if not (path / "manifest.json").is_file():
        logger.info("warm-up phase not cached yet (%s)", path)
        return None
    try:
        entry = WarmupEntry.open(path)
        entry.check_key(key)
        entry.check_trainer(trainer)
        state = entry.state(trainer.theta_init, trainer.cfg.train.warmup_steps)
    except (StoreError, OSError) as err:
        logger.warning("warm-up cache entry %s is unusable (%s); training the warm-up phase again and rewriting it",
                       path, err)
        return None
    logger.info("warm-up phase loaded from the cache (%s)", path)
    return state


def save_warmup(trainer, theta: torch.Tensor, adam: AdamState, seconds: float) -> Optional[Path]:
    """Store the end state of ``trainer``'s warm-up phase (atomic writes: the state file, then
    the manifest listing its SHA-256). A failed write (read-only or full disk) logs a warning
    and changes nothing else.

    Args:
        trainer: the :class:`~currsearch.train.Trainer` that trained it.
        theta: float ``[P]`` parameters after the warm-up phase.
        adam: the Adam state after it (``step`` = ``train.warmup_steps``), before any window reset.
        seconds: wall time of the warm-up phase (recorded for information).

    Returns:
        The entry directory, or ``None`` (cache off, or the write failed).
    """
    root = cache_root(trainer.cfg.train.warmup_cache)
    if root is None:
        return None
    fields = warmup_key_fields(trainer)
    key = warmup_key(fields)
    path = root / key
    manifest = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "phase": "complete", "key": key,
                "key_fields": fields, "config": trainer.cfg.to_dict(), "hashes": fields["hashes"], "step": adam.step,
                "seconds": seconds, "files": {}}
    try:
        if path.is_dir():  # a killed earlier write left its temporary file (3 P floats) here
            remove_partial_writes(path, dead_only=True)
        save_listed_tensors(path, manifest, STATE_FILE, {"theta": theta, "adam_m": adam.m, "adam_v": adam.v})
        write_manifest(path, manifest)
    except (OSError, ConfigError) as err:  # ConfigError: a file lies in the cache's path (make_output_dir)
        logger.warning("could not write the warm-up cache entry %s (%s); continuing without it", path, err)
        return None
    logger.info("warm-up phase cached in %s", path)
    return path
