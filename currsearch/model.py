"""A transformers causal LM seen as a function of one flat parameter vector.

Estimators work on flat vectors theta (``[P]`` float tensors): Taylor expansions,
Hessian-vector products (HVPs) and projections are plain tensor algebra on them.
:class:`FlatModel` maps such a vector back onto the model with
``torch.func.functional_call``. The attention implementation is ``eager``, which supports
double backward (needed for HVPs); :func:`build_model` builds GPT-2, Llama, GPT-NeoX or
Qwen2 models from sizes (``model.arch``) or loads any local causal LM (``model.path``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import Config
from .data import hf_quiet
from .errors import ModelError


#: ``model.arch`` -> (transformers config class, causal-LM class)
ARCH_CLASSES = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}


def build_model(cfg: Config, vocab_size: int) -> torch.nn.Module:
    """Build (seeded by ``cfg.train.seed``) or load the causal LM of ``cfg.model``.

    Args:
        cfg: the experiment config; ``cfg.model.path`` loads a local transformers model
            directory, otherwise a model of ``cfg.model.arch`` (:data:`ARCH_CLASSES`) is built
            from its transformers config at ``n_layer``/``n_embd``/``n_head`` with a context
            of ``cfg.data.seq_len`` and dropout 0 (training stays deterministic); nothing is
            downloaded. The weights are initialized on the CPU, then moved to ``train.device``
            in ``train.dtype`` (the same initial weights on every device).
        vocab_size: tokenizer vocabulary size; the model's must be at least this.

    Every model uses transformers' ``eager`` attention (plain matmul and softmax): it supports
    double backward, which the HVPs of ``fut1-hvp`` need (``torch.func.jvp`` of
    ``torch.func.grad``); fused SDPA/flash kernels on CUDA do not.

    Raises:
        ModelError: the path does not exist or does not hold a causal LM, the model cannot use
            eager attention, or its vocabulary or context is smaller than the tokenizer's /
            ``seq_len``.
    """
    import transformers  # heavy (seconds): loaded only when a model is built

    with hf_quiet(transformers.logging):
        return _build_model(cfg, vocab_size, transformers)


def _arch_kwargs(cfg: Config, vocab_size: int) -> dict:
    """Keyword arguments of the transformers config class of ``cfg.model.arch`` (see
    :class:`~currsearch.config.ModelConfig` for the defaults of the unset keys)."""
    m = cfg.model
    if m.arch == "gpt2":  # GPT-2's own key names; the unset optional keys are left out (GPT2Config's defaults)
        kw = {"vocab_size": vocab_size, "n_positions": cfg.data.seq_len, "n_embd": m.n_embd, "n_layer": m.n_layer,
              "n_head": m.n_head, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
        if m.intermediate_size is not None:
            kw["n_inner"] = m.intermediate_size
    else:
        swiglu = 8 * -(-8 * m.n_embd // 24)  # 8 n_embd / 3 rounded up to a multiple of 8
        kw = {"vocab_size": vocab_size, "max_position_embeddings": cfg.data.seq_len, "hidden_size": m.n_embd,
              "num_hidden_layers": m.n_layer, "num_attention_heads": m.n_head, "attention_dropout": 0.0,
              "intermediate_size": m.intermediate_size or (4 * m.n_embd if m.arch == "gpt_neox" else swiglu)}
        if m.arch in ("llama", "qwen2"):
            kw["num_key_value_heads"] = m.n_head
        if m.arch == "gpt_neox":
            kw["hidden_dropout"] = 0.0
    for key in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
        if getattr(m, key) is not None:
            kw[key] = getattr(m, key)
    return {**kw, "bos_token_id": 0, "eos_token_id": 0}


def _check_eager(model: torch.nn.Module, what: str) -> None:
    """Raise ModelError unless ``model`` runs transformers' eager attention."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != "eager":
        raise ModelError(
            f"{what} uses attention implementation {impl!r}, not 'eager'; currsearch needs eager attention because its "
            "Hessian-vector products differentiate the loss twice, which fused SDPA/flash kernels do not support. Use a "
            "model whose transformers class supports attn_implementation='eager' (every built-in causal LM does; a "
            "custom-code model must honour config._attn_implementation), or build one with model.arch"
        )


