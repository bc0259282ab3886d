"""BatchPlan: the corpus packed into T batches (the unit of ordering) and eval sets.

Packing (deterministic given the corpus, tokenizer and ``data.plan_seed``): the documents of
each domain are tokenized, joined with the end-of-text token and cut into sequences of
``seq_len`` tokens; each domain's sequences are shuffled with the plan seed. Window batches
take ``batch_size`` sequences each: with ``batching = "domain"`` every batch comes from one
domain (domains get T // D batches, the first T % D one more); with ``"mixed"`` the
sequences of all domains are pooled and shuffled. Batch indices are then shuffled, so the
reference order ``0, 1, ..., T-1`` interleaves domains at random. Sequences not used by the window form the
warm-up pool (mixed). Eval sets are the first ``eval_seqs_per_domain`` sequences of each
domain's validation split, plus ``"all"`` (their union).

:func:`unigram_baseline` gives, per eval set, the cross-entropy of a unigram model of the
plan's training tokens: the loss a model that has learned only token frequencies would reach.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError, safe_open

from .config import Config
from .data import cache_dir, columns
from .errors import ConfigError, CorpusError
from .manifest import atomic_save_tensors, tensor_sha256

logger = logging.getLogger(__name__)


@dataclass
class BatchPlan:
    """Batches, eval sets and per-batch metadata.

    Attributes:
        batches: int64 ``[T, batch_size, seq_len]`` token ids of the window batches.
        domains: domain name of each batch (``"mixed"`` for mixed batches), length T.
        metadata: per batch, a dict with ``domain``, ``n_tokens`` (int), ``unigram_nll``
            (mean negative log unigram probability of its tokens under the train split,
            nats/token: a difficulty proxy) and ``bytes_per_token`` (UTF-8 bytes per token).
        eval_names: names of the E eval sets: the sorted domain names, then ``"all"``.
        eval_sets: int64 ``[N_e, seq_len]`` per eval set name.
        warmup_pool: int64 ``[N_w, seq_len]`` train sequences outside the window (mixed).
        domain_names: sorted names of the corpus domains.
    """

    batches: torch.Tensor
    domains: list[str]
    metadata: list[dict]
    eval_names: list[str]
    eval_sets: dict[str, torch.Tensor]
    warmup_pool: torch.Tensor
    domain_names: list[str] = field(default_factory=list)

    @property
    def num_batches(self) -> int:
        """T, the number of window batches."""
        return int(self.batches.shape[0])

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the batches, eval sets, warm-up pool and domain labels."""
        h = hashlib.sha256()
        for t in [self.batches, self.warmup_pool] + [self.eval_sets[n] for n in self.eval_names]:
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().numpy().tobytes())
        h.update("|".join(self.domains + self.eval_names).encode())
        return h.hexdigest()

    def warmup_batch(self, step: int, batch_size: int, seed: int) -> torch.Tensor:
        """Warm-up batch ``step`` (int64 ``[batch_size, seq_len]``): epochs over the pool,
        reshuffled each epoch with ``seed``."""
        n = self.warmup_pool.shape[0]
        per_epoch = n // batch_size
        epoch, i = divmod(step, per_epoch)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g)
        return self.warmup_pool[perm[i * batch_size : (i + 1) * batch_size]]


#: token ids of tokenized texts, keyed by the tokenizer's and the texts' SHA-256 (in-process): plans of
#: one corpus and tokenizer that differ in T, batch size or sequence length tokenize it once
_ENCODED: dict[tuple[str, str], torch.Tensor] = {}


def _token_ids(texts: list[str], tokenizer) -> torch.Tensor:
    """The texts' token ids (int64 ``[n]``), each text followed by ``eos``.

    Cached in-process (:data:`_ENCODED`) and on disk, as ``ids`` in a safetensors file under
    ``cache_dir()/token_ids`` named by the SHA-256 of the tokenizer (its serialization, end-of-text
    id and ``tokenizers`` version) and of the texts, with that full key and the ids' SHA-256 in its
    header: tokenizing the embedded corpus takes ~2 s, which every process that
    builds a plan (each command, each Ray actor that trains) would pay again. A file that does
    not load or fails its checksum logs a warning and is recomputed and rewritten; one that
    cannot be written logs a warning and is skipped."""
    import tokenizers  # its version is part of the key: a new release may split text differently

    tok_id = f"{tokenizer.backend_tokenizer.to_str()}|eos={tokenizer.eos_token_id}|tokenizers={tokenizers.__version__}"
    key = (hashlib.sha256(tok_id.encode()).hexdigest(), hashlib.sha256("\x00".join(texts).encode()).hexdigest())
    if key not in _ENCODED:
        path, header_key = cache_dir() / "token_ids" / f"{key[0][:16]}-{key[1][:16]}.safetensors", "-".join(key)
        ids = _cached_token_ids(path, header_key)
        if ids is None:
            eos = tokenizer.eos_token_id
            flat: list[int] = []
            for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
                flat.extend(enc)
                flat.append(eos)
            ids = torch.tensor(flat, dtype=torch.int64)
            try:
                atomic_save_tensors(path, {"ids": ids}, metadata={"key": header_key, "sha256": tensor_sha256(ids)})
            except (OSError, ConfigError) as err:
                logger.warning("could not cache the tokenized corpus in %s (%s); continuing without it", path, err)
        _ENCODED[key] = ids
    return _ENCODED[key]


