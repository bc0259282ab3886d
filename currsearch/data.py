"""Corpus loading (through ``datasets``) and the byte-level BPE tokenizer.

``load_corpus`` returns a :class:`datasets.DatasetDict` with ``train`` and ``validation``
splits whose rows hold a text and a domain. Sources:

* ``"default"``: the embedded multi-domain corpus shipped in ``currsearch/corpus/`` (see
  its ``DATA_CARD.md``).
* a local file or directory of ``.txt``, ``.json``/``.jsonl`` or ``.parquet`` files. Text
  files are one document per file and take their domain from the file name; json and
  parquet rows take it from ``data.domain_field`` (or the file name if the field is absent).
  A file or folder whose name contains ``valid``/``eval``/``test`` goes to the validation
  split; without one, 10% of documents (by a stable hash) are held out, and a domain left
  without validation text gives the last 10% of its longest document.
* any other string is passed to ``datasets.load_dataset`` as a hub dataset name. The hub
  is not reachable on offline machines; download the dataset elsewhere and pass the local
  files instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from .config import DataConfig
from .errors import CorpusError, ModelError


@contextlib.contextmanager
def hf_quiet(logging_module):
    """Set a Hugging Face library's log verbosity (``transformers.logging``,
    ``transformers.utils.logging`` or ``datasets.logging``) to ERROR inside the block, and
    restore the previous level after it (the global level is never left changed)."""
    old = logging_module.get_verbosity()
    logging_module.set_verbosity_error()
    try:
        yield
    finally:
        logging_module.set_verbosity(old)

DEFAULT_CORPUS_DIR = Path(__file__).parent / "corpus"
EOS_TOKEN = "<|endoftext|>"
_EXTENSIONS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_VALID_WORDS = ("valid", "eval", "test")


def cache_dir() -> Path:
    """Cache directory of currsearch (``$CURRSEARCH_CACHE`` or ``~/.cache/currsearch``)."""
    return Path(os.environ.get("CURRSEARCH_CACHE", Path.home() / ".cache" / "currsearch"))


def _is_validation(path: Path, root: Path) -> bool:
    rel = path.relative_to(root) if path != root else Path(path.name)
    return any(w in part.lower() for part in rel.parts for w in _VALID_WORDS)


def _stable_fraction(key: str) -> float:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def _local_files(root: Path) -> list[Path]:
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    files = [p for p in files if p.suffix in _EXTENSIONS]
    if not files:
        raise CorpusError(
            f"no corpus files found at {str(root)!r}; give a .txt, .json, .jsonl or .parquet file or a directory of them"
        )
    kinds = {_EXTENSIONS[p.suffix] for p in files}
    if len(kinds) > 1:
        raise CorpusError(f"corpus at {str(root)!r} mixes file kinds {sorted(kinds)}; keep one kind per corpus")
    return files


def load_corpus(cfg: DataConfig):
    """Load the corpus of ``cfg.corpus`` as a ``DatasetDict`` with columns ``text``, ``domain``.

    Returns:
        ``datasets.DatasetDict`` with splits ``train`` and ``validation``; every row has a
        non-empty ``text`` (str) and a ``domain`` (str).

    Raises:
        CorpusError: missing path, unknown file kind, empty files, missing text field, a
            hub dataset that cannot be reached, or an empty split.
    """
    import datasets  # heavy (pyarrow, fsspec): loaded only when a corpus is loaded

    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        with hf_quiet(datasets.logging):
            return _load_corpus(cfg, datasets)
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


def _load_corpus(cfg: DataConfig, datasets):
    """:func:`load_corpus` with ``datasets`` imported and quiet."""
    src = cfg.corpus
    if src == "default":
        root = DEFAULT_CORPUS_DIR
        files = [root / "train.jsonl", root / "validation.jsonl"]
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise CorpusError(f"embedded corpus files are missing: {missing}; rebuild them with `python -m currsearch.corpus.build`")
    elif Path(src).exists():
        root = Path(src)
        files = _local_files(root)
    else:
        if src.startswith((".", "/", "~")) or any(src.endswith(ext) for ext in _EXTENSIONS):
            raise CorpusError(f"corpus path {src!r} does not exist; check the path in data.corpus")
        try:
            dd = datasets.load_dataset(src)
        except Exception as err:
            raise CorpusError(
                f"could not load hub dataset {src!r} ({type(err).__name__}: {err}); on an offline machine "
                "download it elsewhere and set data.corpus to the local files"
            ) from None
        return _normalize(dd, cfg, src)

    kind = _EXTENSIONS[files[0].suffix]
    split_files: dict[str, list[str]] = {"train": [], "validation": []}
    for f in files:
        if f.stat().st_size == 0:
            raise CorpusError(f"corpus file {str(f)!r} is empty; remove it or fill it")
        split_files["validation" if _is_validation(f, root) else "train"].append(str(f))
    if not split_files["train"]:
        raise CorpusError(f"corpus at {str(root)!r} has only validation files; add training files")
    kwargs = {"sample_by": "document"} if kind == "text" else {}
    data_files = {k: v for k, v in split_files.items() if v}
    try:
        dd = datasets.load_dataset(kind, data_files=data_files, **kwargs)
    except Exception as err:
        raise CorpusError(f"could not read corpus files at {str(root)!r}: {type(err).__name__}: {err}") from None
    if kind == "text" or cfg.domain_field not in dd["train"].column_names:
        # one domain per file: recover the file of each row from the per-file loads
        dd = _domains_from_files(datasets, kind, data_files, kwargs)
    return _normalize(dd, cfg, str(root))


def _domains_from_files(datasets, kind: str, data_files: dict[str, list[str]], kwargs: dict):
    parts = {}
    for split, paths in data_files.items():
        pieces = []
        for p in paths:
            ds = datasets.load_dataset(kind, data_files=p, split="train", **kwargs)
            stem = Path(p).stem
            for w in _VALID_WORDS:
                stem = stem.replace(w, "").replace("__", "_").strip("_-.") or stem
            pieces.append(ds.add_column("domain", [stem] * len(ds)))
        parts[split] = datasets.concatenate_datasets(pieces)
    return datasets.DatasetDict(parts)


def _normalize(dd, cfg: DataConfig, where: str):
    import datasets  # heavy; already loaded by load_corpus

    if "train" not in dd:
        raise CorpusError(f"corpus {where!r} has no 'train' split (it has {list(dd)})")
    tf, df = cfg.text_field, cfg.domain_field
    for split, ds in dd.items():
        if tf not in ds.column_names:
            raise CorpusError(
                f"corpus {where!r} split {split!r} has no text column {tf!r} (columns: {ds.column_names}); set data.text_field"
            )
    out = {}
    for split, ds in dd.items():
        domain_col = df if df in ds.column_names else ("domain" if "domain" in ds.column_names else None)
        texts, *domains = columns(ds, tf, *([domain_col] if domain_col else []))
        domains = domains[0] if domains else ["all"] * len(texts)
        rows = [(t, str(d)) for t, d in zip(texts, domains) if isinstance(t, str) and t.strip()]
        out[split] = rows
    if "validation" not in out:
        out["train"], out["validation"] = _hold_out(out["train"])
    for split in ("train", "validation"):
        if not out[split]:
            raise CorpusError(f"corpus {where!r} has an empty {split!r} split after dropping empty texts; add documents")
    return datasets.DatasetDict(
        {
            s: datasets.Dataset.from_dict({"text": [t for t, _ in out[s]], "domain": [d for _, d in out[s]]})
            for s in ("train", "validation")
        }
    )


def _hold_out(rows: list[tuple[str, str]]) -> tuple[list, list]:
    """Split (text, domain) rows ~90/10 by a stable hash of each text; a domain that gets no
    validation document gives the last 10% of its longest document (cut at a newline)."""
    train = [r for r in rows if _stable_fraction(r[0][:256]) >= 0.1]
    valid = [r for r in rows if _stable_fraction(r[0][:256]) < 0.1]
    for dom in sorted({d for _, d in rows} - {d for _, d in valid}):
        i = max((j for j, r in enumerate(train) if r[1] == dom), key=lambda j: len(train[j][0]))
        text = train[i][0]
        cut = text.rfind("\n", 0, int(len(text) * 0.9)) + 1 or int(len(text) * 0.9)
        train[i] = (text[:cut], dom)
        valid.append((text[cut:], dom))
    return train, valid


def columns(ds, *names: str) -> tuple[list, ...]:
    """The named columns of a ``datasets.Dataset`` as Python lists, read in one batch.

    ``ds[name]`` is a lazy ``Column`` in ``datasets`` >= 4, and iterating it formats one row at a
    time: ~23 us per row, 12x a batch read (the embedded corpus's 2,785 train rows: 64 ms vs 5 ms
    per column, measured), which every plan paid once per domain and split.
    """
    batch = ds.select_columns(list(dict.fromkeys(names)))[:]  # a column named twice is read once
    return tuple(batch[n] for n in names)


def corpus_fingerprint(corpus) -> str:
    """SHA-256 (hex) of every (split, domain, text) row of a loaded corpus, in order."""
    h = hashlib.sha256()
    for split in ("train", "validation"):
        for t, d in zip(*columns(corpus[split], "text", "domain")):
            h.update(f"{split}\x00{d}\x00".encode())
            h.update(t.encode())
            h.update(b"\x01")
    return h.hexdigest()


def get_tokenizer(cfg: DataConfig, corpus, corpus_hash: str):
    """A ``PreTrainedTokenizerFast`` with an end-of-text token.

    With ``cfg.tokenizer`` set, loads that local pretrained tokenizer directory. Otherwise
    trains a byte-level BPE (``tokenizers``) of ``cfg.vocab_size`` on the train split and
    caches it under :func:`cache_dir` keyed by the corpus hash and settings, so the same
    corpus always gives the same tokenizer.

    Raises:
        ModelError: the tokenizer directory does not exist or does not load.
    """
    from transformers.utils import logging as hf_logging  # heavy: loaded only when a tokenizer is needed

    with hf_quiet(hf_logging):
        return _get_tokenizer(cfg, corpus, corpus_hash)


def _get_tokenizer(cfg: DataConfig, corpus, corpus_hash: str):
    """:func:`get_tokenizer` with transformers' logs quiet."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # heavy, see get_tokenizer

    if cfg.tokenizer is not None:
        p = Path(cfg.tokenizer)
        if not p.is_dir():
            raise ModelError(f"tokenizer path {cfg.tokenizer!r} is not a directory; pass a local tokenizer saved with save_pretrained()")
        try:
            tok = AutoTokenizer.from_pretrained(str(p))
        except Exception as err:
            raise ModelError(f"could not load a tokenizer from {cfg.tokenizer!r}: {err}") from None
        if tok.eos_token is None:
            tok.add_special_tokens({"eos_token": EOS_TOKEN})
        return tok

    import tokenizers  # loaded only to train a BPE tokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    key = hashlib.sha256(f"{corpus_hash}|bpe|{cfg.vocab_size}|{tokenizers.__version__}".encode()).hexdigest()[:16]
    path = cache_dir() / "tokenizers" / key / "tokenizer.json"
    if not path.is_file():
        tok = tokenizers.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=cfg.vocab_size,
            min_frequency=2,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(columns(corpus["train"], "text")[0], trainer=trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tok.save(str(tmp))
        os.replace(tmp, path)
    return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=EOS_TOKEN)
