"""Manifest directories: the on-disk conventions shared by the trajectory store
(:mod:`currsearch.store`) and the partition models of data ablations (:mod:`currsearch.ablate`).

A manifest directory holds ``manifest.json`` (format name, schema version, the full config,
hashes of corpus/plan/initial weights, and every data file with its SHA-256 and size) next to
safetensors files. Every file is written to a temporary name and renamed (atomic on POSIX);
the manifest itself is rewritten atomically after each file, so a killed writer leaves a
directory that resumes. :class:`ManifestDirectory` opens such a directory and checks format,
schema, completeness, checksums, config and Trainer hashes, raising
:class:`~currsearch.errors.StoreError` with the wording of the subclass (its ``MESSAGES``).
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

# config sections that determine the recorded/trained numbers (record.* budgets do not)
TRAJECTORY_SECTIONS = ("data", "model", "optim", "train")


def sha256_file(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 (hex) of a tensor's bytes (CPU, contiguous)."""
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


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


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` atomically (sorted keys, indented)."""
    atomic_write_bytes(path / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode())


def save_listed_tensors(directory: Path, manifest: dict, rel: str, tensors: dict[str, torch.Tensor]) -> None:
    """Save ``tensors`` to ``directory / rel`` atomically and list the file in ``manifest["files"]``
    (``{"sha256", "bytes"}``); the caller writes the manifest (:func:`write_manifest`)."""
    path = Path(directory) / rel
    atomic_save_tensors(path, tensors)
    manifest["files"][rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def remove_partial_writes(directory: Path) -> None:
    """Delete the temporary files (``.NAME.tmpPID``) a kill in the middle of an atomic write left below ``directory``."""
    for stray in Path(directory).rglob(".*.tmp*"):
        stray.unlink()


def trainer_hashes(trainer) -> dict[str, str]:
    """SHA-256 fingerprints of what a Trainer trains on: ``{"corpus", "plan", "init_weights"}`` (hex)."""
    return {"corpus": trainer.corpus_hash, "plan": trainer.plan.fingerprint(), "init_weights": tensor_sha256(trainer.theta_init)}


def config_diff(a: dict, b: dict, sections=TRAJECTORY_SECTIONS) -> list[str]:
    """Dotted keys whose values differ between two config dicts, as ``key (a vs b)``."""
    out = []
    for s in sections:
        for k in sorted(set(a.get(s, {})) | set(b.get(s, {}))):
            va, vb = a.get(s, {}).get(k), b.get(s, {}).get(k)
            if va != vb:
                out.append(f"{s}.{k} ({va!r} vs {vb!r})")
    return out


class ManifestDirectory:
    """Base of a self-describing directory with a checksummed manifest. Open with :meth:`open`.

    A subclass sets ``FORMAT`` (the manifest's ``"format"``), ``SCHEMA_VERSION`` and
    ``MESSAGES``: the :class:`~currsearch.errors.StoreError` texts, ``str.format`` templates
    keyed by

    * ``no_manifest`` ({path}), ``corrupt`` ({mpath}, {err}), ``format`` ({mpath}, {format},
      {got}), ``schema`` ({path}, {version}, {expected}), ``incomplete`` ({path}, {progress}:
      :meth:`progress`);
    * ``file_missing`` ({file}), ``file_size`` ({file}, {size}, {expected}), ``file_hash``
      ({file});
    * ``config`` ({path}, {diff}: the differing keys joined by ``", "``), ``trainer`` ({path},
      {bad}: the list of differing hashes).

    Paths are passed as ``str``. The manifest must hold ``"config"`` (the full config dict),
    ``"hashes"`` (``corpus``, ``plan``, ``init_weights``), ``"files"`` (``{relative path:
    {"sha256", "bytes"}}``) and ``"phase"`` (``"complete"`` when finished).

    Attributes:
        path: the directory; manifest: the parsed manifest (dict).
    """

    FORMAT: str = ""
    SCHEMA_VERSION: int = 0
    MESSAGES: dict[str, str] = {}

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self._trainer = None

    @classmethod
    def progress(cls, manifest: dict) -> str:
        """How far an incomplete directory got (the ``{progress}`` of the ``incomplete`` message)."""
        return f"phase {manifest.get('phase')!r}"

    @classmethod
    def open(cls, path, verify: bool = True, allow_incomplete: bool = False):
        """Open a directory, checking format, schema, completeness and (with ``verify``) every checksum.

        Args:
            path: the directory.
            verify: check every file's size and SHA-256 (:meth:`verify`).
            allow_incomplete: accept a directory whose manifest phase is not ``"complete"``
                (to resume writing it).

        Returns:
            An instance of ``cls``.

        Raises:
            StoreError: no manifest, an unparsable manifest, another format or schema version,
                an incomplete directory, a missing/truncated/modified file.
        """
        path = Path(path)
        mpath = path / "manifest.json"
        msg = cls.MESSAGES
        if not mpath.is_file():
            raise StoreError(msg["no_manifest"].format(path=str(path)))
        try:
            manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as err:
            raise StoreError(msg["corrupt"].format(mpath=str(mpath), err=err)) from None
        if manifest.get("format") != cls.FORMAT:
            raise StoreError(msg["format"].format(mpath=str(mpath), format=cls.FORMAT, got=manifest.get("format")))
        version = manifest.get("schema_version")
        if version != cls.SCHEMA_VERSION:
            raise StoreError(msg["schema"].format(path=str(path), version=version, expected=cls.SCHEMA_VERSION))
        if not allow_incomplete and manifest.get("phase") != "complete":
            raise StoreError(msg["incomplete"].format(path=str(path), progress=cls.progress(manifest)))
        opened = cls(path, manifest)
        if verify:
            opened.verify()
        return opened

    def verify(self) -> None:
        """Check every file listed in the manifest exists with the recorded size and SHA-256.

        Raises:
            StoreError: naming the first missing, truncated or modified file.
        """
        msg = self.MESSAGES
        for rel, info in self.manifest["files"].items():
            f = self.path / rel
            if not f.is_file():
                raise StoreError(msg["file_missing"].format(file=str(f)))
            size = f.stat().st_size
            if size != info["bytes"]:
                raise StoreError(msg["file_size"].format(file=str(f), size=size, expected=info["bytes"]))
            if sha256_file(f) != info["sha256"]:
                raise StoreError(msg["file_hash"].format(file=str(f)))

    def config(self) -> Config:
        """The full :class:`~currsearch.config.Config` the directory was written with."""
        return config_from_dict(self.manifest["config"], source=str(self.path / "manifest.json"))

    def check_config(self, cfg: Config) -> None:
        """Raise StoreError if ``cfg`` differs from the recorded config in data/model/optim/train
        (:data:`TRAJECTORY_SECTIONS`), naming the differing keys."""
        diff = config_diff(self.manifest["config"], cfg.to_dict(), TRAJECTORY_SECTIONS)
        if diff:
            raise StoreError(self.MESSAGES["config"].format(path=str(self.path), diff=", ".join(diff)))

    def check_trainer(self, trainer) -> None:
        """Raise StoreError if a Trainer's corpus, plan or initial weights differ from the recorded hashes."""
        h = self.manifest["hashes"]
        got = trainer_hashes(trainer)
        bad = [k for k, v in got.items() if v != h[k]]
        if bad:
            raise StoreError(self.MESSAGES["trainer"].format(path=str(self.path), bad=bad))

    def use_trainer(self, trainer) -> None:
        """Make :meth:`trainer` return ``trainer`` (checked with :meth:`check_trainer`), e.g. the
        one the directory was just written with, so its cached warm-up phase is shared."""
        self.check_trainer(trainer)
        self._trainer = trainer

    def trainer(self):
        """A :class:`~currsearch.train.Trainer` rebuilt from the recorded config and checked
        against the recorded hashes (cached)."""
        if self._trainer is None:
            from .train import Trainer

            tr = Trainer.from_config(self.config())
            self.check_trainer(tr)
            self._trainer = tr
        return self._trainer

    def _read(self, rel: str, names: list[str] | None = None, device="cpu") -> dict[str, torch.Tensor]:
        """Tensors of the safetensors file ``rel`` (relative to :attr:`path`), memory-mapped onto ``device``.

        Args:
            rel: file path relative to the directory.
            names: tensor names to read (``None``: all of them).
            device: target device.

        Returns:
            ``{name: tensor}`` with the stored dtypes and shapes.
        """
        from safetensors import safe_open

        with safe_open(str(self.path / rel), framework="pt", device=str(device)) as f:
            return {n: f.get_tensor(n) for n in (names or list(f.keys()))}
