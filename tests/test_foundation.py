"""Foundation: corpus, tokenizer, plan, functional AdamW, Trainer determinism, CLI, bad input."""

import json

import pytest
import torch

from currsearch.adam import AdamState, adam_direction, clip_grad
from currsearch.config import Config, config_from_dict, load_config
from currsearch.data import load_corpus
from currsearch.errors import ConfigError, CorpusError, ModelError, OrderError
from currsearch.orders import parse_order, random_order, validate_orders
from currsearch.train import Trainer


def test_same_order_same_seed_bit_identical(tiny_cfg, tiny_trainer):
    order = random_order(tiny_trainer.T, 3)
    a = tiny_trainer.train(order)
    b = Trainer.from_config(tiny_cfg).train(order)  # fresh model, fresh warm-up phase
    assert torch.equal(a.theta, b.theta)
    assert torch.equal(a.eval_losses, b.eval_losses)
    assert torch.equal(a.train_losses, b.train_losses)


def test_different_orders_give_different_losses(tiny_trainer):
    T = tiny_trainer.T
    a = tiny_trainer.train(torch.arange(T))
    b = tiny_trainer.train(torch.arange(T).flip(0))
    assert not torch.equal(a.theta, b.theta)
    assert (a.eval_losses - b.eval_losses).abs().max() > 1e-4
    assert a.eval_names == ["bible", "devil", "jargon", "python", "all"]
    assert all(v > 1.0 for v in a.perplexity().values())


def test_carried_optimizer_state_differs_from_fresh(tiny_cfg, tiny_trainer):
    warm = Trainer.from_config(tiny_cfg.replace(train={"carry_optimizer_state": True}))
    s_fresh, s_warm = tiny_trainer.window_start(), warm.window_start()
    assert torch.equal(s_fresh.theta, s_warm.theta)
    assert s_fresh.adam.step == 0 and s_warm.adam.step == tiny_cfg.train.warmup_steps
    assert s_warm.adam.v.abs().sum() > 0


def test_default_corpus_has_four_domains(tiny_cfg):
    dd = load_corpus(tiny_cfg.data)
    assert set(dd) == {"train", "validation"}
    assert sorted(set(dd["train"]["domain"])) == ["bible", "devil", "jargon", "python"]
    assert sorted(set(dd["validation"]["domain"])) == ["bible", "devil", "jargon", "python"]
    assert len(dd["train"]) > 1000


def test_local_text_jsonl_and_parquet_corpora(tmp_path, tiny_cfg):
    import datasets

    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "poems.txt").write_text("roses are red\nviolets are blue\n" * 5)
    (tmp_path / "txt" / "code.txt").write_text("def f(x):\n    return x\n" * 5)
    dd = load_corpus(tiny_cfg.data.model_copy(update={"corpus": str(tmp_path / "txt")}))
    assert sorted(set(dd["train"]["domain"]) | set(dd["validation"]["domain"])) == ["code", "poems"]

    rows = [{"text": f"document {i} " * 20, "domain": "ab"[i % 2]} for i in range(40)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    dd = load_corpus(tiny_cfg.data.model_copy(update={"corpus": str(tmp_path / "c.jsonl")}))
    assert len(dd["train"]) + len(dd["validation"]) == 40
    assert set(dd["train"]["domain"]) == {"a", "b"}

    (tmp_path / "pq").mkdir()
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "pq" / "train.parquet"))
    datasets.Dataset.from_list(rows[:6]).to_parquet(str(tmp_path / "pq" / "validation.parquet"))
    dd = load_corpus(tiny_cfg.data.model_copy(update={"corpus": str(tmp_path / "pq")}))
    assert len(dd["train"]) == 40 and len(dd["validation"]) == 6


def test_tokenizer_roundtrip_and_cache(tiny_trainer, tiny_cfg):
    tok = tiny_trainer.tokenizer
    text = "In the beginning God created the heaven and the earth.\ndef f(x): return x ** 2  # ü"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert len(tok) <= tiny_cfg.data.vocab_size
    assert tok.eos_token_id is not None
    from currsearch.data import get_tokenizer

    again = get_tokenizer(tiny_cfg.data, None, tiny_trainer.corpus_hash)  # served from the cache
    assert again.get_vocab() == tok.get_vocab()


