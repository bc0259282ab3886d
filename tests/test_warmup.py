"""The on-disk warm-up cache (currsearch.warmup) and the unigram-entropy baseline (currsearch.plan).

Real tiny Trainers; each test points ``train.warmup_cache`` at its own tmp dir.
"""

import logging
import math
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from currsearch.config import Config
from currsearch.errors import StoreError
from currsearch.manifest import config_diff, save_listed_tensors, write_manifest
from currsearch.plan import unigram_baseline
from currsearch.train import Trainer
from currsearch.warmup import STATE_FILE, WarmupEntry, cache_root, load_warmup, warmup_key, warmup_key_fields


def _cfg(tiny_cfg, cache, **train):
    return tiny_cfg.replace(train={"warmup_cache": str(cache), "carry_optimizer_state": True, **train})


def _entry(cfg) -> Path:
    tr = Trainer.from_config(cfg)
    return cache_root(cfg.train.warmup_cache) / warmup_key(warmup_key_fields(tr))


def _same_start(a, b):
    assert torch.equal(a.theta, b.theta) and torch.equal(a.adam.m, b.adam.m) and torch.equal(a.adam.v, b.adam.v)
    assert a.adam.step == b.adam.step and a.step_offset == b.step_offset


def test_cached_start_is_bit_identical(tiny_cfg, tmp_path, caplog):
    cfg = _cfg(tiny_cfg, tmp_path / "cache")
    caplog.set_level(logging.INFO, logger="currsearch.warmup")
    computed = Trainer.from_config(cfg)
    s_computed = computed.window_start()
    assert "cached in" in caplog.text and (_entry(cfg) / STATE_FILE).is_file()
    caplog.clear()
    loaded = Trainer.from_config(cfg)
    s_loaded = loaded.window_start()
    assert "loaded from the cache" in caplog.text
    off = Trainer.from_config(cfg.replace(train={"warmup_cache": "off"}))
    _same_start(s_computed, s_loaded)
    _same_start(off.window_start(), s_loaded)
    assert s_loaded.adam.step == cfg.train.warmup_steps > 0
    order = torch.randperm(computed.T, generator=torch.Generator().manual_seed(3))
    a, b = off.train(order), loaded.train(order)
    assert torch.equal(a.train_losses, b.train_losses) and torch.equal(a.eval_losses, b.eval_losses)
    assert torch.equal(a.theta, b.theta)


def test_fresh_and_warm_share_one_entry(tiny_cfg, tmp_path, caplog):
    cache = tmp_path / "cache"
    warm = Trainer.from_config(_cfg(tiny_cfg, cache)).window_start()
    caplog.set_level(logging.INFO, logger="currsearch.warmup")
    fresh_cfg = _cfg(tiny_cfg, cache, carry_optimizer_state=False, eval_batch_size=7)
    fresh = Trainer.from_config(fresh_cfg).window_start()
    assert "loaded from the cache" in caplog.text and len(list(cache.iterdir())) == 1
    assert torch.equal(fresh.theta, warm.theta) and fresh.adam.step == 0 and not fresh.adam.m.any()


def test_key_follows_what_determines_the_warmup(tiny_cfg, tmp_path):
    base = _cfg(tiny_cfg, tmp_path)
    key = lambda cfg: warmup_key(warmup_key_fields(Trainer.from_config(cfg)))  # noqa: E731
    k0 = key(base)
    assert key(base.replace(train={"carry_optimizer_state": False, "eval_batch_size": 3, "warmup_cache": "off"})) == k0
    assert key(base.replace(train={"seed": 1})) != k0
    assert key(base.replace(optim={"lr": 1e-3})) != k0
    assert key(base.replace(data={"num_batches": 6})) != k0
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert key(base) != k0  # CPU bits depend on the thread count
    finally:
        torch.set_num_threads(threads)


def _damage_file(entry, cache):
    f = entry / STATE_FILE
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))


def _truncate_file(entry, cache):
    f = entry / STATE_FILE
    f.write_bytes(f.read_bytes()[:100])


def _garble_manifest(entry, cache):
    (entry / "manifest.json").write_text("{not json")


def _foreign_entry(entry, cache):
    """An entry of another config (seed) copied under this key."""
    cfg = Config.model_validate(WarmupEntry.open(entry).manifest["config"]).replace(train={"seed": 5})
    Trainer.from_config(cfg).window_start()
    shutil.rmtree(entry)
    shutil.copytree(_entry(cfg), entry)


