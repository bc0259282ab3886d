"""Other architectures (``model.arch``): tiny Llama and GPT-NeoX models built from transformers
configs train reproducibly, take exactly torch's AdamW step, support double backward (fut1-hvp
reproduces its reference, HVPs match finite differences); tied embeddings, RoPE, biases off;
``model.path`` loads a saved model; bad arch settings are clear errors."""

import copy
import json

import pytest
import torch

from currsearch.adam import AdamState, adam_direction
from currsearch.cli import main
from currsearch.config import Config
from currsearch.errors import ConfigError, ModelError, StoreError
from currsearch.model import FlatModel, build_model
from currsearch.record import record
from currsearch.search import run_search
from currsearch.store import TrajectoryStore
from currsearch.train import Trainer
from estimators import get_estimator

# llama: RoPE, RMSNorm, SwiGLU, no biases, tied embeddings; gpt_neox: partial RoPE, LayerNorm, biases, untied
ARCHS = {
    "llama": {"arch": "llama", "tie_word_embeddings": True},
    "gpt_neox": {"arch": "gpt_neox"},
}


def _cfg(tiny_cfg, model: dict, **sections) -> Config:
    """``tiny_cfg`` with a 2-layer width-32 model of ``model``, T = 4 and weight decay (masked)."""
    base = {"model": {"n_layer": 2, "n_embd": 32, "n_head": 2, **model}, "data": {"num_batches": 4},
            "train": {"warmup_steps": 4}, "optim": {"weight_decay": 0.1}}
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    return tiny_cfg.replace(**base)


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch_cfg(request, tiny_cfg):
    return _cfg(tiny_cfg, ARCHS[request.param])


@pytest.fixture(scope="module")
def arch_store(arch_cfg, tmp_path_factory):
    """A store of ``arch_cfg`` with the default record terms (every trajectory estimator fits)."""
    return record(arch_cfg.replace(record={"projection_dim": 32}), tmp_path_factory.mktemp("arch") / "s", progress=False)


def test_built_model_is_the_arch_with_eager_attention_and_masks(arch_cfg, arch_store):
    tr = arch_store.trainer()
    m, fm = tr.model.module, tr.model
    assert type(m).__name__ == {"llama": "LlamaForCausalLM", "gpt_neox": "GPTNeoXForCausalLM"}[arch_cfg.model.arch]
    assert m.config._attn_implementation == "eager" and m.config.max_position_embeddings == arch_cfg.data.seq_len
    assert m.config.vocab_size == len(tr.tokenizer) and m.config.num_hidden_layers == 2 and m.config.hidden_size == 32
    # every parameter once (tied weights included), decay on matrices only (RMSNorm/LayerNorm weights and biases are 1-D)
    assert fm.num_params == sum(p.numel() for p in m.parameters())
    mask = fm.unflatten(fm.decay_mask)
    assert all(bool((mask[n] == (1.0 if len(s) >= 2 else 0.0)).all()) for n, s in zip(fm.names, fm.shapes))
    has_bias = any(n.endswith(".bias") for n in fm.names)
    if arch_cfg.model.arch == "llama":
        assert m.get_output_embeddings().weight is m.get_input_embeddings().weight and "lm_head.weight" not in fm.names
        assert not has_bias and any("norm" in n for n, s in zip(fm.names, fm.shapes) if len(s) == 1)
    else:
        assert m.get_output_embeddings().weight is not m.get_input_embeddings().weight and has_bias


def test_flat_gradient_equals_autograd_through_tied_weights(arch_store):
    """FlatModel's gradient (functional_call of one flat vector) is the module's own autograd
    gradient: a tied weight gets both its input-embedding and output-layer contributions."""
    tr = arch_store.trainer()
    fm, b = tr.model, tr.batch(0)
    theta = tr.window_start().theta
    _, g = fm.grad(theta, b)
    module = copy.deepcopy(fm.module)  # deepcopy keeps the tie (one Parameter, two uses)
    params = dict(module.named_parameters())
    with torch.enable_grad():
        for n, p in fm.unflatten(theta).items():
            params[n].data.copy_(p)
            params[n].requires_grad_(True)
        module(input_ids=b, labels=b).loss.backward()
    auto = torch.cat([params[n].grad.reshape(-1) for n in fm.names])
    torch.testing.assert_close(g, auto, rtol=1e-5, atol=1e-7)