def _cached_token_ids(path, key: str) -> torch.Tensor | None:
    """The ids cached in ``path`` when it loads, was written for ``key`` (its full header key,
    not only the file name's prefixes) and matches the checksum in its header, else None."""
    if not path.is_file():
        return None
    try:
        with safe_open(path, "pt") as f:
            ids, meta = f.get_tensor("ids"), f.metadata() or {}
    except (OSError, SafetensorError) as err:
        logger.warning("tokenized-corpus cache file %s does not load (%s); tokenizing again and rewriting it", path, err)
        return None
    if meta.get("key") != key or meta.get("sha256") != tensor_sha256(ids):
        logger.warning("tokenized-corpus cache file %s fails its key or checksum; tokenizing again and rewriting it", path)
        return None
    return ids


def _sequences(texts: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    ids = _token_ids(texts, tokenizer)
    n = len(ids) // seq_len
    return ids[: n * seq_len].view(n, seq_len).clone()  # a copy: callers may not write into the cache


def _domain_sequences(corpus, tokenizer, cfg: Config, names: list[str], g: torch.Generator):
    """Per domain, the shuffled train sequences (int64 ``[n_d, S]``) and the eval set (the first
    ``eval_seqs_per_domain`` validation sequences), plus the ``all`` eval set (their union)."""
    d, S = cfg.data, cfg.data.seq_len
    train_seqs, eval_sets = {}, {}
    cols = {split: columns(corpus[split], "text", "domain") for split in ("train", "validation")}  # read once
    for name in names:
        texts = [t for t, dom in zip(*cols["train"]) if dom == name]
        seqs = _sequences(texts, tokenizer, S)
        train_seqs[name] = seqs[torch.randperm(seqs.shape[0], generator=g)]
        vtexts = [t for t, dom in zip(*cols["validation"]) if dom == name]
        vseqs = _sequences(vtexts, tokenizer, S)
        if vseqs.shape[0] < d.eval_seqs_per_domain:
            raise CorpusError(
                f"domain {name!r} has {vseqs.shape[0]} validation sequences of {S} tokens, fewer than "
                f"data.eval_seqs_per_domain = {d.eval_seqs_per_domain}; lower it or data.seq_len, or add validation text"
            )
        eval_sets[name] = vseqs[: d.eval_seqs_per_domain]
    eval_sets["all"] = torch.cat([eval_sets[n] for n in names])
    return train_seqs, eval_sets


def _pack_batches(train_seqs: dict, names: list[str], cfg: Config, g: torch.Generator):
    """The T batches (int64 ``[T, B, S]``, shuffled), their domains and the train sequences each
    domain used (``data.batching``: one domain per batch, or mixed)."""
    d = cfg.data
    T, B, S, D = d.num_batches, d.batch_size, d.seq_len, len(names)
    if d.batching == "domain":
        counts = {n: T // D + (1 if i < T % D else 0) for i, n in enumerate(names)}
        batches, domains, used = [], [], {}
        for n in names:
            need = counts[n] * B
            have = train_seqs[n].shape[0]
            if have < need:
                raise CorpusError(
                    f"domain {n!r} has {have} train sequences of {S} tokens but its {counts[n]} batches need {need}; "
                    f"lower data.num_batches ({T}), data.batch_size ({B}) or data.seq_len, or add text"
                )
            batches.append(train_seqs[n][:need].view(counts[n], B, S))
            domains += [n] * counts[n]
            used[n] = need
        batches_t = torch.cat(batches)
    else:
        per = math.ceil(T * B / D)
        short = {n: train_seqs[n].shape[0] for n in names if train_seqs[n].shape[0] < per}
        if short:
            raise CorpusError(
                f"mixed batching needs {per} train sequences per domain; too few in {short}; "
                f"lower data.num_batches, data.batch_size or data.seq_len"
            )
        pool = torch.cat([train_seqs[n][:per] for n in names])
        pool = pool[torch.randperm(pool.shape[0], generator=g)][: T * B]
        batches_t = pool.view(T, B, S)
        domains = ["mixed"] * T
        used = {n: per for n in names}
    # Batch indices carry no order: shuffle them so the reference order 0..T-1 interleaves domains.
    shuffle = torch.randperm(T, generator=g)
    return batches_t[shuffle], [domains[i] for i in shuffle.tolist()], used


def _difficulty_metadata(train_seqs: dict, batches: torch.Tensor, domains: list[str], tokenizer) -> list[dict]:
    """Per batch: domain, token count, unigram NLL (nats/token, add-one smoothed over the train
    text) and bytes per token."""
    counts_all = Counter(torch.cat([s.reshape(-1) for s in train_seqs.values()]).tolist())
    total = sum(counts_all.values())
    V = max(len(tokenizer), 1)
    logp = {tok: math.log((c + 1) / (total + V)) for tok, c in counts_all.items()}
    metadata = []
    for l in range(batches.shape[0]):
        toks = batches[l].reshape(-1).tolist()
        nll = -sum(logp.get(t, math.log(1 / (total + V))) for t in toks) / len(toks)
        n_bytes = len(tokenizer.decode(toks).encode("utf-8"))
        metadata.append(
            {"domain": domains[l], "n_tokens": len(toks), "unigram_nll": nll, "bytes_per_token": n_bytes / len(toks)}
        )
    return metadata


def unigram_baseline(plan: BatchPlan, vocab_size: int) -> dict[str, float]:
    """Unigram-entropy baseline of each eval set, in nats/token.

    The cross-entropy ``-(1/N) sum_i log p(x_i)`` of the N tokens of an eval set under the
    unigram distribution of the plan's training tokens (the T window batches plus the warm-up
    pool: every token the model trains on), with add-one (Laplace) smoothing over the
    vocabulary: ``p(v) = (c_v + 1) / (C + V)``, ``c_v`` the count of token v among the C
    training tokens. Every position of an eval sequence counts (the model's loss skips the
    first token of each sequence; the difference is one token in ``seq_len``). A model whose
    eval loss is near this number has learned little beyond token frequencies.

    Args:
        plan: the batch plan (int64 token ids).
        vocab_size: V, the model's vocabulary size (``len(tokenizer)``); every token id must be below it.

    Returns:
        ``{eval set name: nats/token}`` in ``plan.eval_names`` order.

    Raises:
        ValueError: ``vocab_size`` is not above the largest token id of the plan.
    """
    train = torch.cat([plan.batches.reshape(-1), plan.warmup_pool.reshape(-1)])
    top = max([int(train.max())] + [int(plan.eval_sets[n].max()) for n in plan.eval_names]) if train.numel() else -1
    if vocab_size <= top:
        raise ValueError(f"vocab_size ({vocab_size}) must be above the largest token id of the plan ({top})")
    counts = torch.bincount(train, minlength=vocab_size).to(torch.float64)
    logp = torch.log((counts + 1.0) / (counts.sum() + vocab_size))
    return {n: float(-logp[plan.eval_sets[n].reshape(-1)].mean()) for n in plan.eval_names}


def build_plan(cfg: Config, corpus, tokenizer) -> BatchPlan:
    """Pack ``corpus`` (``load_corpus`` output) into a :class:`BatchPlan` for ``cfg.data``.

    Raises:
        CorpusError: a domain has too few train sequences for its share of the T batches,
            too few validation sequences for its eval set, or nothing is left for the
            warm-up pool when ``train.warmup_steps > 0``; the message gives the numbers and
            which setting to lower.
    """
    B, S = cfg.data.batch_size, cfg.data.seq_len
    names = sorted(set(columns(corpus["train"], "domain")[0]))
    g = torch.Generator().manual_seed(cfg.data.plan_seed)
    train_seqs, eval_sets = _domain_sequences(corpus, tokenizer, cfg, names, g)
    batches_t, domains, used = _pack_batches(train_seqs, names, cfg, g)

    rest = [train_seqs[n][used[n] :] for n in names]
    m = min(r.shape[0] for r in rest)
    warm = torch.stack([r[:m] for r in rest], dim=1).reshape(-1, S) if m else torch.zeros(0, S, dtype=torch.int64)
    if cfg.train.warmup_steps > 0 and warm.shape[0] < B:
        raise CorpusError(
            f"no train text is left for the warm-up phase ({warm.shape[0]} sequences, need at least {B}); "
            "set train.warmup_steps = 0 or lower data.num_batches"
        )
    return BatchPlan(
        batches=batches_t.contiguous(),
        domains=domains,
        metadata=_difficulty_metadata(train_seqs, batches_t, domains, tokenizer),
        eval_names=names + ["all"],
        eval_sets=eval_sets,
        warmup_pool=warm.contiguous(),
        domain_names=names,
    )