def _killed_write(entry, cache):
    """A save killed mid-write: the state file never renamed into place, its temporary file left behind."""
    (entry / STATE_FILE).rename(entry / f".{STATE_FILE}.tmp{2**22 + 1}")  # above any PID: a writer no longer running


@pytest.mark.parametrize("damage", [_damage_file, _truncate_file, _garble_manifest, _foreign_entry, _killed_write])
def test_unusable_entry_is_recomputed_with_a_warning(tiny_cfg, tmp_path, caplog, damage):
    cfg = _cfg(tiny_cfg, tmp_path / "cache")
    ref = Trainer.from_config(cfg).window_start()
    entry = _entry(cfg)
    damage(entry, tmp_path / "cache")
    with pytest.raises(StoreError):
        e = WarmupEntry.open(entry)
        e.check_key(entry.name)
    caplog.set_level(logging.INFO, logger="currsearch.warmup")
    again = Trainer.from_config(cfg).window_start()
    assert "is unusable (" in caplog.text and "cached in" in caplog.text
    _same_start(again, ref)
    caplog.clear()
    _same_start(Trainer.from_config(cfg).window_start(), ref)  # the entry was rewritten
    assert "loaded from the cache" in caplog.text and not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not list(entry.glob(".*.tmp*"))  # a killed write's temporary file does not stay behind


def test_entry_of_wrong_shape_is_refused(tiny_cfg, tmp_path, caplog):
    """A self-consistent entry (checksums right) whose tensors do not fit the model is refused, not fed to torch."""
    cfg = _cfg(tiny_cfg, tmp_path / "cache")
    tr = Trainer.from_config(cfg)
    ref = tr.window_start()
    entry = _entry(cfg)
    m = WarmupEntry.open(entry).manifest
    short = ref.theta[:-1]
    save_listed_tensors(entry, m, STATE_FILE, {"theta": short.clone(), "adam_m": short.clone(), "adam_v": short.clone()})
    write_manifest(entry, m)
    caplog.set_level(logging.WARNING, logger="currsearch.warmup")
    assert load_warmup(Trainer.from_config(cfg)) is None
    assert "is unusable (" in caplog.text and "expected" in caplog.text


def test_cache_off_and_unwritable(tiny_cfg, tmp_path, caplog):
    off = _cfg(tiny_cfg, "off")
    assert cache_root("off") is None
    ref = Trainer.from_config(off).window_start()
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    caplog.set_level(logging.WARNING, logger="currsearch.warmup")
    s = Trainer.from_config(_cfg(tiny_cfg, blocker / "cache")).window_start()  # cannot be created
    assert "could not write" in caplog.text
    _same_start(s, ref)


def test_cache_location_changes_no_fingerprint(tiny_cfg, tmp_path):
    a, b = tiny_cfg, tiny_cfg.replace(train={"warmup_cache": str(tmp_path)})
    assert a.fingerprint() == b.fingerprint() and a.fingerprint("train") == b.fingerprint("train")
    assert config_diff(a.to_dict(), b.to_dict()) == []
    assert config_diff(a.to_dict(), a.replace(train={"seed": 1}).to_dict()) == ["train.seed (0 vs 1)"]
    d = Config().to_dict()
    del d["train"]["warmup_cache"]  # a config written before the key existed
    assert config_diff(d, Config().to_dict()) == []


def test_auto_cache_honours_currsearch_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("CURRSEARCH_CACHE", str(tmp_path))
    assert cache_root("auto") == tmp_path / "warmup"
    assert cache_root("~/x") == cache_root("~/x").expanduser() and not str(cache_root("~/x")).startswith("~")


def test_unigram_baseline(tiny_trainer):
    plan, V = tiny_trainer.plan, tiny_trainer.model.module.get_input_embeddings().num_embeddings
    counts = Counter(torch.cat([plan.batches.reshape(-1), plan.warmup_pool.reshape(-1)]).tolist())
    total = sum(counts.values())
    got = unigram_baseline(plan, V)
    assert list(got) == plan.eval_names
    for name in plan.eval_names:
        toks = plan.eval_sets[name].reshape(-1).tolist()
        want = -sum(math.log((counts.get(t, 0) + 1) / (total + V)) for t in toks) / len(toks)
        assert got[name] == pytest.approx(want, rel=1e-12)
    assert torch.allclose(tiny_trainer.unigram_baseline(), torch.tensor(list(got.values()), dtype=torch.float64))
    # the uniform distribution is the worst a smoothed unigram can do on its own tokens' support
    assert all(0 < v < math.log(V) + 1 for v in got.values())
    with pytest.raises(ValueError, match="vocab_size"):
        unigram_baseline(plan, 10)