def test_training_is_bit_reproducible(arch_cfg):
    order = torch.tensor([2, 0, 3, 1])
    a, b = (Trainer.from_config(arch_cfg).train(order) for _ in range(2))
    assert torch.equal(a.theta, b.theta) and torch.equal(a.train_losses, b.train_losses)
    assert torch.equal(a.eval_losses, b.eval_losses)


def test_adamw_update_matches_torch_adamw(arch_store):
    """Two steps of currsearch's functional AdamW (decay mask included) equal torch.optim.AdamW's
    on the same gradients, with weight decay only on the >= 2-D parameters."""
    tr = arch_store.trainer()
    fm, oc = tr.model, tr.cfg.optim
    theta = tr.window_start().theta.clone()
    ref = {n: torch.nn.Parameter(p.clone()) for n, p in fm.unflatten(theta).items()}
    groups = [{"params": [p for p in ref.values() if p.ndim >= 2], "weight_decay": oc.weight_decay},
              {"params": [p for p in ref.values() if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=oc.lr, betas=(oc.beta1, oc.beta2), eps=oc.eps)
    state = AdamState.fresh(theta)
    for step in range(2):
        _, g = fm.grad(theta, tr.batch(step))
        for n, gv in fm.unflatten(g).items():
            ref[n].grad = gv.clone()
        opt.step()
        gamma, state = adam_direction(g, state, theta, fm.decay_mask, oc)
        theta = theta - oc.lr * gamma
        torch.testing.assert_close(theta, torch.cat([ref[n].detach().reshape(-1) for n in fm.names]), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["fut1-hvp", "additive", "fut1", "fut2"])
def test_estimators_reproduce_the_reference_order(arch_store, name):
    est = get_estimator(name).fit(arch_store)
    ref = arch_store.final()["eval_loss"]
    torch.testing.assert_close(est.estimate(torch.arange(arch_store.T)), ref, rtol=0, atol=1e-5)


def test_search_runs_on_the_arch_store(arch_store):
    res = run_search(arch_store, n_trials=8, batch_size=4, progress=False)
    assert res.n_trials == 8 and all(sorted(o) == list(range(arch_store.T)) for o in res.orders.tolist())


def test_hvp_matches_central_finite_differences(arch_cfg, arch_store):
    """fut1-hvp's gradient-and-HVP kernel (forward-over-reverse jvp of grad, vmapped; clipping off)
    against (g(theta + eps v) - g(theta - eps v)) / (2 eps) in float64."""
    cfg = arch_cfg.replace(optim={"grad_clip": None}, train={"dtype": "float64"}, record={"terms": []})
    tr = Trainer.from_config(cfg)
    fm, b = tr.model, tr.batch(1)
    theta = tr.window_start().theta
    v = torch.randn(fm.num_params, generator=torch.Generator().manual_seed(0), dtype=theta.dtype).to(theta.device)
    v /= v.norm()
    ghv = torch.func.vmap(lambda th, x, d: torch.func.jvp(lambda t: torch.func.grad(fm.loss)(t, x), (th,), (d,)), in_dims=(None, 0, 0))
    g, hv = ghv(theta, b[None], v[None])
    eps = 1e-3
    fd = (fm.grad(theta + eps * v, b)[1] - fm.grad(theta - eps * v, b)[1]) / (2 * eps)
    torch.testing.assert_close(g[0], fm.grad(theta, b)[1], rtol=1e-6, atol=1e-9)
    err = float((hv[0] - fd).norm() / hv[0].norm())
    assert err < 1e-3, f"relative HVP error {err:.2e} against finite differences"


def test_qwen2_builds_and_trains(tiny_cfg):
    cfg = _cfg(tiny_cfg, {"arch": "qwen2", "n_layer": 1})
    tr = Trainer.from_config(cfg)
    m = tr.model.module
    assert type(m).__name__ == "Qwen2ForCausalLM" and m.config._attn_implementation == "eager"
    assert m.config.intermediate_size == 88  # SwiGLU width 8 * 32 / 3 rounded up to a multiple of 8
    res = tr.train(torch.tensor([1, 0, 3, 2]))
    assert torch.isfinite(res.eval_losses).all()


def test_model_path_loads_a_saved_model(tiny_cfg, tmp_path):
    """A llama saved with save_pretrained loads through model.path (eager attention), with the same weights."""
    cfg = _cfg(tiny_cfg, {"arch": "llama", "n_layer": 1})
    tr = Trainer.from_config(cfg)
    tr.model.module.save_pretrained(tmp_path / "llama")
    loaded = build_model(tiny_cfg.replace(model={"path": str(tmp_path / "llama")}), len(tr.tokenizer))
    assert type(loaded).__name__ == "LlamaForCausalLM" and loaded.config._attn_implementation == "eager"
    assert torch.equal(FlatModel(loaded).flatten(), tr.theta_init)
    with pytest.raises(ModelError, match="no config.json"):
        build_model(tiny_cfg.replace(model={"path": str(tmp_path)}), len(tr.tokenizer))


def test_store_recorded_before_the_arch_keys_still_matches(arch_cfg, arch_store):
    """A manifest written before model.arch and its keys existed reads them as their defaults."""
    old = TrajectoryStore.open(arch_store.path, verify=False)
    model = old.manifest["config"]["model"]
    unset = [k for k in ("intermediate_size", "tie_word_embeddings", "attention_bias", "mlp_bias") if model[k] is None]
    for k in unset:
        del model[k]
    old.check_config(arch_cfg)
    if arch_cfg.model.arch != "gpt2":  # a missing arch reads as gpt2: not this store's model
        del model["arch"]
        with pytest.raises(StoreError, match=r"model.arch \('gpt2' vs"):
            old.check_config(arch_cfg)


@pytest.mark.parametrize("model, match", [
    ({"arch": "gpt2", "attention_bias": False}, "attention_bias is a setting of arch llama and gpt_neox"),
    ({"arch": "gpt_neox", "mlp_bias": False}, "mlp_bias is a setting of arch llama only"),
    ({"arch": "gpt_neox", "n_embd": 32, "n_head": 8}, "n_embd / n_head = 4 gives 1: choose n_embd / n_head a multiple of 8"),
    ({"arch": "llama", "n_embd": 36, "n_head": 4}, "n_embd / n_head = 9 gives 9: choose n_embd / n_head even"),
    ({"arch": "llama", "path": "x"}, r"model.path loads a saved model, so \['arch'\]"),
    ({"arch": "bert"}, "model.arch"),
])
def test_bad_arch_settings_are_config_errors(model, match):
    with pytest.raises(ConfigError, match=match):
        Config().replace(model=model)


def test_cli_train_llama(tiny_set_args, capsys, tmp_path):
    pairs = [tiny_set_args[i : i + 2] for i in range(0, len(tiny_set_args), 2)]
    args = [a for p in pairs if not p[1].startswith(("model.", "data.num_batches=", "train.warmup_steps=")) for a in p]
    rc = main(["train", "--quiet", "--set", "model.arch=llama", "--set", "data.num_batches=4", "--set", "train.warmup_steps=4",
               "--out", str(tmp_path), *args])
    assert rc == 0 and "trained" in capsys.readouterr().out
    assert json.loads((tmp_path / "result.json").read_text())["config"]["model"]["arch"] == "llama"
