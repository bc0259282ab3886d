"""Validated configuration of a currsearch experiment.

A configuration file is TOML (``.toml``) or YAML (``.yaml``/``.yml``) with the sections
``[data]``, ``[model]``, ``[optim]``, ``[train]`` and ``[record]``; every key is optional
and defaults to a setup that runs on the embedded corpus in seconds on a laptop CPU.
Unknown keys and invalid values raise :class:`~currsearch.errors.ConfigError` naming the
key and the accepted values.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .projection import ProjectionKind
from .settings import format_validation_error

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


#: largest seed torch's generators take (``torch.Generator.manual_seed``), 2^63 - 1
SEED_MAX = 2**63 - 1
#: largest seed of an Optuna sampler (NumPy's RandomState takes 0 <= seed < 2**32)
SAMPLER_SEED_MAX = 2**32 - 1


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=(), allow_inf_nan=False)


class DataConfig(_Section):
    """Corpus, tokenizer and batch plan.

    ``num_batches`` is T, the number of batches in the ordered window (one optimizer
    step each); every batch holds ``batch_size`` sequences of ``seq_len`` tokens.
    """

    corpus: str = Field("default", description="'default' (embedded corpus), local files/dir, or a hub dataset name")
    text_field: str = "text"
    domain_field: str = "domain"
    tokenizer: Optional[str] = Field(None, description="local pretrained tokenizer dir; None trains a byte-level BPE")
    vocab_size: int = Field(1024, ge=260, le=65536)
    seq_len: int = Field(64, ge=8, le=4096)
    batch_size: int = Field(8, ge=1, le=4096)
    num_batches: int = Field(32, ge=2, le=100000)
    batching: Literal["domain", "mixed"] = "domain"
    eval_seqs_per_domain: int = Field(16, ge=1)
    plan_seed: int = Field(0, ge=0, le=SEED_MAX)


#: arch-specific ``model`` keys (transformers' own config field names) and the archs whose
#: transformers config has them; ``None`` (the default) keeps the arch's own default
_ARCH_KEYS = {"attention_bias": ("llama", "gpt_neox"), "mlp_bias": ("llama",)}


class ModelConfig(_Section):
    """A causal LM built from a small config of a transformers architecture, or a local model directory.

    ``arch`` picks the transformers config and model class (``gpt2``: ``GPT2Config``/
    ``GPT2LMHeadModel``; ``llama``: ``LlamaConfig``/``LlamaForCausalLM``; ``gpt_neox``:
    ``GPTNeoXConfig``/``GPTNeoXForCausalLM``; ``qwen2``: ``Qwen2Config``/``Qwen2ForCausalLM``),
    built at ``n_layer`` layers, width ``n_embd`` (``hidden_size``) and ``n_head`` heads
    (``num_attention_heads``; no grouped-query attention) with ``max_position_embeddings =
    data.seq_len``, the tokenizer's vocabulary and dropout 0. The other keys are transformers'
    own config field names; ``None`` keeps the arch's default:

    * ``intermediate_size``: MLP width; default 4 n_embd (gpt2, gpt_neox), or the SwiGLU
      width 8 n_embd / 3 rounded up to a multiple of 8 (llama, qwen2: three MLP matrices of
      that width have about the parameters of two of 4 n_embd).
    * ``tie_word_embeddings``: output layer shares the input embedding; default tied for
      gpt2, untied for llama, gpt_neox and qwen2.
    * ``attention_bias`` (llama: default off; gpt_neox: default on) and ``mlp_bias`` (llama:
      default off): biases of the attention and MLP projections. gpt2 always has biases,
      gpt_neox's MLP always has biases, qwen2 always has q/k/v biases and none elsewhere.

    ``path`` loads a directory saved with ``save_pretrained`` instead (any causal LM); the
    arch keys above must then stay unset.
    """

    path: Optional[str] = Field(None, description="local transformers model dir; None builds model.arch from the sizes below")
    arch: Literal["gpt2", "llama", "gpt_neox", "qwen2"] = Field("gpt2", description="transformers architecture built when path is None")
    n_layer: int = Field(2, ge=1, le=48)
    n_embd: int = Field(64, ge=8, le=4096)
    n_head: int = Field(4, ge=1, le=64)
    intermediate_size: Optional[int] = Field(None, ge=1, le=65536, description="MLP width; None: the arch's usual ratio")
    tie_word_embeddings: Optional[bool] = Field(None, description="tie the output layer to the input embedding; None: arch default")
    attention_bias: Optional[bool] = Field(None, description="llama, gpt_neox: biases of the attention projections; None: arch default")
    mlp_bias: Optional[bool] = Field(None, description="llama: biases of the MLP projections; None: arch default")

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelConfig":
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        return self

    @model_validator(mode="after")
    def _arch_keys(self) -> "ModelConfig":
        built = {k: getattr(self, k) for k in ("intermediate_size", "tie_word_embeddings", *_ARCH_KEYS)}
        if self.path is not None and (self.arch != "gpt2" or any(v is not None for v in built.values())):
            set_keys = [k for k, v in built.items() if v is not None] + (["arch"] if self.arch != "gpt2" else [])
            raise ValueError(f"model.path loads a saved model, so {set_keys} (which build a model from sizes) must stay unset; "
                             "unset model.path or those keys")
        for key, archs in _ARCH_KEYS.items():
            if getattr(self, key) is not None and self.arch not in archs:
                raise ValueError(f"{key} is a setting of arch {' and '.join(archs)} only (transformers' {key}); arch "
                                 f"{self.arch!r} has fixed biases: unset {key} or choose arch='llama'")
        head_dim = self.n_embd // self.n_head
        rotary = {"llama": head_dim, "qwen2": head_dim, "gpt_neox": int(head_dim * 0.25)}.get(self.arch)
        if rotary is not None and (rotary < 2 or rotary % 2):
            what = "a quarter of each head (rotary_pct 0.25)" if self.arch == "gpt_neox" else "each head"
            raise ValueError(f"arch {self.arch!r} rotates {what} with RoPE, which needs an even number >= 2 of rotary dims; "
                             f"n_embd / n_head = {head_dim} gives {rotary}: choose n_embd / n_head "
                             f"{'a multiple of 8' if self.arch == 'gpt_neox' else 'even'}")
        return self


class OptimConfig(_Section):
    """AdamW with decoupled weight decay (Loshchilov & Hutter, 2019), global-norm clipping.

    The learning-rate schedule spans the warm-up phase and the ordered window together
    (``train.warmup_steps + data.num_batches`` steps).
    """

    lr: float = Field(2e-3, gt=0, le=1.0)
    schedule: Literal["constant", "warmup_cosine"] = "constant"
    warmup_frac: float = Field(0.05, ge=0, lt=1)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: Optional[float] = Field(1.0, gt=0, description="max global gradient L2 norm; None disables clipping")


class TrainConfig(_Section):
    """Seed, device and the optional warm-up phase before the ordered window.

    With ``warmup_steps > 0`` the model first trains on a separate mixed split; with
    ``carry_optimizer_state`` its Adam moments and step count carry into the window (the
    realistic mid-training case), otherwise the window starts with a fresh Adam state.
    """

    seed: int = Field(0, ge=0, le=SEED_MAX)
    warmup_steps: int = Field(300, ge=0)
    carry_optimizer_state: bool = False
    device: str = "cpu"
    dtype: Literal["float32", "float64"] = "float32"
    eval_batch_size: int = Field(64, ge=1)
    warmup_cache: str = Field(
        "auto", min_length=1,
        description="where the warm-up phase's end state (parameters, Adam moments, step) is cached on disk, so "
                    "later Trainers of the same data, model, optim and train settings load it instead of training "
                    "(currsearch.warmup; loaded bit-identical, checked by SHA-256, a corrupt or mismatched entry is "
                    "recomputed with a warning): 'auto' = $CURRSEARCH_CACHE/warmup, by default "
                    "~/.cache/currsearch/warmup; a directory path; or 'off' to run the warm-up phase every time. "
                    "Where the cache is changes no number: this key is left out of config fingerprints and of "
                    "the config checks of stores")

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", v):
            raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'mps', got {v!r}")
        return v

    def check_device(self) -> None:
        """Raise ConfigError when ``device`` is not available on this machine (checked before
        any training or recording starts; a config naming another machine's device still loads).

        Raises:
            ConfigError: CUDA not available, CUDA device index out of range, or MPS not available.
        """
        d = self.device
        if d.startswith("cuda"):
            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            idx = int(d.split(":")[1]) if ":" in d else 0
            if idx >= n:
                raise ConfigError(f"train.device={d!r} but this machine has {n} CUDA device(s); "
                                  "use train.device=cpu or a device index below the count")
        elif d == "mps" and not torch.backends.mps.is_available():
            raise ConfigError("train.device='mps' but MPS is not available on this machine; use train.device=cpu")


class RecordConfig(_Section):
    """What the recorder stores (see :mod:`currsearch.record`) and its budgets.

    ``terms`` names recorded pair terms (``currsearch.record.TERMS``); pair terms are taken
    at every ``anchor_stride``-th checkpoint; projections are ``projection_dim``-dimensional
    JL sketches regenerated from ``projection_seed``; ``projection`` is validated as a
    :class:`~currsearch.projection.ProjectionKind` and kept as its string value. Budgets are in
    seconds and bytes.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=(), use_enum_values=True, allow_inf_nan=False)

    terms: tuple[str, ...] = ("batch_losses", "updates", "grads", "readouts")
    anchor_stride: int = Field(1, ge=1)
    checkpoint_eval: bool = Field(False, description="evaluate the reference model at every anchor (loss curve)")
    vmap_chunk: int = Field(16, ge=1, description="batches per vmapped gradient call (memory bound)")
    projection: ProjectionKind = ProjectionKind.COUNTSKETCH.value
    projection_dim: int = Field(512, ge=1)
    projection_seed: int = Field(0, ge=0, le=SEED_MAX)
    max_disk_bytes: float = Field(8e9, gt=0)
    max_memory_bytes: float = Field(8e9, gt=0)
    max_seconds: float = Field(6 * 3600, gt=0)

    def projection_key(self) -> list:
        """``[anchor_stride, projection, projection_dim, projection_seed]``: the settings that
        change a store's projected numbers (not its terms, nor its budgets)."""
        return [self.anchor_stride, self.projection, self.projection_dim, self.projection_seed]


