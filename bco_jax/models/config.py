"""The architecture of a decoder: `ModelConfig`, read from and written back to an HF config.json.

`read_config` maps a Llama / Mistral / Qwen2 / Qwen3 / Gemma 3 config.json (transformers 4.x or 5; a
Gemma 3 vision-language config gives its text tower) or a GGUF file's metadata to the frozen,
hashable `ModelConfig` the decoder is built from (it lives in the model's graphdef, a static jit
argument), refusing options the decoder does not implement; `config_to_hf` writes it back.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings

import jax
import jax.numpy as jnp

from bco_jax.errors import ConfigError
from bco_jax.models import gguf_io
from bco_jax.models.attention import ATTN_IMPLEMENTATIONS, CAUSAL_KERNELS
from bco_jax.models.projections import bias_flags

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3", "Gemma3ForCausalLM": "gemma3_text"}
MULTIMODAL = {"Gemma3ForConditionalGeneration": "gemma3"}  # architecture -> model_type; its text_config is read
# What sets a family apart, as ModelConfig fields. Gemma 3: every norm scales by (1 + w), attention and
# MLP outputs are normalised too, embeddings are multiplied by sqrt(hidden_size).
FAMILY_TRAITS = {
    "qwen3": dict(qk_norm=True),
    "gemma3_text": dict(qk_norm=True, sandwich_norms=True, norm_weight_offset=1.0, scale_embeddings=True),
}
# Gemma3TextConfig's defaults, for keys a Gemma 3 config.json (or a GGUF file) leaves out.
GEMMA3_DEFAULTS = dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6,
                       max_position_embeddings=131072, hidden_activation="gelu_pytorch_tanh",
                       query_pre_attn_scalar=256, sliding_window=4096, rope_theta=1_000_000.0,
                       rope_local_base_freq=10_000.0, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1,
                       pad_token_id=0)
ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # SwiGLU (Llama, Mistral, Qwen), GeGLU with tanh GELU (Gemma)
LAYER_TYPES = ("full_attention", "sliding_attention")
REMAT_POLICIES = ("none", "full", "save_dots")
REQUIRED_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder. Built from an HF config.json by `read_config`; frozen and hashable
    so it can live in an NNX graphdef that is a static jit argument."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"  # default | linear | llama3
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    max_position_embeddings: int = 4096
    sliding_window: int | None = None  # a query of a sliding layer sees keys with q - k < window
    layer_types: tuple[str, ...] = ()  # per layer, LAYER_TYPES; (): every layer sliding iff sliding_window is set
    rope_local_theta: float | None = None  # Gemma 3: sliding layers' RoPE base (default RoPE); None: as the rest
    hidden_act: str = "silu"  # ACTIVATIONS
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each query / key head before RoPE
    sandwich_norms: bool = False  # Gemma 3: attention and MLP outputs normalised before the residual add
    norm_weight_offset: float = 0.0  # Gemma 3: 1.0, norms scale by (1 + w)
    scale_embeddings: bool = False  # Gemma 3: embeddings times sqrt(hidden_size)
    query_pre_attn_scalar: float | None = None  # Gemma 3: scores scaled by its -1/2 power (None: head_dim's)
    final_logit_softcapping: float | None = None  # logits = cap * tanh(logits / cap)
    qkv_bias: bool = False  # Qwen2
    o_bias: bool = False  # Llama attention_bias also biases the o projection
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()  # all ids that end a generation (Llama 3 has several)
    pad_token_id: int | None = None
    remat: str = "none"  # none | full | save_dots: what the backward pass recomputes per layer
    attn_implementation: str = "auto"  # ATTN_IMPLEMENTATIONS, or a planning-only kernel of attention.CAUSAL_KERNELS
    lora_rank: int = 0  # > 0: LoRA adapters on `lora_targets` (bco_jax.models.lora)
    lora_alpha: float = 0.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ()
    quantize_base: bool = False  # the 7 projections stored int8 + per-channel scales (bco_jax.models.quant)
    hf_config_json: str = ""  # the source config.json, written back by save_hf
    generation_config_json: str = ""  # the source generation_config.json, if any

    def __post_init__(self):
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.attn_implementation not in ("auto", *CAUSAL_KERNELS):
            raise ConfigError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, "
                             f"got {self.attn_implementation!r}")
        if self.layer_types and (len(self.layer_types) != self.num_layers or set(self.layer_types) - set(LAYER_TYPES)):
            raise ConfigError(f"layer_types must give one of {LAYER_TYPES} per layer ({self.num_layers})")
        if "sliding_attention" in self.layer_types and self.sliding_window is None:
            raise ConfigError("layer_types has sliding_attention layers but sliding_window is not set")

    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer: whether it attends through the sliding window (with the local RoPE, if any)."""
        if self.layer_types:
            return tuple(t == "sliding_attention" for t in self.layer_types)
        return (self.sliding_window is not None,) * self.num_layers

    @property
    def attention_scale(self) -> float:
        return float((self.query_pre_attn_scalar or self.head_dim) ** -0.5)


