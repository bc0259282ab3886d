"""TrajectoryStore: a self-describing directory of recorded trajectory terms.

Layout::

    DIR/manifest.json                    schema version, config, hashes, T, k, terms, files + SHA-256
    DIR/checkpoints/ckpt_TTTTT.safetensors   reference state at anchor checkpoint t:
                                         theta, adam_m, adam_v [P], adam_step; eval_loss [E]
                                         (with record.checkpoint_eval)
    DIR/pairs/pairs_TTTTT.safetensors    per anchor t, the recorded terms for every batch l
    DIR/final.safetensors                theta [P] and eval_loss [E] after the window
    DIR/final_eval_grads.safetensors     eval_grad_proj [E, k]: projected eval gradients at theta_T
    DIR/calibration/NAME_KEY.json        real runs and fits of the calibrated estimators (written later,
                                         listed in the manifest when written)
    DIR/verify/runs.json                 real runs of verified orders (currsearch.verify; written later, listed)

Every file is written to a temporary name and renamed (atomic on POSIX), and the manifest
(also written atomically) lists each file with its SHA-256 and size. Opening a store checks
the schema version and every checksum; a truncated, modified or missing file, another
schema, or a config that does not match raises :class:`~currsearch.errors.StoreError`
naming the file or the mismatched keys; so does a malformed manifest (its shape is
validated, :class:`StoreManifest`) and a data file the manifest does not list. A damaged file
of a store whose manifest is intact is re-recorded by running ``currsearch record`` again
(a damaged cache of real runs, ``calibration/`` or ``verify/``, is dropped: its runs are
trained again when needed).
Tensors are safetensors (no pickle anywhere), loaded memory-mapped (``safe_open``) onto any
device.

The store does not build its :class:`~currsearch.train.Trainer` unless asked: pass the one you
have (``TrajectoryStore.open(path, trainer=tr)``), or :meth:`TrajectoryStore.trainer` builds one
from the recorded config (``Trainer.from_config``) and checks it against the recorded hashes.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from .errors import StoreError
from .manifest import ManifestDirectory, ManifestModel
from .train import Trainer


SCHEMA_VERSION = 1
FORMAT = "currsearch-trajectory-store"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow")


class ProjectionEntry(_Strict):
    """The manifest's JL projection: kind, input and output dimension, seed, block size."""

    kind: StrictStr
    dim_in: StrictInt = Field(ge=1)
    dim_out: StrictInt = Field(ge=1)
    seed: StrictInt
    block: StrictInt = Field(ge=1)


class TensorEntry(_Strict):
    """One recorded tensor: dtype, shape and the term that produced it."""

    dtype: StrictStr
    shape: list[StrictInt]
    term: StrictStr
    anchor: StrictInt = None  # set for a term recorded at one anchor only


class Versions(_Strict):
    """Library versions the store was recorded with."""

    currsearch: StrictStr
    torch: StrictStr


class StoreManifest(ManifestModel):
    """The keys of a trajectory store's ``manifest.json`` that the store reads (strict types)."""

    T: StrictInt
    P: StrictInt
    eval_names: list[StrictStr]
    anchors: list[StrictInt]
    anchor_stride: StrictInt
    terms: list[StrictStr]
    tensors: dict[str, TensorEntry]
    projection: ProjectionEntry
    checkpoints_done: list[StrictInt]
    pairs_done: list[StrictInt]
    reference_order: list[StrictInt] = None  # absent in stores recorded along 0..T-1 (None is not valid)
    created: StrictStr
    versions: Versions
    formula_bytes: StrictInt
    record_seconds: StrictFloat
    reference_seconds: StrictFloat
    batch_domains: list[StrictStr] = None  # absent in older stores (read from the plan then)
    batch_metadata: list[dict[str, Any]] = None


def checkpoint_file(t: int) -> str:
    """Relative path of the checkpoint file of anchor ``t``."""
    return f"checkpoints/ckpt_{t:05d}.safetensors"


def pairs_file(t: int) -> str:
    """Relative path of the pair-terms file of anchor ``t``."""
    return f"pairs/pairs_{t:05d}.safetensors"


REPAIR = ("run `currsearch record --out {path}` again with the config the store was recorded with "
          "(`currsearch inspect {path}` shows it) to re-record the damaged file(s)")


