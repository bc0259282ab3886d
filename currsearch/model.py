"""A transformers causal LM seen as a function of one flat parameter vector.

Estimators work on flat vectors theta (``[P]`` float tensors): Taylor expansions,
Hessian-vector products (HVPs) and projections are plain tensor algebra on them.
:class:`FlatModel` maps such a vector back onto the model with
``torch.func.functional_call``. The attention implementation is ``eager``, which supports
double backward (needed for HVPs).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import Config
from .data import hf_quiet
from .errors import ModelError


def build_model(cfg: Config, vocab_size: int) -> torch.nn.Module:
    """Build (seeded by ``cfg.train.seed``) or load the causal LM of ``cfg.model``.

    Args:
        cfg: the experiment config; ``cfg.model.path`` loads a local transformers model
            directory, otherwise a GPT-2 of ``n_layer``/``n_embd``/``n_head`` is built with
            ``n_positions = cfg.data.seq_len`` and dropout 0 (training stays deterministic).
        vocab_size: tokenizer vocabulary size; the model's must be at least this.

    Raises:
        ModelError: the path does not exist or does not hold a causal LM, or its vocabulary
            or context is smaller than the tokenizer's / ``seq_len``.
    """
    import transformers  # heavy (seconds): loaded only when a model is built

    with hf_quiet(transformers.logging):
        return _build_model(cfg, vocab_size, transformers)


def _build_model(cfg: Config, vocab_size: int, transformers) -> torch.nn.Module:
    """:func:`build_model` with transformers imported and quiet."""
    torch.manual_seed(cfg.train.seed)
    m = cfg.model
    if m.path is not None:
        p = Path(m.path)
        if not (p / "config.json").is_file():
            raise ModelError(
                f"model path {m.path!r} is not a local transformers model directory (no config.json); "
                "pass a directory saved with model.save_pretrained(), or unset model.path to build a small GPT-2"
            )
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(str(p), attn_implementation="eager")
        except Exception as err:
            raise ModelError(f"could not load a causal LM from {m.path!r}: {err}") from None
    else:
        conf = transformers.GPT2Config(
            vocab_size=vocab_size,
            n_positions=cfg.data.seq_len,
            n_embd=m.n_embd,
            n_layer=m.n_layer,
            n_head=m.n_head,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = transformers.GPT2LMHeadModel(conf)
        model.config._attn_implementation = "eager"
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
            included) and 0.0 on biases and LayerNorm parameters.
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