#: keys that say where results are kept, not what is computed: left out of :meth:`Config.fingerprint`
#: and of the config comparisons of stores (:func:`currsearch.manifest.config_diff`)
UNHASHED_KEYS: dict[str, tuple[str, ...]] = {"train": ("warmup_cache",)}


class Config(_Section):
    """The whole experiment configuration."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    record: RecordConfig = RecordConfig()

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable dict of every value, defaults included."""
        return self.model_dump(mode="json")

    def fingerprint(self, *sections: str) -> str:
        """SHA-256 (hex) of the canonical JSON of the given sections (all when none), without the
        :data:`UNHASHED_KEYS` (a cache location changes no fingerprint)."""
        d = self.to_dict()
        for sec, keys in UNHASHED_KEYS.items():
            d[sec] = {k: v for k, v in d[sec].items() if k not in keys}
        if sections:
            d = {k: d[k] for k in sections}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()

    def replace(self, **sections: dict[str, Any]) -> "Config":
        """Return a copy with some keys of some sections replaced, validated.

        Example: ``cfg.replace(data={"num_batches": 16})``.
        """
        d = self.to_dict()
        for name, values in sections.items():
            if name not in d:
                raise ConfigError(f"unknown config section {name!r}; sections are {sorted(d)}")
            d[name].update(values)
        return config_from_dict(d)