class TrajectoryStore(ManifestDirectory):
    """A recorded trajectory store (see module docstring). Open with :meth:`open`
    (:meth:`~currsearch.manifest.ManifestDirectory.open`: format, schema, completeness, checksums).

    Attributes:
        path: the store directory.
        manifest: the parsed manifest (dict).
        T: window length; P: parameter count; k: projection dimension;
        eval_names: the E eval sets; anchors: checkpoint indices with pair terms;
        terms: names of the recorded pair terms.
        reference_order: int64 ``[T]``, the order of the recorded run (property).
    """

    FORMAT = FORMAT
    SCHEMA_VERSION = SCHEMA_VERSION
    SCHEMA = StoreManifest
    trainer_factory = staticmethod(Trainer.from_config)
    MESSAGES = {
        "no_manifest": "{path!r} is not a trajectory store (no manifest.json); record one with `currsearch record`",
        "corrupt": "manifest {mpath!r} is corrupt ({err}); delete {path!r} and record the store again",
        "malformed": "manifest {mpath!r} is malformed: {err}; it was not written by currsearch or was edited: "
                     "delete {path!r} and record the store again",
        "format": "{mpath!r} is not a {format} manifest",
        "schema": "store {path!r} has schema version {version}, this currsearch reads version {expected}; "
                  "upgrade currsearch or re-record the store",
        "incomplete": "store {path!r} is incomplete ({progress}); run `currsearch record` again to resume it",
        "file_missing": "store file {file!r} is missing; " + REPAIR,
        "file_size": "store file {file!r} has {size} bytes, the manifest says {expected} (truncated or modified); " + REPAIR,
        "file_hash": "store file {file!r} does not match its SHA-256 in the manifest (modified or corrupt); " + REPAIR,
        "file_unlisted": "store file {file!r} is not listed in the manifest (its entry was removed, or the file was "
                         "copied in), so its content cannot be checked; " + REPAIR,
        "not_safetensors": "store file {file!r} is not a readable safetensors file ({err}); " + REPAIR,
        "config": "store {path!r} was recorded with another config; differs in: {diff} "
                  "(store vs given); use the store's config or record a new store",
        "trainer": "store {path!r} does not match the model/data it is used with: {bad} hash differs "
                   "(another corpus, tokenizer, plan seed or model initialization); record a new store",
    }

    def __init__(self, path, manifest: dict):
        """Wrap a validated manifest; use :meth:`open` (it validates and checks the files)."""
        super().__init__(path, manifest)
        self.T: int = manifest["T"]
        self.P: int = manifest["P"]
        self.k: int = manifest["projection"]["dim_out"]
        self.eval_names: list[str] = manifest["eval_names"]
        self.anchors: list[int] = manifest["anchors"]
        self.terms: list[str] = manifest["terms"]

    def expected_files(self) -> list[str]:
        """Files the manifest's progress says were written: the done checkpoints and pairs, the
        final state once the pair phase started, its eval gradients once complete."""
        m = self.manifest
        out = [checkpoint_file(t) for t in m["checkpoints_done"]] + [pairs_file(t) for t in m["pairs_done"]]
        if m["phase"] != "reference":
            out.append("final.safetensors")
        if m["phase"] == "complete":
            out.append("final_eval_grads.safetensors")
        return out

    @property
    def reference_order(self) -> torch.Tensor:
        """The order of the recorded reference run, int64 ``[T]`` (``0..T-1`` unless recorded
        around another order, e.g. a trust-region incumbent): step t trained batch
        ``reference_order[t]``, and checkpoint t is the state before that step."""
        return torch.tensor(self.manifest.get("reference_order", list(range(self.T))), dtype=torch.int64)

    @property
    def domains(self) -> list[str]:
        """Domain of each of the T batches (as ``BatchPlan.domains``), from the manifest."""
        return self.manifest["batch_domains"] if "batch_domains" in self.manifest else self.trainer().plan.domains

    @property
    def metadata(self) -> list[dict]:
        """Per-batch metadata (as ``BatchPlan.metadata``: domain, n_tokens, difficulty proxies)."""
        return self.manifest["batch_metadata"] if "batch_metadata" in self.manifest else self.trainer().plan.metadata

    # ------------------------------------------------------------------ reading tensors
    def checkpoint(self, t: int, device="cpu") -> dict[str, torch.Tensor]:
        """Reference state before step ``t`` (an anchor): ``theta``, ``adam_m``, ``adam_v`` (float ``[P]``),
        ``adam_step`` (int64 scalar) and, with ``record.checkpoint_eval``, ``eval_loss`` (float64 ``[E]``)."""
        if t not in self.anchors:
            raise StoreError(f"checkpoint {t} is not an anchor of this store (anchors: every {self.manifest['anchor_stride']})")
        return self._read(checkpoint_file(t), None, device)

    def final(self, device="cpu") -> dict[str, torch.Tensor]:
        """``theta`` [P] and ``eval_loss`` float64 [E] at the end of the reference window."""
        return self._read("final.safetensors", None, device)

    def final_eval_grads_proj(self, device="cpu") -> torch.Tensor:
        """JL projection of the eval-set gradients at theta_T: float32 ``[E, k]``."""
        return self._read("final_eval_grads.safetensors", None, device)["eval_grad_proj"]

    def get(self, name: str, device="cpu") -> torch.Tensor:
        """A recorded pair tensor stacked over anchors: ``[A, ...]`` (see ``currsearch.record.TERMS``);
        a term recorded at one anchor only (its manifest entry names the ``anchor``) gives its one tensor.

        Raises:
            StoreError: no recorded term provides ``name``.
        """
        owner = self.manifest["tensors"].get(name)
        if owner is None:
            raise StoreError(
                f"store {str(self.path)!r} has no tensor {name!r}; recorded tensors: {sorted(self.manifest['tensors'])}"
            )
        if "anchor" in owner:
            return self._read(pairs_file(owner["anchor"]), [name], device)[name]
        return torch.stack([self._read(pairs_file(t), [name], device)[name] for t in self.anchors])

    def reference_eval_losses(self) -> torch.Tensor:
        """Eval losses (nats/token) at every anchor and at the end: float64 ``[A + 1, E]``.

        Raises:
            StoreError: the store was recorded without ``record.checkpoint_eval``.
        """
        if not self.config().record.checkpoint_eval:
            raise StoreError(f"store {str(self.path)!r} has no per-checkpoint eval losses; record with record.checkpoint_eval = true")
        rows = [self.checkpoint(t)["eval_loss"] for t in self.anchors] + [self.final()["eval_loss"]]
        return torch.stack(rows)

    def nbytes(self) -> int:
        """Bytes on disk of all store files (manifest included)."""
        return sum(info["bytes"] for info in self.manifest["files"].values()) + (self.path / "manifest.json").stat().st_size

    def summary(self) -> str:
        """A human-readable summary of the store (what ``currsearch inspect`` prints)."""
        m = self.manifest
        fin = self.final()["eval_loss"].tolist()
        lines = [
            f"trajectory store {self.path}",
            f"  schema {m['schema_version']}, recorded {m['created']} with currsearch {m['versions']['currsearch']}, "
            f"torch {m['versions']['torch']}",
            f"  T = {self.T} batches, P = {self.P:,} parameters, E = {len(self.eval_names)} eval sets {self.eval_names}",
            f"  anchors: {len(self.anchors)} (stride {m['anchor_stride']}), terms: {', '.join(self.terms)}",
            f"  projection: {m['projection']['kind']} k = {self.k}, seed {m['projection']['seed']}",
            f"  optimizer state at window start: {'carried from warm-up' if self.config().train.carry_optimizer_state else 'fresh'}",
            "  reference final eval loss (nats/token): " + ", ".join(f"{n} {x:.4f}" for n, x in zip(self.eval_names, fin)),
            f"  size: {self.nbytes():,} bytes in {len(m['files']) + 1} files (formula {m['formula_bytes']:,})",
            f"  record time {m['record_seconds']:.1f} s = {m['record_seconds'] / max(m['reference_seconds'], 1e-9):.1f} x "
            f"one reference run ({m['reference_seconds']:.2f} s)",
        ]
        for name, shape in sorted(m["tensors"].items()):
            lines.append(f"    {name:<24} [A={len(self.anchors)}] x {shape['shape']} {shape['dtype']}")
        return "\n".join(lines)