def compute_dtype(name: str = "auto") -> jnp.dtype:
    """"auto": bfloat16 on accelerators, float32 on CPU (where bfloat16 matmuls are slow and tests
    compare against float32 references); otherwise the named dtype."""
    auto = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(auto if name == "auto" else name)


def _unsupported(key, value, why=""):
    return ConfigError(f"unsupported config.json option {key}={value!r}{': ' + why if why else ''}")


def _load_json(path) -> dict:
    """The JSON object in file `path`; ConfigError naming the file when it is garbled or not UTF-8."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"{path}: cannot read ({err})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return value


def _check_sizes(hf: dict, where: str) -> None:
    """The REQUIRED_SIZES, and head_dim and num_key_value_heads unless null, are positive integers, the
    query heads a multiple of the key-value heads; ConfigError naming `where` (the file) and the key."""
    for key in (*REQUIRED_SIZES, "num_key_value_heads", "head_dim"):
        value, got = hf.get(key), f"got {hf[key]!r}" if key in hf else "missing"
        if (key in REQUIRED_SIZES or value is not None) and (type(value) is not int or value < 1):
            raise ConfigError(f"{where}: {key} must be a positive integer ({got})")
    if hf["num_attention_heads"] % (hf.get("num_key_value_heads") or 1):
        raise ConfigError(f"{where}: num_attention_heads must be a multiple of num_key_value_heads")


def _rope_params(params: dict, key: str) -> dict:
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise _unsupported(f"{key}.rope_type", rope_type, f"supported: {ROPE_TYPES}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise _unsupported(f"{key}.partial_rotary_factor", params["partial_rotary_factor"])
    fields = dict(rope_type=rope_type)
    if "rope_theta" in params:
        fields["rope_theta"] = float(params["rope_theta"])
    if rope_type in ("linear", "llama3"):
        fields["rope_factor"] = float(params["factor"])
    if rope_type == "llama3":
        fields.update(rope_low_freq_factor=float(params["low_freq_factor"]),
                      rope_high_freq_factor=float(params["high_freq_factor"]),
                      rope_original_max_positions=int(params["original_max_position_embeddings"]))
    return fields


def _rope_fields(hf: dict, family: str) -> dict:
    """RoPE settings from transformers-5 `rope_parameters` (one dict, or one per layer type) or 4.x
    `rope_theta` + `rope_scaling` (Gemma 3: scaling on full-attention layers only, sliding layers'
    base in `rope_local_base_freq`). Sliding layers take default RoPE with their own base, or the same
    RoPE as the rest."""
    key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    params = dict(hf.get(key) or {})
    local = None
    if "full_attention" in params or "sliding_attention" in params:
        local = params.get("sliding_attention")
        params = dict(params.get("full_attention") or {})
        key = f"{key}.full_attention"
    elif family == "gemma3_text":
        local = {"rope_type": "default", "rope_theta": hf.get("rope_local_base_freq", 10_000.0)}
    fields = {"rope_theta": float(hf.get("rope_theta", 10000.0)), **_rope_params(params, key)}
    if local is not None and local != params:
        local_fields = _rope_params(local, key.replace("full_attention", "sliding_attention"))
        if local_fields["rope_type"] != "default":
            raise _unsupported(f"{key}.sliding_attention.rope_type", local_fields["rope_type"],
                               "sliding layers take default RoPE")
        fields["rope_local_theta"] = local_fields.get("rope_theta", fields["rope_theta"])
    return fields


def _as_tuple(ids) -> tuple[int, ...]:
    return () if ids is None else tuple(int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids]))


def _family(hf: dict) -> str:
    """The family's model_type ("llama", ..., "gemma3_text"), from `architectures` or `model_type`."""
    archs = hf.get("architectures") or []
    if archs:
        if archs[0] not in ARCHITECTURES:
            raise ConfigError(f"unsupported architecture {archs[0]!r} (config.json key 'architectures'); "
                             f"supported: {sorted(ARCHITECTURES) + sorted(MULTIMODAL)}")
        return ARCHITECTURES[archs[0]]
    if hf.get("model_type") not in ARCHITECTURES.values():
        raise ConfigError(f"unsupported model_type {hf.get('model_type')!r} (config.json key 'model_type'); "
                         f"supported: {sorted(ARCHITECTURES.values())}")
    return hf["model_type"]