def _load_model(path: str, transformers) -> torch.nn.Module:
    """The causal LM saved in the local directory ``path``, with eager attention."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise ModelError(
            f"model path {path!r} is not a local transformers model directory (no config.json); "
            "pass a directory saved with model.save_pretrained(), or unset model.path to build model.arch from sizes"
        )
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(p), attn_implementation="eager")
    except Exception as err:
        hint = " (it cannot use eager attention, which currsearch needs for double backward)" if "attn_implementation" in str(err) else ""
        raise ModelError(f"could not load a causal LM from {path!r}{hint}: {err}") from None
    _check_eager(model, f"the model in {path!r}")
    return model


def _build_model(cfg: Config, vocab_size: int, transformers) -> torch.nn.Module:
    """:func:`build_model` with transformers imported and quiet."""
    torch.manual_seed(cfg.train.seed)
    m = cfg.model
    if m.path is not None:
        model = _load_model(m.path, transformers)
    else:
        conf_cls, model_cls = (getattr(transformers, name) for name in ARCH_CLASSES[m.arch])
        model = model_cls(conf_cls(**_arch_kwargs(cfg, vocab_size), attn_implementation="eager"))
        _check_eager(model, f"model.arch={m.arch!r}")
        model.loss_type = "ForCausalLM"  # the loss it uses anyway; None makes transformers warn at the first step
    if model.get_input_embeddings().num_embeddings < vocab_size:
        raise ModelError(
            f"model vocabulary ({model.get_input_embeddings().num_embeddings}) is smaller than the "
            f"tokenizer's ({vocab_size}); use the model's own tokenizer (data.tokenizer) or a smaller data.vocab_size"
        )
    ctx = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if ctx is not None and ctx < cfg.data.seq_len:
        raise ModelError(f"model context ({ctx}) is shorter than data.seq_len ({cfg.data.seq_len}); lower data.seq_len")
    dtype = getattr(torch, cfg.train.dtype)
    return model.to(dtype=dtype, device=cfg.train.device).eval()


class FlatModel:
    """A causal LM whose trainable parameters live in one flat vector ``theta`` ([P]).

    Attributes:
        module: the wrapped ``transformers`` model (its own parameters are not updated).
        names, shapes, sizes: per parameter tensor, in ``named_parameters()`` order (tied
            weights appear once).
        num_params: P.
        decay_mask: ``[P]`` float tensor, 1.0 on weight matrices (ndim >= 2, embeddings
            included) and 0.0 on biases and norm parameters (LayerNorm, RMSNorm: 1-D).

    Tied weights (a ``tie_word_embeddings`` output layer sharing the input embedding) are
    one parameter: ``named_parameters()`` lists them once, and ``torch.func.functional_call``
    (``tie_weights=True``) substitutes the flat vector's slice for both uses.
    """

    def __init__(self, module: torch.nn.Module):
        self.module = module
        params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in params]
        self.shapes = [tuple(p.shape) for _, p in params]
        self.sizes = [p.numel() for _, p in params]
        self.num_params = sum(self.sizes)
        ref = params[0][1]
        self.device, self.dtype = ref.device, ref.dtype
        self.decay_mask = torch.cat(
            [torch.full((p.numel(),), 1.0 if p.ndim >= 2 else 0.0, dtype=ref.dtype, device=ref.device) for _, p in params]
        )
        for p in module.parameters():
            p.requires_grad_(False)

    def flatten(self) -> torch.Tensor:
        """The module's current parameters as a new flat vector ``[P]``."""
        named = dict(self.module.named_parameters())
        return torch.cat([named[n].detach().reshape(-1) for n in self.names])

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``theta`` ([P]) shaped as the named parameters."""
        if theta.shape != (self.num_params,):
            raise ValueError(f"theta has shape {tuple(theta.shape)}, expected ({self.num_params},)")
        out, off = {}, 0
        for n, shape, size in zip(self.names, self.shapes, self.sizes):
            out[n] = theta[off : off + size].view(shape)
            off += size
        return out

    def loss(self, theta: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy (nats/token) of ``input_ids`` ([b, S] int64).

        Differentiable in ``theta`` (twice: HVPs work). A float64 ``theta`` gives a float64 loss:
        transformers' causal-LM loss casts the logits with ``.float()`` (float32, so a float64
        model's loss and gradients had float32 precision), so here the same mean over the
        b (S - 1) predicted tokens is taken from the float64 logits; float32 keeps transformers' loss.
        """
        if theta.dtype == torch.float64:
            logits = torch.func.functional_call(self.module, self.unflatten(theta), (), {"input_ids": input_ids}).logits
            return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
        out = torch.func.functional_call(self.module, self.unflatten(theta), (), {"input_ids": input_ids, "labels": input_ids})
        return out.loss

    def grad(self, theta: torch.Tensor, input_ids: torch.Tensor, create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, dloss/dtheta)``: scalar loss and gradient ``[P]`` at ``theta`` on ``input_ids``."""
        with torch.enable_grad():
            th = theta if theta.requires_grad else theta.detach().requires_grad_(True)
            loss = self.loss(th, input_ids)
            (g,) = torch.autograd.grad(loss, th, create_graph=create_graph)
        return loss.detach(), g if create_graph else g.detach()

    @torch.no_grad()
    def eval_loss(self, theta: torch.Tensor, seqs: torch.Tensor, batch_size: int = 64) -> float:
        """Token-weighted mean loss (nats/token) over ``seqs`` ([N, S] int64) at ``theta``."""
        total, count = 0.0, 0
        for i in range(0, seqs.shape[0], batch_size):
            chunk = seqs[i : i + batch_size].to(self.device)
            n_tok = chunk.shape[0] * (chunk.shape[1] - 1)
            total += float(self.loss(theta, chunk)) * n_tok
            count += n_tok
        return total / count