def config_from_dict(d: dict[str, Any], source: str = "<dict>") -> Config:
    """Validate a nested dict into a :class:`Config`.

    Raises:
        ConfigError: an unknown key or an invalid value, with its dotted location.
    """
    try:
        return Config.model_validate(d or {})
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, f"configuration in {source}")) from None


def _load_yaml(text: str):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (PyYAML keeps the last
    silently, so a typo'd duplicate would override a value without a word).

    Raises:
        yaml.YAMLError: invalid YAML or a duplicate key (with its line and column).
    """
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError("while reading a mapping", node.start_mark,
                                                            f"the key {key!r} is given twice; keep one", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    return yaml.load(text, Loader=UniqueKeyLoader)


def load_config(path: str | Path | None) -> Config:
    """Load and validate a TOML or YAML config file; ``None`` gives the defaults.

    Raises:
        ConfigError: the file is missing, has an unknown suffix, does not parse, or holds
            an invalid value.
    """
    if path is None:
        return Config()
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass an existing .toml or .yaml file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text; save it as UTF-8 TOML or YAML") from None
    try:
        if p.suffix == ".toml":
            d = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            d = _load_yaml(text)
        else:
            raise ConfigError(f"config file {str(p)!r} must end in .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"config file {str(p)!r} does not parse: {err}") from None
    except Exception as err:  # yaml.YAMLError
        raise ConfigError(f"config file {str(p)!r} does not parse: {err}") from None
    if d is not None and not isinstance(d, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections, got {type(d).__name__}")
    return config_from_dict(d or {}, source=str(p))