def text_config(hf: dict) -> dict:
    """The decoder's config.json: `hf` itself, or the text tower's of a vision-language checkpoint
    (Gemma3ForConditionalGeneration), completed with its family's defaults as a text-only config."""
    archs = hf.get("architectures") or []
    if (archs[0] if archs else hf.get("model_type")) not in (*MULTIMODAL, *MULTIMODAL.values()):
        return hf
    text = dict(hf.get("text_config") or {})
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key not in text and hf.get(key) is not None:
            text[key] = hf[key]
    return dict(text, architectures=["Gemma3ForCausalLM"], model_type="gemma3_text")


def _layer_types(hf: dict, family: str) -> dict:
    """`sliding_window` and `layer_types`: Mistral slides every layer; Qwen2/3 the layers from
    `max_window_layers` on when `use_sliding_window`; Gemma 3 all but every `sliding_window_pattern`-th
    (or as `layer_types` says); Llama none."""
    layers = hf["num_hidden_layers"]
    if family == "mistral":
        return dict(sliding_window=hf.get("sliding_window"))
    window, types = None, hf.get("layer_types")
    if family in ("qwen2", "qwen3"):
        if not hf.get("use_sliding_window"):  # as transformers: no window, whatever layer_types says
            return dict(sliding_window=None, layer_types=())
        window = hf.get("sliding_window")
        start = hf.get("max_window_layers", layers)
        types = types or ["sliding_attention" if i >= start else "full_attention" for i in range(layers)]
    elif family == "gemma3_text":
        window = hf.get("sliding_window")
        pattern = hf.get("sliding_window_pattern", 6)
        types = types or ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    types = tuple(types or ())
    if set(types) - set(LAYER_TYPES):
        raise _unsupported("layer_types", sorted(set(types)), f"supported: {LAYER_TYPES}")
    if "sliding_attention" not in types:
        return dict(sliding_window=None, layer_types=())
    if window is None:
        raise _unsupported("sliding_window", None, "layer_types names sliding_attention layers")
    return dict(sliding_window=int(window), layer_types=types)


def _unsupported_options(hf: dict) -> None:
    """Refuse options that would change the model in ways the decoder does not implement."""
    for key in ("attn_logit_softcapping",):
        if hf.get(key) is not None:
            raise _unsupported(key, hf[key], "not implemented (null in every Gemma 3 config)")
    for key in ("use_bidirectional_attention",):
        if hf.get(key):
            raise _unsupported(key, hf[key], "only causal decoders")


def rename_deprecated(overrides: dict) -> dict:
    """ModelConfig overrides with deprecated names replaced (warned about at the caller's caller)."""
    if "attention_impl" in overrides:
        warnings.warn("attention_impl is deprecated; use attn_implementation", DeprecationWarning, stacklevel=3)
        overrides = dict(overrides)
        overrides["attn_implementation"] = overrides.pop("attention_impl") or "auto"
    return overrides


def find_gguf(path) -> str | None:
    """The GGUF file `path` names: itself (a .gguf file), or the one .gguf in a folder without a
    config.json; None for an HF folder or config.json path."""
    path = str(path)
    if path.endswith(".gguf") and not os.path.isdir(path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"no GGUF file {path}")
        return path
    if not os.path.isdir(path) or os.path.exists(os.path.join(path, "config.json")):
        return None
    found = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
    if len(found) > 1:
        raise ConfigError(f"{path} holds several GGUF files ({', '.join(found)}): name one")
    return os.path.join(path, found[0]) if found else None


def config_file(path) -> str:
    """The file `path`'s config is in: its GGUF file, itself (a config.json by any name), or the folder's."""
    path = str(path)
    return find_gguf(path) or (path if os.path.isfile(path) else os.path.join(path, "config.json"))


def read_source(path) -> tuple[dict, dict]:
    """(config.json, generation_config.json) of an HF folder, a config.json path or a GGUF file (or a
    folder holding one and no config.json)."""
    source = config_file(path)
    if source.endswith(".gguf"):
        checkpoint = gguf_io.open_checkpoint(source)
        return checkpoint.hf_config(), checkpoint.generation_config()
    gen_path = os.path.join(os.path.dirname(source), "generation_config.json")
    return _load_json(source), _load_json(gen_path) if os.path.exists(gen_path) else {}


