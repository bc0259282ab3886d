"""The models directory of a data ablation: the shared base and one model per partition.

Layout (the manifest-directory conventions of :mod:`currsearch.manifest`, as the trajectory
store)::

    DIR/manifest.json                          format, schema version, config, hashes of corpus,
                                               plan, initial weights and base, partitions, budget,
                                               files with SHA-256 and size, partitions done
    DIR/base.safetensors                       theta [P], adam_m [P], adam_v [P], adam_step, eval_loss [E]
    DIR/partitions/part_KKK.safetensors        theta [P], eval_loss [E], train_loss [n]

**Base**: the Trainer's window start (:meth:`Trainer.window_start`): parameters after the
warm-up phase, and the Adam state, fresh or carried as ``train.carry_optimizer_state`` says.
It is stored, so validation and search never rerun the warm-up phase. Written by
:func:`currsearch.ablate.training.train_partitions`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..adam import AdamState
from ..manifest import ManifestDirectory
from ..train import Trainer, WindowStart
from .partitions import PAPER, Partition

FORMAT = "currsearch-ablation-models"
SCHEMA_VERSION = 1


class AblationModels(ManifestDirectory):
    """A directory of partition models (see module docstring). Open with :meth:`open`
    (:meth:`~currsearch.manifest.ManifestDirectory.open`: format, schema, completeness, checksums;
    an incomplete directory: run ``currsearch ablate train`` again to resume).

    Attributes:
        path: the directory; manifest: the parsed manifest.
        partitions: the K :class:`Partition` s; names: their names.
        K: partitions; P: parameters; steps: n, steps per partition model (matched budget);
        eval_names: the E eval sets (domains, then ``"all"``).

    :meth:`trainer` rebuilds the Trainer from the stored config but never runs its warm-up
    phase here: :meth:`window_start` reads the stored base.
    """

    FORMAT = FORMAT
    SCHEMA_VERSION = SCHEMA_VERSION
    trainer_factory = staticmethod(Trainer.from_config)
    MESSAGES = {
        "no_manifest": "{path!r} holds no partition models (no manifest.json); train them with `currsearch ablate train --out {path}`",
        "corrupt": "manifest {mpath!r} is corrupt ({err}); retrain the partition models",
        "format": "{mpath!r} is not a {format} manifest (format {got!r})",
        "schema": "{path!r} has schema version {version}, this currsearch reads version {expected}; "
                  "upgrade currsearch or retrain the partition models",
        "incomplete": "partition models in {path!r} are incomplete ({progress}); run `currsearch ablate train --out {path}` again to resume",
        "file_missing": "file {file!r} is missing; rerun `currsearch ablate train --out {path}` (with the same config, "
                        "--split and --epochs) to train it again",
        "file_size": "file {file!r} has {size} bytes, the manifest says {expected} (truncated or modified)",
        "file_hash": "file {file!r} does not match its SHA-256 in the manifest (modified or corrupt)",
        "config": "partition models in {path!r} were trained with another config; differs in: {diff} "
                  "(stored vs given); use the stored config or another --out",
        "trainer": "partition models in {path!r} do not match the data/model they are used with: {bad} hash differs "
                   "(another corpus, tokenizer, plan seed or initialization); retrain them",
    }

    def __init__(self, path: Path, manifest: dict):
        super().__init__(path, manifest)
        self.partitions = [Partition(p["name"], tuple(p["batches"])) for p in manifest["partitions"]]
        self.names = [p.name for p in self.partitions]
        self.K = len(self.partitions)
        self.P: int = manifest["P"]
        self.steps: int = manifest["steps_per_partition"]
        self.eval_names: list[str] = manifest["eval_names"]

    def expected_files(self) -> list[str]:
        """Files the manifest's progress says were written: the base once its hash is recorded,
        and the finished partition models."""
        done = set(self.manifest["partitions_done"])
        return (["base.safetensors"] if "base" in self.manifest["hashes"] else []) + [
            partition_file(k) for k, p in enumerate(self.partitions) if p.name in done]

    @classmethod
    def progress(cls, manifest: dict) -> str:
        """``"k of K trained"``: partition models finished in an incomplete directory."""
        return f"{len(manifest.get('partitions_done', []))} of {len(manifest.get('partitions', []))} trained"

    def use_trainer(self, trainer) -> None:
        """Make :meth:`trainer` return ``trainer``, checked against the stored config (it trains
        the real union models, so its optimizer settings matter) and hashes.

        Raises:
            StoreError: another config (naming the keys) or other corpus/plan/initial weights.
        """
        self.check_config(trainer.cfg)
        super().use_trainer(trainer)

    def base(self, device="cpu") -> dict[str, torch.Tensor]:
        """The shared base: ``theta``, ``adam_m``, ``adam_v`` (float ``[P]``), ``adam_step`` (int64),
        ``eval_loss`` (float64 ``[E]``, nats/token)."""
        return self._read("base.safetensors", device=device)

    def window_start(self, device="cpu"):
        """The base as a :class:`~currsearch.train.WindowStart` (theta, Adam state, step offset)."""
        b = self.base(device)
        return WindowStart(b["theta"], AdamState(b["adam_m"], b["adam_v"], int(b["adam_step"])), self.manifest["step_offset"])

    def partition(self, k: int, device="cpu") -> dict[str, torch.Tensor]:
        """Partition model k: ``theta`` [P], ``eval_loss`` float64 [E] (nats/token), ``train_loss`` float64 [n]."""
        return self._read(partition_file(k), device=device)

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
            f"Adam state at the base: {'carried' if self.config().train.carry_optimizer_state else 'fresh'}",
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


def partition_file(k: int) -> str:
    """Path of partition model ``k`` relative to the models directory: ``partitions/part_KKK.safetensors``."""
    return f"partitions/part_{k:03d}.safetensors"


def as_models(models) -> AblationModels:
    """``models`` itself if it is an :class:`AblationModels`, else the directory it names opened
    (:meth:`AblationModels.open`, checksums verified).

    Raises:
        StoreError: as :meth:`AblationModels.open`.
    """
    return models if isinstance(models, AblationModels) else AblationModels.open(models)