def test_token_ids_are_cached_on_disk_and_a_damaged_file_is_recomputed(tiny_trainer, tmp_path, monkeypatch, caplog):
    from safetensors.torch import load_file

    from currsearch import plan
    from currsearch.manifest import atomic_save_tensors, tensor_sha256

    tok, texts = tiny_trainer.tokenizer, ["In the beginning", "def f(x): return x"]
    monkeypatch.setenv("CURRSEARCH_CACHE", str(tmp_path))
    monkeypatch.setattr(plan, "_ENCODED", {})  # a fresh process: nothing tokenized in memory
    ids = plan._token_ids(texts, tok)
    expected = tok(texts[0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    expected += tok(texts[1], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids.dtype == torch.int64 and ids.tolist() == expected
    (cached,) = (tmp_path / "token_ids").iterdir()
    assert torch.equal(load_file(cached)["ids"], ids)

    class NoTokenizing:  # the same tokenizer, but tokenizing fails: the ids must come from the file
        backend_tokenizer, eos_token_id = tok.backend_tokenizer, tok.eos_token_id

        def __call__(self, *args, **kwargs):
            raise AssertionError("tokenized although the cache holds the ids")

    monkeypatch.setattr(plan, "_ENCODED", {})
    assert torch.equal(plan._token_ids(texts, NoTokenizing()), ids) and not caplog.text
    # a file that does not load, and one whose ids fail the checksum in its header
    for damage in (lambda: cached.write_bytes(b"damaged"),
                   lambda: atomic_save_tensors(cached, {"ids": ids + 1}, metadata={"sha256": tensor_sha256(ids)})):
        damage()
        monkeypatch.setattr(plan, "_ENCODED", {})
        caplog.clear()
        assert torch.equal(plan._token_ids(texts, tok), ids)  # recomputed, with a warning, and the file rewritten
        assert "tokenizing again" in caplog.text
        assert torch.equal(load_file(cached)["ids"], ids)


def test_plan_shapes_domains_and_metadata(tiny_trainer, tiny_cfg):
    p, d = tiny_trainer.plan, tiny_cfg.data
    assert p.batches.shape == (d.num_batches, d.batch_size, d.seq_len) and p.batches.dtype == torch.int64
    assert sorted(p.domains) == sorted(["bible", "devil", "jargon", "python"] * 2)
    assert p.eval_names[-1] == "all"
    assert p.eval_sets["all"].shape == (4 * d.eval_seqs_per_domain, d.seq_len)
    m = p.metadata[0]
    assert m["n_tokens"] == d.batch_size * d.seq_len and m["unigram_nll"] > 0 and m["bytes_per_token"] > 1
    # text round-trip: a batch decodes to text that occurs in its domain
    tok = tiny_trainer.tokenizer
    piece = tok.decode(p.batches[0, 0, 5:15].tolist())
    corpus = load_corpus(d)
    assert any(piece in t for t, dom in zip(corpus["train"]["text"], corpus["train"]["domain"]) if dom == p.domains[0])
    from currsearch.plan import build_plan

    assert build_plan(tiny_cfg, corpus, tok).fingerprint() == p.fingerprint()


def test_mixed_batching(tiny_cfg):
    tr = Trainer.from_config(tiny_cfg.replace(data={"batching": "mixed"}))
    assert set(tr.plan.domains) == {"mixed"} and tr.plan.batches.shape[0] == tiny_cfg.data.num_batches


def test_functional_adamw_matches_torch_adamw():
    torch.manual_seed(0)
    from currsearch.config import OptimConfig

    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, grad_clip=0.5)
    w = torch.nn.Parameter(torch.randn(50))
    opt = torch.optim.AdamW([w], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    theta, state, mask = w.detach().clone(), AdamState.fresh(w.detach()), torch.ones(50)
    for _ in range(5):
        g = torch.randn(50)
        opt.zero_grad()
        w.grad = g.clone()
        torch.nn.utils.clip_grad_norm_([w], cfg.grad_clip)
        opt.step()
        gamma, state = adam_direction(clip_grad(g, cfg.grad_clip), state, theta, mask, cfg)
        theta = theta - cfg.lr * gamma
    torch.testing.assert_close(theta, w.detach(), rtol=1e-5, atol=1e-6)


def test_cli_train_smoke(tmp_path, capsys):
    from currsearch.cli import main

    cfg = tmp_path / "c.toml"
    cfg.write_text('[data]\nnum_batches = 8\nbatch_size = 4\nseq_len = 32\neval_seqs_per_domain = 4\nvocab_size = 512\n'
                   '[model]\nn_layer = 1\nn_embd = 32\nn_head = 2\n[train]\nwarmup_steps = 10\n')
    rc = main(["train", str(cfg), "--order", "random:2", "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 0
    res = json.loads((tmp_path / "o" / "result.json").read_text())
    assert sorted(res["order"]) == list(range(8)) and set(res["eval_loss"]) >= {"all", "bible"}
    assert (tmp_path / "o" / "model.safetensors").stat().st_size > 0
    assert "perplexity" in capsys.readouterr().out
    # the written order file is a valid --order
    assert main(["train", str(cfg), "--order", str(tmp_path / "o" / "order.json"), "--quiet"]) == 0


def test_yaml_config_and_overrides(tmp_path):
    from currsearch.cli import resolve_config

    y = tmp_path / "c.yaml"
    y.write_text("data:\n  num_batches: 12\noptim:\n  schedule: warmup_cosine\n")
    cfg = resolve_config(str(y), ["optim.lr=0.01", "data.batching=mixed"])
    assert cfg.data.num_batches == 12 and cfg.optim.lr == 0.01 and cfg.data.batching == "mixed"
    assert load_config(None) == Config()
    # YAML merge keys still load, and an explicit key overrides a merged one (not a duplicate)
    from currsearch.config import _load_yaml

    assert _load_yaml("b: &b {x: 1, y: 2}\nd:\n  <<: *b\n  y: 3\n")["d"] == {"x": 1, "y": 3}


# ---------------------------------------------------------------- bad input, each caught before training
@pytest.mark.parametrize(
    "order, fragment",
    [
        ([0, 1, 2, 3, 4, 5, 6, 6], "not a permutation"),
        ([0, 1, 2, 3, 4, 5, 6, 8], "outside 0..7"),
        ([0, 1, 2], "length 3"),
        ([[0, 1], [1, 0]], "length 2"),
        ([0.5] * 8, "integer"),
    ],
)
def test_bad_orders(order, fragment):
    with pytest.raises(OrderError, match=fragment):
        validate_orders(order, 8)


def test_bad_order_specs(tmp_path, tiny_trainer):
    with pytest.raises(OrderError, match="random:SEED"):
        parse_order("nonsense", 8)
    with pytest.raises(OrderError, match="integer"):
        parse_order("random:x", 8)
    bad = tmp_path / "o.json"
    bad.write_text("[0, 1")
    with pytest.raises(OrderError, match="not valid JSON"):
        parse_order(str(bad), 8)
    with pytest.raises(OrderError, match="not a permutation"):
        tiny_trainer.train([0] * tiny_trainer.T)


def test_missing_and_empty_corpus(tmp_path, tiny_cfg):
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(tiny_cfg.data.model_copy(update={"corpus": str(tmp_path / "nope.jsonl")}))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(CorpusError, match="empty"):
        load_corpus(tiny_cfg.data.model_copy(update={"corpus": str(tmp_path / "empty.txt")}))
    (tmp_path / "d").mkdir()
    with pytest.raises(CorpusError, match="no corpus files"):
        load_corpus(tiny_cfg.data.model_copy(update={"corpus": str(tmp_path / "d")}))


def test_corpus_too_small_for_plan(tiny_cfg):
    with pytest.raises(CorpusError, match="lower data.num_batches"):
        Trainer.from_config(tiny_cfg.replace(data={"num_batches": 4000, "batch_size": 64}))


def test_unknown_model_and_tokenizer_paths(tmp_path, tiny_cfg):
    with pytest.raises(ModelError, match="config.json"):
        Trainer.from_config(tiny_cfg.replace(model={"path": str(tmp_path / "no-model")}))
    with pytest.raises(ModelError, match="not a directory"):
        Trainer.from_config(tiny_cfg.replace(data={"tokenizer": str(tmp_path / "no-tok")}))


def test_local_pretrained_model_and_tokenizer(tmp_path, tiny_cfg, tiny_trainer):
    tiny_trainer.model.module.save_pretrained(tmp_path / "m")
    tiny_trainer.tokenizer.save_pretrained(tmp_path / "m")
    tr = Trainer.from_config(tiny_cfg.replace(model={"path": str(tmp_path / "m")}, data={"tokenizer": str(tmp_path / "m")}))
    assert tr.model.num_params == tiny_trainer.model.num_params
    assert torch.isfinite(tr.train(torch.arange(tr.T)).eval_losses).all()


@pytest.mark.parametrize(
    "d, fragment",
    [
        ({"optim": {"lr": -1}}, "optim.lr"),
        ({"data": {"batching": "weird"}}, "data.batching"),
        ({"model": {"n_embd": 30, "n_head": 4}}, "divisible"),
        ({"data": {"num_batchez": 3}}, "unknown key"),
        ({"nonsection": {}}, "unknown key"),
        ({"train": {"device": "gpu"}}, "train.device"),
    ],
)
def test_invalid_config_values(d, fragment):
    with pytest.raises(ConfigError, match=fragment):
        config_from_dict(d)


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.toml")
    f = tmp_path / "c.ini"
    f.write_text("x")
    with pytest.raises(ConfigError, match=".toml"):
        load_config(f)
    for name, text, fragment in [
        ("c.toml", "[data\n", "does not parse"),
        # a key given twice is refused (TOML's rule; PyYAML would keep the last one silently)
        ("c.toml", "[data]\nnum_batches = 12\nnum_batches = 16\n", "does not parse"),
        ("c.yaml", "data:\n  num_batches: 12\n  num_batches: 16\n", r"'num_batches' is given twice[\s\S]*line 3"),
        ("c.yaml", "data:\n  num_batches: 12\ndata:\n  seed: 3\n", "'data' is given twice"),
    ]:
        f = tmp_path / name
        f.write_text(text)
        with pytest.raises(ConfigError, match=fragment):
            load_config(f)


def test_cli_reports_errors_cleanly(capsys):
    from currsearch.cli import main

    assert main(["train", "--set", "optim.lr=-3", "--quiet"]) == 2
    assert "optim.lr" in capsys.readouterr().err
    assert main(["train", "--set", "oops", "--quiet"]) == 2