def read_config(path_or_dict, **overrides) -> ModelConfig:
    """ModelConfig from an HF folder / config.json path / GGUF file / dict. `overrides` set our own
    fields (remat, attn_implementation). generation_config.json next to config.json supplies the EOS ids.
    Errors name the key, and the file (`config.json` for a dict) when a size is missing or not positive."""
    where = "config.json" if isinstance(path_or_dict, dict) else config_file(path_or_dict)
    hf, generation = (path_or_dict, {}) if isinstance(path_or_dict, dict) else read_source(where)
    hf = text_config(hf)
    family = _family(hf)
    if family == "gemma3_text":
        hf = {**{k: v for k, v in GEMMA3_DEFAULTS.items() if k not in hf}, **hf}
    _check_sizes(hf, where)
    _unsupported_options(hf)
    act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise _unsupported("hidden_act", act, f"supported: {ACTIVATIONS}")
    heads = hf["num_attention_heads"]
    eos = generation.get("eos_token_id", hf.get("eos_token_id"))
    fields = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        **_layer_types(hf, family), hidden_act=act,
        **bias_flags(family, hf), **FAMILY_TRAITS.get(family, {}),
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar") if family == "gemma3_text" else None,
        final_logit_softcapping=hf.get("final_logit_softcapping"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        architecture={v: k for k, v in ARCHITECTURES.items()}[family],
        bos_token_id=hf.get("bos_token_id"), eos_token_ids=_as_tuple(eos),
        pad_token_id=generation.get("pad_token_id", hf.get("pad_token_id")),
        hf_config_json=json.dumps(hf, sort_keys=True),
        generation_config_json=json.dumps(generation, sort_keys=True) if generation else "",
        **_rope_fields(hf, family),
    )
    fields.update(rename_deprecated(overrides))
    return ModelConfig(**fields)


def _rope_hf(cfg: ModelConfig) -> dict:
    rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type != "default":
        rope["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
        rope.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_positions)
    if cfg.rope_local_theta is None:
        return rope
    return {"full_attention": rope, "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_theta}}


def _family_hf(cfg: ModelConfig) -> dict:
    """The config.json keys that say a family's traits (the inverse of FAMILY_TRAITS and _layer_types)."""
    family = ARCHITECTURES[cfg.architecture]
    hf = dict(sliding_window=cfg.sliding_window)
    if cfg.layer_types:
        hf["layer_types"] = list(cfg.layer_types)
    if family in ("qwen2", "qwen3") and cfg.sliding_window is not None:
        hf.update(use_sliding_window=True, max_window_layers=cfg.sliding_layers().index(True))
    if family == "gemma3_text":
        hf.update(hidden_activation=cfg.hidden_act, query_pre_attn_scalar=cfg.query_pre_attn_scalar,
                  final_logit_softcapping=cfg.final_logit_softcapping, attn_logit_softcapping=None)
    else:
        hf["hidden_act"] = cfg.hidden_act
    return hf


def config_to_hf(cfg: ModelConfig, dtype_name: str) -> dict:
    """config.json for `cfg`: the source file when there was one, else built from the fields."""
    if cfg.hf_config_json:
        hf = json.loads(cfg.hf_config_json)
        hf.pop("torch_dtype", None)
        hf["dtype"] = dtype_name
        hf.setdefault("architectures", [cfg.architecture])
        return hf
    eos = list(cfg.eos_token_ids)
    hf = dict(
        architectures=[cfg.architecture], model_type=ARCHITECTURES[cfg.architecture],
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters=_rope_hf(cfg), **_family_hf(cfg), attention_bias=cfg.o_bias,
        mlp_bias=cfg.mlp_bias, tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=cfg.bos_token_id, eos_token_id=eos[0] if len(eos) == 1 else (eos or None),
        pad_token_id=cfg.pad_token_id, dtype=dtype_name)
    # Some field combinations (e.g. q/k/v biases on Mistral) have no config.json form: refuse them.
    ours = {f.name for f in dataclasses.fields(ModelConfig)} - {"remat", "attn_implementation", "hf_config_json",
                                                               "generation_config_json", "quantize_base"}
    back = read_config(hf)
    lost = sorted(f for f in ours if getattr(back, f) != getattr(cfg, f))
    if lost:
        raise ValueError(f"ModelConfig fields {lost} have no {cfg.architecture} config.json form")
    return hf
