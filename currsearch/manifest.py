"""Manifest directories: the on-disk conventions shared by the trajectory store
(:mod:`currsearch.store`) and the partition models of data ablations (:mod:`currsearch.ablate`).

A manifest directory holds ``manifest.json`` (format name, schema version, the full config,
hashes of corpus/plan/initial weights, and every data file with its SHA-256 and size) next to
safetensors files. Every file is written to a temporary name and renamed (atomic on POSIX);
the manifest itself is rewritten atomically after each file, so a killed writer leaves a
directory that resumes. :class:`ManifestDirectory` opens such a directory and checks format,
schema, completeness, checksums, config and Trainer hashes, raising
:class:`~currsearch.errors.StoreError` with the wording of the subclass (its ``MESSAGES``).

The manifest's shape is validated with a pydantic model (:class:`ManifestModel`, strict types:
``"1"`` is not a schema version, ``"679096"`` is not a byte count), every file a loader opens
must be listed in it, and a complete directory may hold no unlisted data file. This module
builds no :class:`~currsearch.train.Trainer`: a subclass names the factory
(``trainer_factory``) or the caller passes one (``open(..., trainer=...)``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError, field_validator, model_validator
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save

from .config import UNHASHED_KEYS, Config, config_from_dict
from .errors import ConfigError, StoreError

logger = logging.getLogger(__name__)

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


def check_output_dir(path, option: str = "--out") -> None:
    """Refuse an output directory that is an existing file or lies under one, before any work
    (else ``mkdir`` fails with ``FileExistsError``/``NotADirectoryError`` after it). Every writer
    of currsearch creates its directories through :func:`make_output_dir`, which calls this.

    Args:
        path: the directory (``None``: nothing to check).
        option: the setting or command-line option that names it, quoted in the message.

    Raises:
        ConfigError: ``path`` or one of its existing parents is not a directory; the message
            names the option to change.
    """
    if path is None:
        return
    p = Path(path).expanduser().absolute()
    for q in (p, *p.parents):
        if q.is_symlink() and not q.exists():
            raise ConfigError(f"{option} {str(path)!r}: {str(q)!r} is a link to nothing; remove it or pass another {option}")
        if q.exists():
            if not q.is_dir():
                raise ConfigError(f"{option} {str(path)!r}: {str(q)!r} is a file, not a directory; pass another {option}")
            return


def make_output_dir(path, option: str = "--out") -> Path:
    """Create the output directory ``path`` (and its parents) after :func:`check_output_dir`;
    returns it as a :class:`~pathlib.Path`.

    Raises:
        ConfigError: as :func:`check_output_dir`.
    """
    check_output_dir(path, option)
    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync and rename.

    Raises:
        ConfigError: the parent directory is a file or lies under one (:func:`make_output_dir`).
    """
    make_output_dir(path.parent)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save tensors (and optional string ``metadata``, safetensors' header) as a safetensors file atomically."""
    data = safetensors_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
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


#: name pattern of an atomic write's temporary file, ``.NAME.tmpPID`` (:func:`atomic_write_bytes`)
PARTIAL_WRITE = ".*.tmp*"


def is_partial_write(path: Path) -> bool:
    """Whether ``path`` is the temporary file of an atomic write (:data:`PARTIAL_WRITE`)."""
    return path.match(PARTIAL_WRITE)


def remove_partial_writes(directory: Path, dead_only: bool = False) -> None:
    """Delete the temporary files (:data:`PARTIAL_WRITE`) a kill in the middle of an atomic write
    left below ``directory``; with ``dead_only``, only those whose writer (the PID in the name)
    is not running on this host, so a concurrent writer's file is kept (a cache several processes
    write to)."""
    for stray in Path(directory).rglob(PARTIAL_WRITE):
        if dead_only and _writer_alive(stray):
            continue
        stray.unlink(missing_ok=True)


def _writer_alive(tmp: Path) -> bool:
    """Whether the process whose PID ends the temporary file's name (``.NAME.tmpPID``) runs here
    (an unparsable name counts as alive: the file is not ours to delete)."""
    try:
        pid = int(tmp.name.rsplit(".tmp", 1)[1])
    except ValueError:
        return True
    return pid_running(pid)


def pid_running(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (one this process may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def file_lock(path: Path, shared: bool = False, wait: bool = True, optional: bool = False):
    """Hold an ``flock`` on ``path`` (created if absent): exclusive, or shared with ``shared``.

    Args:
        wait: block until the lock is free; else raise at once.
        optional: a lock file that cannot be opened (a read-only directory) is skipped, and the
            block runs without the lock.

    Raises:
        BlockingIOError: ``wait`` is False and another process holds a conflicting lock.
        OSError: the lock file cannot be opened (unless ``optional``).
    """
    try:
        fh = open(path, "a")
    except OSError:
        if not optional:
            raise
        fh = None
    if fh is None:
        yield
        return
    with fh:
        fcntl.flock(fh, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def trainer_hashes(trainer) -> dict[str, str]:
    """SHA-256 fingerprints of what a Trainer trains on: ``{"corpus", "plan", "init_weights"}`` (hex)."""
    return {"corpus": trainer.corpus_hash, "plan": trainer.plan.fingerprint(), "init_weights": tensor_sha256(trainer.theta_init)}


def read_config_cache(path: Path, cfg: Config, empty: dict | None = None, key: str = "config") -> dict:
    """A JSON cache of results (a benchmark's ``OUT/*.json``) tied to ``cfg`` by its trajectory
    fingerprint (:meth:`~currsearch.config.Config.fingerprint` of :data:`TRAJECTORY_SECTIONS`),
    stored under ``key``; a missing file reads as ``empty`` (default ``{}``) with that key set,
    and a file of an earlier version that holds no fingerprint is adopted.

    Raises:
        ConfigError: the file holds results of another config (mixing them would compare one
            config's numbers with another's), or is not a JSON object; the message says how to
            start over.
    """
    path = Path(path)
    try:
        cache = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else dict(empty or {})
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON ({err}); move it away to start over") from None
    if not isinstance(cache, dict):
        raise ConfigError(f"{path} is not a JSON object; move it away to start over")
    fingerprint = cfg.fingerprint(*TRAJECTORY_SECTIONS)
    stored = cache.setdefault(key, fingerprint)
    if stored != fingerprint:
        raise ConfigError(f"{path} holds results of another config (fingerprint {str(stored)[:12]}..., this config's "
                          f"is {fingerprint[:12]}...); use another --out, or the config those results were run with")
    return cache


def config_diff(a: dict, b: dict, sections=TRAJECTORY_SECTIONS) -> list[str]:
    """Dotted keys whose values differ between two config dicts, as ``key (a vs b)``; keys that
    change no number (:data:`~currsearch.config.UNHASHED_KEYS`, e.g. a cache location) are skipped."""
    out = []
    for s in sections:
        for k in sorted((set(a.get(s, {})) | set(b.get(s, {}))) - set(UNHASHED_KEYS.get(s, ()))):
            va, vb = a.get(s, {}).get(k), b.get(s, {}).get(k)
            if va != vb:
                out.append(f"{s}.{k} ({va!r} vs {vb!r})")
    return out


class FileEntry(BaseModel):
    """One listed file: its SHA-256 (64 lowercase hex digits) and size in bytes; while a listed
    file is being replaced (:meth:`ManifestDirectory.write_listed_bytes`), also the new
    content's (``next_sha256``, ``next_bytes``): the file matches one of the two."""

    model_config = ConfigDict(extra="forbid")
    sha256: StrictStr = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: StrictInt = Field(ge=0)
    next_sha256: Optional[StrictStr] = Field(None, pattern=r"^[0-9a-f]{64}$")
    next_bytes: Optional[StrictInt] = Field(None, ge=0)

    @model_validator(mode="after")
    def _next_pair(self) -> "FileEntry":
        if (self.next_sha256 is None) != (self.next_bytes is None):
            raise ValueError("next_sha256 and next_bytes are listed together or not at all")
        return self


def entry_versions(entry: dict) -> list[tuple[str, int]]:
    """The ``(sha256, bytes)`` contents a listed file may hold: its entry's, and during a
    replacement cut short by a kill also the new content's (:class:`FileEntry`)."""
    out = [(entry["sha256"], entry["bytes"])]
    if entry.get("next_sha256") is not None:
        out.append((entry["next_sha256"], entry["next_bytes"]))
    return out


class ManifestModel(BaseModel):
    """The keys every manifest directory's ``manifest.json`` holds, strictly typed (no coercion:
    a string is never read as a number). Extra keys are allowed; subclasses add theirs."""

    model_config = ConfigDict(extra="allow")
    format: StrictStr
    schema_version: StrictInt
    phase: StrictStr
    config: dict[str, Any]
    hashes: dict[str, StrictStr]
    files: dict[str, FileEntry]

    @field_validator("config")
    @classmethod
    def _valid_config(cls, v: dict) -> dict:
        missing = sorted(set(Config.model_fields) - set(v))
        if missing:
            raise ValueError(f"the recorded config lacks the section(s) {missing}")
        try:
            config_from_dict(v, source="the manifest's config")
        except ConfigError as err:
            raise ValueError(str(err)) from None
        return v


DEFAULT_MESSAGES = {
    "malformed": "manifest {mpath!r} is malformed: {err}; it was not written by currsearch or was edited by hand: "
                 "delete {path!r} and write it again",
    "file_unlisted": "file {file!r} is not listed in the manifest {mpath!r} (its entry was removed, or the file was copied in); "
                     "its content cannot be checked",
    "not_safetensors": "file {file!r} is not a readable safetensors file ({err})",
    "no_trainer": "{path!r}: no Trainer attached and none can be built here; pass one (open(..., trainer=...) or use_trainer)",
}


def _validation_summary(err: ValidationError) -> str:
    """``loc: message (got value)`` for each pydantic error, joined by ``"; "``."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        got = e.get("input")
        shown = f" (got {got!r} of type {type(got).__name__})" if e["type"] != "missing" and not isinstance(got, dict) else ""
        parts.append(f"{loc}: {e['msg']}{shown}")
    return "; ".join(parts[:5]) + (f"; and {len(parts) - 5} more" if len(parts) > 5 else "")


class ManifestDirectory:
    """Base of a self-describing directory with a checksummed manifest. Open with :meth:`open`.

    A subclass sets ``FORMAT`` (the manifest's ``"format"``), ``SCHEMA_VERSION``, ``SCHEMA``
    (its :class:`ManifestModel` subclass), ``trainer_factory`` (``Config -> Trainer``, used by
    :meth:`trainer` when none was attached) and ``MESSAGES``: the
    :class:`~currsearch.errors.StoreError` texts, ``str.format`` templates keyed by

    * ``no_manifest`` ({path}), ``corrupt`` ({mpath}, {err}), ``format`` ({mpath}, {format},
      {got}), ``schema`` ({path}, {version}, {expected}), ``incomplete`` ({path}, {progress}:
      :meth:`progress`);
    * ``file_missing`` ({file}, {path}), ``file_size`` ({file}, {size}, {expected}, {path}),
      ``file_hash`` ({file}, {path});
    * ``config`` ({path}, {diff}: the differing keys joined by ``", "``), ``trainer`` ({path},
      {bad}: the list of differing hashes);
    * optional (defaults in :data:`DEFAULT_MESSAGES`): ``malformed`` ({mpath}, {path}, {err}),
      ``file_unlisted`` ({file}, {mpath}, {path}), ``not_safetensors`` ({file}, {err}, {path}).

    Paths are passed as ``str``. The manifest must hold ``"config"`` (the full config dict),
    ``"hashes"`` (``corpus``, ``plan``, ``init_weights``), ``"files"`` (``{relative path:
    {"sha256", "bytes"}}``) and ``"phase"`` (``"complete"`` when finished).

    Attributes:
        path: the directory; manifest: the parsed manifest (dict).
    """

    FORMAT: ClassVar[str] = ""
    SCHEMA_VERSION: ClassVar[int] = 0
    SCHEMA: ClassVar[type[ManifestModel]] = ManifestModel
    MESSAGES: ClassVar[dict[str, str]] = {}
    #: data files (globs below the directory) that must all be listed once the directory is complete
    DATA_GLOBS: ClassVar[tuple[str, ...]] = ("*.safetensors",)
    #: ``Config -> Trainer`` building the Trainer of :meth:`trainer` when none was attached
    trainer_factory: ClassVar[Optional[Callable[[Config], Any]]] = None

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self._trainer = None

    @classmethod
    def _message(cls, key: str, **kw) -> str:
        """The ``MESSAGES[key]`` (or default) text filled with ``kw``."""
        return cls.MESSAGES.get(key, DEFAULT_MESSAGES.get(key, key)).format(**kw)

    @classmethod
    def progress(cls, manifest: dict) -> str:
        """How far an incomplete directory got (the ``{progress}`` of the ``incomplete`` message)."""
        return f"phase {manifest.get('phase')!r}"

    @classmethod
    def read_manifest(cls, path) -> dict:
        """Parse and validate ``path / "manifest.json"`` (format, schema version, then the shape
        of :attr:`SCHEMA`), without checking completeness or files.

        Returns:
            The manifest dict (as parsed; validation does not coerce or change it).

        Raises:
            StoreError: no manifest, unparsable bytes or JSON, not a JSON object, another format or
                schema version, a missing key or a value of the wrong type (naming the key).
        """
        path = Path(path)
        mpath = path / "manifest.json"
        msg = lambda key, **kw: cls._message(key, path=str(path), mpath=str(mpath), **kw)  # noqa: E731
        if not mpath.is_file():
            raise StoreError(msg("no_manifest"))
        try:
            manifest = json.loads(mpath.read_bytes())
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
            raise StoreError(msg("corrupt", err=err)) from None
        if not isinstance(manifest, dict):
            raise StoreError(msg("malformed", err=f"it holds a JSON {type(manifest).__name__}, not an object"))
        if manifest.get("format") != cls.FORMAT:
            raise StoreError(msg("format", format=cls.FORMAT, got=manifest.get("format")))
        version = manifest.get("schema_version")
        if type(version) is not int:
            raise StoreError(msg("malformed", err=f"schema_version must be an integer, got {version!r} of type {type(version).__name__}"))
        if version != cls.SCHEMA_VERSION:
            raise StoreError(msg("schema", version=version, expected=cls.SCHEMA_VERSION))
        try:
            cls.SCHEMA.model_validate(manifest)
        except ValidationError as err:
            raise StoreError(msg("malformed", err=_validation_summary(err))) from None
        return manifest

    @classmethod
    def open(cls, path, verify: bool = True, allow_incomplete: bool = False, trainer=None):
        """Open a directory, checking format, schema, shape, completeness and (with ``verify``) every file.

        Args:
            path: the directory.
            verify: check every file's size and SHA-256 and that no data file is unlisted (:meth:`verify`).
            allow_incomplete: accept a directory whose manifest phase is not ``"complete"``
                (to resume writing it).
            trainer: a :class:`~currsearch.train.Trainer` to attach (:meth:`use_trainer`, checked
                against the recorded hashes), e.g. the one the caller already built; default: the
                first :meth:`trainer` call builds one from the recorded config.

        Returns:
            An instance of ``cls``.

        Raises:
            StoreError: no manifest, an unparsable or malformed manifest, another format or schema
                version, an incomplete directory, a missing/truncated/modified/unlisted file, a
                trainer of other data or weights.
        """
        manifest = cls.read_manifest(path)
        if not allow_incomplete and manifest.get("phase") != "complete":
            raise StoreError(cls._message("incomplete", path=str(path), progress=cls.progress(manifest)))
        opened = cls(Path(path), manifest)
        if verify:
            opened.verify()
        if trainer is not None:
            opened.use_trainer(trainer)
        return opened

    def expected_files(self) -> list[str]:
        """Relative paths the manifest's progress says were written (each must be listed);
        subclasses derive them from their progress keys. Default: none."""
        return []

    def problems(self) -> list[tuple[str, str]]:
        """Every damaged file as ``(relative path, StoreError message)``: listed files missing,
        truncated or modified; files the progress says were written but the manifest does not
        list; and, in a complete directory, data files (:attr:`DATA_GLOBS`) that are not listed."""
        files, out = self.manifest["files"], []
        kw = {"path": str(self.path), "mpath": str(self.path / "manifest.json")}
        for rel, info in files.items():
            f = self.path / rel
            if not f.is_file():
                out.append((rel, self._message("file_missing", file=str(f), **kw)))
            elif f.stat().st_size not in {n for _, n in entry_versions(info)}:
                out.append((rel, self._message("file_size", file=str(f), size=f.stat().st_size, expected=info["bytes"], **kw)))
            elif sha256_file(f) not in {h for h, _ in entry_versions(info)}:
                out.append((rel, self._message("file_hash", file=str(f), **kw)))
        unlisted = {rel for rel in self.expected_files() if rel not in files}
        if self.manifest.get("phase") == "complete":
            for pattern in self.DATA_GLOBS:
                unlisted |= {f.relative_to(self.path).as_posix() for f in self.path.rglob(pattern)
                             if not f.name.startswith(".") and f.relative_to(self.path).as_posix() not in files}
        out += [(rel, self._message("file_unlisted", file=str(self.path / rel), **kw)) for rel in sorted(unlisted)]
        return out

    def verify(self) -> None:
        """Check every listed file exists with the recorded size and SHA-256 and no data file is unlisted.

        Raises:
            StoreError: naming the first missing, truncated, modified or unlisted file.
        """
        found = self.problems()
        if found:
            raise StoreError(found[0][1])

    def config(self) -> Config:
        """The full :class:`~currsearch.config.Config` the directory was written with."""
        return config_from_dict(self.manifest["config"], source=str(self.path / "manifest.json"))

    def check_config(self, cfg: Config) -> None:
        """Raise StoreError if ``cfg`` differs from the recorded config in data/model/optim/train
        (:data:`TRAJECTORY_SECTIONS`), naming the differing keys. A key the recorded config lacks
        (written before the key existed) counts as its default value."""
        rec, defaults = self.manifest["config"], Config().to_dict()
        rec = {s: {**defaults[s], **rec[s]} if isinstance(rec.get(s), dict) else rec.get(s) for s in TRAJECTORY_SECTIONS}
        diff = config_diff(rec, cfg.to_dict(), TRAJECTORY_SECTIONS)
        if diff:
            raise StoreError(self._message("config", path=str(self.path), diff=", ".join(diff)))

    def check_trainer(self, trainer) -> None:
        """Raise StoreError if a Trainer's corpus, plan or initial weights differ from the recorded hashes."""
        h = self.manifest["hashes"]
        got = trainer_hashes(trainer)
        bad = [k for k, v in got.items() if v != h.get(k)]
        if bad:
            raise StoreError(self._message("trainer", path=str(self.path), bad=bad))

    def use_trainer(self, trainer) -> None:
        """Make :meth:`trainer` return ``trainer`` (checked with :meth:`check_trainer`), e.g. the
        one the directory was just written with, so its cached warm-up phase is shared."""
        self.check_trainer(trainer)
        self._trainer = trainer

    def trainer(self):
        """The attached :class:`~currsearch.train.Trainer` (:meth:`use_trainer`, ``open(...,
        trainer=...)``), or one built once by ``trainer_factory`` from the recorded config and
        checked against the recorded hashes.

        Raises:
            StoreError: none attached and the class has no ``trainer_factory``; a built Trainer
                trains on other data or weights.
        """
        if self._trainer is None:
            factory = type(self).trainer_factory
            if factory is None:
                raise StoreError(self._message("no_trainer", path=str(self.path)))
            self.use_trainer(factory(self.config()))
        return self._trainer

    def _listed(self, rel: str) -> Path:
        """``path / rel``, refusing a file the manifest does not list (its content cannot be checked)."""
        if rel not in self.manifest["files"]:
            raise StoreError(self._message("file_unlisted", file=str(self.path / rel), mpath=str(self.path / "manifest.json"),
                                           path=str(self.path)))
        return self.path / rel

    def _read(self, rel: str, names: list[str] | None = None, device="cpu") -> dict[str, torch.Tensor]:
        """Tensors of the listed safetensors file ``rel`` (relative to :attr:`path`), memory-mapped onto ``device``.

        Args:
            rel: file path relative to the directory; must be listed in the manifest.
            names: tensor names to read (``None``: all of them).
            device: target device.

        Returns:
            ``{name: tensor}`` with the stored dtypes and shapes.

        Raises:
            StoreError: the file is not listed, or is not a readable safetensors file holding ``names``.
        """
        f = self._listed(rel)
        try:
            with safe_open(str(f), framework="pt", device=str(device)) as st:
                return {n: st.get_tensor(n) for n in (names or list(st.keys()))}
        except (SafetensorError, OSError) as err:
            raise StoreError(self._message("not_safetensors", file=str(f), err=err, path=str(self.path))) from None

    def _manifest_lock(self, shared: bool = False):
        """An ``flock`` on ``.manifest.lock`` (:func:`file_lock`): exclusive while the manifest is
        read, changed and rewritten; shared (``shared``) while a reader reads the manifest and a
        listed file, so it never pairs one writer's manifest with another's file (a read-only
        directory, where the lock file cannot be opened, is read without it)."""
        return file_lock(self.path / ".manifest.lock", shared=shared, optional=shared)

    def read_listed_bytes(self, rel: str) -> bytes | None:
        """The bytes of an extra file ``rel`` written with :meth:`write_listed_bytes`, checked
        against its entry in the manifest on disk (another process may have written it since
        this directory was opened).

        Returns:
            The bytes (the old or the new content of a replacement a kill cut short, whichever
            the file holds), or ``None`` when the manifest does not list ``rel`` (nothing cached,
            or a file of an older currsearch or a first write cut short: not trusted).

        Raises:
            StoreError: the listed file is missing, truncated or modified.
        """
        with self._manifest_lock(shared=True):
            entry = type(self).read_manifest(self.path)["files"].get(rel)
            if entry is None:
                return None
            f, kw = self.path / rel, {"path": str(self.path), "file": str(self.path / rel)}
            if not f.is_file():
                raise StoreError(self._message("file_missing", **kw))
            data = f.read_bytes()
        versions = entry_versions(entry)
        if len(data) not in {n for _, n in versions}:
            raise StoreError(self._message("file_size", size=len(data), expected=entry["bytes"], **kw))
        if hashlib.sha256(data).hexdigest() not in {h for h, _ in versions}:
            raise StoreError(self._message("file_hash", **kw))
        self.manifest["files"][rel] = entry
        return data

    def write_listed_bytes(self, rel: str, data: bytes) -> None:
        """Write an extra file ``rel`` atomically and list it (SHA-256, size) in the manifest,
        read again and rewritten atomically under an exclusive lock, so concurrent writers of
        other files lose no entry. A file already listed is replaced in three atomic steps: the
        manifest lists the new content as ``next_sha256`` / ``next_bytes`` beside the old, the
        file is replaced, the manifest keeps only the new content. A kill (or Ctrl-C) at any point
        leaves a file that matches its entry (:func:`entry_versions`), never one that reads as damage.

        Raises:
            OSError: the directory is not writable.
            ConfigError: a file is in the way of ``rel``'s folder (:func:`make_output_dir`).
        """
        new = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        with self._manifest_lock():
            manifest = type(self).read_manifest(self.path)
            old = manifest["files"].get(rel)
            if old is not None and (self.path / rel).is_file():
                versions = entry_versions(old)
                held = versions[0] if len(versions) == 1 else next(  # a replacement a kill cut short: what the file holds
                    (v for v in versions if v[0] == sha256_file(self.path / rel)), versions[0])
                manifest["files"][rel] = {"sha256": held[0], "bytes": held[1],
                                          "next_sha256": new["sha256"], "next_bytes": new["bytes"]}
                write_manifest(self.path, manifest)
            atomic_write_bytes(self.path / rel, data)
            manifest["files"][rel] = new
            write_manifest(self.path, manifest)
        self.manifest["files"][rel] = new
