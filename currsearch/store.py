"""TrajectoryStore: a self-describing directory of recorded trajectory terms.

Layout::

    DIR/manifest.json                    schema version, config, hashes, T, k, terms, files + SHA-256
    DIR/checkpoints/ckpt_TTTTT.safetensors   reference state at anchor checkpoint t:
                                         theta, adam_m, adam_v [P], adam_step; eval_loss [E]
                                         (with record.checkpoint_eval)
    DIR/pairs/pairs_TTTTT.safetensors    per anchor t, the recorded terms for every batch l
    DIR/final.safetensors                theta [P] and eval_loss [E] after the window
    DIR/final_eval_grads.safetensors     eval_grad_proj [E, k]: projected eval gradients at theta_T

Every file is written to a temporary name and renamed (atomic on POSIX), and the manifest
(also written atomically) lists each file with its SHA-256 and size. Opening a store checks
the schema version and every checksum; a truncated, modified or missing file, another
schema, or a config that does not match raises :class:`~currsearch.errors.StoreError`
naming the file or the mismatched keys. Tensors are safetensors (no pickle anywhere),
loaded memory-mapped (``safe_open``) onto any device.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from .config import Config, config_from_dict
from .errors import StoreError

SCHEMA_VERSION = 1
FORMAT = "currsearch-trajectory-store"
# config sections that determine the recorded numbers (record.* budgets do not)
TRAJECTORY_SECTIONS = ("data", "model", "optim", "train")


def sha256_file(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Save tensors as a safetensors file atomically."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    atomic_write_bytes(path, data)


def config_diff(a: dict, b: dict, sections=TRAJECTORY_SECTIONS) -> list[str]:
    """Dotted keys whose values differ between two config dicts, as ``key (a vs b)``."""
    out = []
    for s in sections:
        for k in sorted(set(a.get(s, {})) | set(b.get(s, {}))):
            va, vb = a.get(s, {}).get(k), b.get(s, {}).get(k)
            if va != vb:
                out.append(f"{s}.{k} ({va!r} vs {vb!r})")
    return out


class TrajectoryStore:
    """A recorded trajectory store (see module docstring). Open with :meth:`open`.

    Attributes:
        path: the store directory.
        manifest: the parsed manifest (dict).
        T: window length; P: parameter count; k: projection dimension;
        eval_names: the E eval sets; anchors: checkpoint indices with pair terms;
        terms: names of the recorded pair terms.
        reference_order: int64 ``[T]``, the order of the recorded run (property).
    """

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self.T: int = manifest["T"]
        self.P: int = manifest["P"]
        self.k: int = manifest["projection"]["dim_out"]
        self.eval_names: list[str] = manifest["eval_names"]
        self.anchors: list[int] = manifest["anchors"]
        self.terms: list[str] = manifest["terms"]

    @property
    def reference_order(self) -> torch.Tensor:
        """The order of the recorded reference run, int64 ``[T]`` (``0..T-1`` unless recorded
        around another order, e.g. a trust-region incumbent): step t trained batch
        ``reference_order[t]``, and checkpoint t is the state before that step."""
        return torch.tensor(self.manifest.get("reference_order", list(range(self.T))), dtype=torch.int64)

    # ------------------------------------------------------------------ opening and checks
    @classmethod
    def open(cls, path: str | Path, verify: bool = True, allow_incomplete: bool = False) -> "TrajectoryStore":
        """Open a store, checking schema, completeness and (with ``verify``) every checksum.

        Raises:
            StoreError: no manifest, unparsable manifest, another format or a newer schema,
                an incomplete recording, a missing/truncated/modified file.
        """
        path = Path(path)
        mpath = path / "manifest.json"
        if not mpath.is_file():
            raise StoreError(f"{str(path)!r} is not a trajectory store (no manifest.json); record one with `currsearch record`")
        try:
            manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as err:
            raise StoreError(f"manifest {str(mpath)!r} is corrupt ({err}); re-record the store") from None
        if manifest.get("format") != FORMAT:
            raise StoreError(f"{str(mpath)!r} is not a {FORMAT} manifest")
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"store {str(path)!r} has schema version {version}, this currsearch reads version {SCHEMA_VERSION}; "
                "upgrade currsearch or re-record the store"
            )
        if not allow_incomplete and manifest.get("phase") != "complete":
            raise StoreError(
                f"store {str(path)!r} is incomplete (phase {manifest.get('phase')!r}); run `currsearch record` again to resume it"
            )
        store = cls(path, manifest)
        if verify:
            store.verify()
        return store

    def verify(self) -> None:
        """Check every file listed in the manifest exists with the recorded size and SHA-256.

        Raises:
            StoreError: naming the first missing, truncated or modified file.
        """
        for rel, info in self.manifest["files"].items():
            f = self.path / rel
            if not f.is_file():
                raise StoreError(f"store file {str(f)!r} is missing; re-run `currsearch record` on this directory to rebuild it")
            size = f.stat().st_size
            if size != info["bytes"]:
                raise StoreError(f"store file {str(f)!r} has {size} bytes, the manifest says {info['bytes']} (truncated or modified)")
            if sha256_file(f) != info["sha256"]:
                raise StoreError(f"store file {str(f)!r} does not match its SHA-256 in the manifest (modified or corrupt)")

    def config(self) -> Config:
        """The full config the store was recorded with."""
        return config_from_dict(self.manifest["config"], source=str(self.path / "manifest.json"))

    def check_config(self, cfg: Config) -> None:
        """Raise StoreError if ``cfg`` differs from the recorded config in data/model/optim/train."""
        diff = config_diff(self.manifest["config"], cfg.to_dict())
        if diff:
            raise StoreError(
                f"store {str(self.path)!r} was recorded with another config; differs in: {', '.join(diff)} "
                "(store vs given); use the store's config or record a new store"
            )

    def check_trainer(self, trainer) -> None:
        """Raise StoreError if a Trainer's corpus, plan or initial weights differ from the store's."""
        h = self.manifest["hashes"]
        got = {"corpus": trainer.corpus_hash, "plan": trainer.plan.fingerprint(), "init_weights": tensor_sha256(trainer.theta_init)}
        bad = [k for k, v in got.items() if v != h[k]]
        if bad:
            raise StoreError(
                f"store {str(self.path)!r} does not match the model/data it is used with: {bad} hash differs "
                "(another corpus, tokenizer, plan seed or model initialization); record a new store"
            )

    @property
    def domains(self) -> list[str]:
        """Domain of each of the T batches (as ``BatchPlan.domains``), from the manifest."""
        return self.manifest["batch_domains"] if "batch_domains" in self.manifest else self.trainer().plan.domains

    @property
    def metadata(self) -> list[dict]:
        """Per-batch metadata (as ``BatchPlan.metadata``: domain, n_tokens, difficulty proxies)."""
        return self.manifest["batch_metadata"] if "batch_metadata" in self.manifest else self.trainer().plan.metadata

    def use_trainer(self, trainer) -> None:
        """Make ``trainer()`` return ``trainer`` (checked with :meth:`check_trainer`), e.g. the
        one a store was just recorded with, so its cached warm-up phase is shared."""
        self.check_trainer(trainer)
        self._trainer = trainer

    def trainer(self):
        """A :class:`~currsearch.train.Trainer` rebuilt from the recorded config and checked
        against the recorded hashes (cached)."""
        if getattr(self, "_trainer", None) is None:
            from .train import Trainer

            tr = Trainer.from_config(self.config())
            self.check_trainer(tr)
            self._trainer = tr
        return self._trainer

    # ------------------------------------------------------------------ reading tensors
    def _read(self, rel: str, names: list[str] | None, device) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        with safe_open(str(self.path / rel), framework="pt", device=str(device)) as f:
            return {n: f.get_tensor(n) for n in (names or list(f.keys()))}

    def checkpoint(self, t: int, device="cpu") -> dict[str, torch.Tensor]:
        """Reference state before step ``t`` (an anchor): ``theta``, ``adam_m``, ``adam_v`` (float ``[P]``),
        ``adam_step`` (int64 scalar) and, with ``record.checkpoint_eval``, ``eval_loss`` (float64 ``[E]``)."""
        if t not in self.anchors:
            raise StoreError(f"checkpoint {t} is not an anchor of this store (anchors: every {self.manifest['anchor_stride']})")
        return self._read(f"checkpoints/ckpt_{t:05d}.safetensors", None, device)

    def final(self, device="cpu") -> dict[str, torch.Tensor]:
        """``theta`` [P] and ``eval_loss`` float64 [E] at the end of the reference window."""
        return self._read("final.safetensors", None, device)

    def final_eval_grads_proj(self, device="cpu") -> torch.Tensor:
        """JL projection of the eval-set gradients at theta_T: float32 ``[E, k]``."""
        return self._read("final_eval_grads.safetensors", None, device)["eval_grad_proj"]

    def get(self, name: str, device="cpu") -> torch.Tensor:
        """A recorded pair tensor stacked over anchors: ``[A, ...]`` (see ``currsearch.record.TERMS``).

        Raises:
            StoreError: no recorded term provides ``name``.
        """
        owner = self.manifest["tensors"].get(name)
        if owner is None:
            raise StoreError(
                f"store {str(self.path)!r} has no tensor {name!r}; recorded tensors: {sorted(self.manifest['tensors'])}"
            )
        return torch.stack([self._read(f"pairs/pairs_{t:05d}.safetensors", [name], device)[name] for t in self.anchors])

    def reference_eval_losses(self) -> torch.Tensor:
        """Eval losses (nats/token) at every anchor and at the end: float64 ``[A + 1, E]``.

        Raises:
            StoreError: the store was recorded without ``record.checkpoint_eval``.
        """
        if not self.manifest["config"]["record"].get("checkpoint_eval"):
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
            f"  optimizer state at window start: {'carried from warm-up' if m['config']['train']['carry_optimizer_state'] else 'fresh'}",
            f"  reference final eval loss (nats/token): " + ", ".join(f"{n} {x:.4f}" for n, x in zip(self.eval_names, fin)),
            f"  size: {self.nbytes():,} bytes in {len(m['files']) + 1} files (formula {m['formula_bytes']:,})",
            f"  record time {m['record_seconds']:.1f} s = {m['record_seconds'] / max(m['reference_seconds'], 1e-9):.1f} x "
            f"one reference run ({m['reference_seconds']:.2f} s)",
        ]
        for name, shape in sorted(m["tensors"].items()):
            lines.append(f"    {name:<24} [A={len(self.anchors)}] x {shape['shape']} {shape['dtype']}")
        return "\n".join(lines)


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 (hex) of a tensor's bytes (CPU, contiguous)."""
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` atomically (sorted keys, indented)."""
    atomic_write_bytes(path / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode())
