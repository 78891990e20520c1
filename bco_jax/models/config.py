"""The architecture of a decoder: `ModelConfig`, read from and written back to an HF config.json.

`read_config` maps a Llama / Mistral / Qwen2 config.json (transformers 4.x or 5) to the frozen,
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
from bco_jax.models.attention import ATTN_IMPLEMENTATIONS, CAUSAL_KERNELS
from bco_jax.models.projections import bias_flags

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
ROPE_TYPES = ("default", "linear", "llama3")
REMAT_POLICIES = ("none", "full", "save_dots")


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
    sliding_window: int | None = None  # Mistral: a query sees keys with q - k < window
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


def compute_dtype(name: str = "auto") -> jnp.dtype:
    """"auto": bfloat16 on accelerators, float32 on CPU (where bfloat16 matmuls are slow and tests
    compare against float32 references); otherwise the named dtype."""
    if name == "auto":
        return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    return jnp.dtype(name)


def _unsupported(key, value, why=""):
    return ConfigError(f"unsupported config.json option {key}={value!r}{': ' + why if why else ''}")


def _load_json(path):
    with open(path) as f:
        return json.load(f)


def _rope_fields(hf: dict) -> dict:
    """Rope settings from transformers-5 `rope_parameters` or 4.x `rope_theta` + `rope_scaling`."""
    key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    params = dict(hf.get(key) or {})
    if "full_attention" in params:  # per-layer-type form; our families use one rope for all layers
        params = dict(params["full_attention"])
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise _unsupported(f"{key}.rope_type", rope_type, f"supported: {ROPE_TYPES}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise _unsupported(f"{key}.partial_rotary_factor", params["partial_rotary_factor"])
    fields = dict(rope_type=rope_type,
                  rope_theta=float(params.get("rope_theta", hf.get("rope_theta", 10000.0))))
    if rope_type in ("linear", "llama3"):
        fields["rope_factor"] = float(params["factor"])
    if rope_type == "llama3":
        fields.update(rope_low_freq_factor=float(params["low_freq_factor"]),
                      rope_high_freq_factor=float(params["high_freq_factor"]),
                      rope_original_max_positions=int(params["original_max_position_embeddings"]))
    return fields


def _as_tuple(ids) -> tuple[int, ...]:
    if ids is None:
        return ()
    return tuple(int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids]))


def _family(hf: dict) -> str:
    archs = hf.get("architectures") or []
    if archs:
        if archs[0] not in ARCHITECTURES:
            raise ConfigError(f"unsupported architecture {archs[0]!r} (config.json key 'architectures'); "
                             f"supported: {sorted(ARCHITECTURES)}")
        return ARCHITECTURES[archs[0]]
    if hf.get("model_type") not in ARCHITECTURES.values():
        raise ConfigError(f"unsupported model_type {hf.get('model_type')!r} (config.json key 'model_type'); "
                         f"supported: {sorted(ARCHITECTURES.values())}")
    return hf["model_type"]


def _sliding_window(hf: dict, family: str):
    if family == "mistral":
        return hf.get("sliding_window")
    if family == "qwen2" and hf.get("use_sliding_window"):
        raise _unsupported("use_sliding_window", True, "Qwen2 per-layer sliding windows")
    layer_types = set(hf.get("layer_types") or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise _unsupported("layer_types", sorted(layer_types))
    return None


def rename_deprecated(overrides: dict) -> dict:
    """ModelConfig overrides with deprecated names replaced (warned about at the caller's caller)."""
    if "attention_impl" in overrides:
        warnings.warn("attention_impl is deprecated; use attn_implementation", DeprecationWarning, stacklevel=3)
        overrides = dict(overrides)
        overrides["attn_implementation"] = overrides.pop("attention_impl") or "auto"
    return overrides


def read_config(path_or_dict, **overrides) -> ModelConfig:
    """ModelConfig from an HF folder / config.json path / dict. `overrides` set our own fields
    (remat, attn_implementation). generation_config.json next to config.json supplies the EOS ids."""
    generation = {}
    if isinstance(path_or_dict, dict):
        hf = path_or_dict
    else:
        folder = path_or_dict if os.path.isdir(path_or_dict) else os.path.dirname(path_or_dict)
        hf = _load_json(os.path.join(folder, "config.json"))
        gen_path = os.path.join(folder, "generation_config.json")
        generation = _load_json(gen_path) if os.path.exists(gen_path) else {}
    family = _family(hf)
    if hf.get("hidden_act", "silu") != "silu":
        raise _unsupported("hidden_act", hf["hidden_act"], "only silu (SwiGLU)")
    heads = hf["num_attention_heads"]
    eos = generation.get("eos_token_id", hf.get("eos_token_id"))
    fields = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        sliding_window=_sliding_window(hf, family),
        **bias_flags(family, hf),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        architecture={v: k for k, v in ARCHITECTURES.items()}[family],
        bos_token_id=hf.get("bos_token_id"), eos_token_ids=_as_tuple(eos),
        pad_token_id=generation.get("pad_token_id", hf.get("pad_token_id")),
        hf_config_json=json.dumps(hf, sort_keys=True),
        generation_config_json=json.dumps(generation, sort_keys=True) if generation else "",
        **_rope_fields(hf),
    )
    fields.update(rename_deprecated(overrides))
    return ModelConfig(**fields)


def config_to_hf(cfg: ModelConfig, dtype_name: str) -> dict:
    """config.json for `cfg`: the source file when there was one, else built from the fields."""
    if cfg.hf_config_json:
        hf = json.loads(cfg.hf_config_json)
        hf.pop("torch_dtype", None)
        hf["dtype"] = dtype_name
        hf.setdefault("architectures", [cfg.architecture])
        return hf
    rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type != "default":
        rope["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
        rope.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_positions)
    eos = list(cfg.eos_token_ids)
    hf = dict(
        architectures=[cfg.architecture], model_type=ARCHITECTURES[cfg.architecture],
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
        rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters=rope, sliding_window=cfg.sliding_window, attention_bias=cfg.o_bias,
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
