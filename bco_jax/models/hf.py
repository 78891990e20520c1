"""HuggingFace checkpoints: config.json <-> ModelConfig, safetensors import / export.

Import reads tensors lazily from memory-mapped safetensors and places each shard of each parameter
straight onto its target device (`jax.make_array_from_callback`), so a model larger than one device
loads onto a mesh. Pickle checkpoints are refused, never unpickled. No torch at run time.
The name mapping is one table, `KEY_TABLE`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bco_jax.models import quant
from bco_jax.models import safetensors_io as st
from bco_jax.models.decoder import Decoder, ModelConfig
from bco_jax.sharding import host_gather, mesh_spec

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
ROPE_TYPES = ("default", "linear", "llama3")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30

# (HF tensor name, our parameter path, HF->ours axis permutation, axis of the permuted tensor that is
#  split into two of ours (heads x head_dim), or None). "{i}" entries are stacked over layers.
KEY_TABLE = (
    ("model.embed_tokens.weight", "embed", (0, 1), None),
    ("model.norm.weight", "final_norm", (0,), None),
    ("lm_head.weight", "lm_head", (1, 0), None),
    ("model.layers.{i}.input_layernorm.weight", "layers/attn_norm", (0,), None),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers/wq", (1, 0), 1),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers/wk", (1, 0), 1),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers/wv", (1, 0), 1),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers/wo", (1, 0), 0),
    ("model.layers.{i}.self_attn.q_proj.bias", "layers/bq", (0,), 0),
    ("model.layers.{i}.self_attn.k_proj.bias", "layers/bk", (0,), 0),
    ("model.layers.{i}.self_attn.v_proj.bias", "layers/bv", (0,), 0),
    ("model.layers.{i}.self_attn.o_proj.bias", "layers/bo", (0,), None),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers/mlp_norm", (0,), None),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers/w_gate", (1, 0), None),
    ("model.layers.{i}.mlp.up_proj.weight", "layers/w_up", (1, 0), None),
    ("model.layers.{i}.mlp.down_proj.weight", "layers/w_down", (1, 0), None),
    ("model.layers.{i}.mlp.gate_proj.bias", "layers/b_gate", (0,), None),
    ("model.layers.{i}.mlp.up_proj.bias", "layers/b_up", (0,), None),
    ("model.layers.{i}.mlp.down_proj.bias", "layers/b_down", (0,), None),
)


# ----------------------------------------------------------------------------- config.json


def _unsupported(key, value, why=""):
    return ValueError(f"unsupported config.json option {key}={value!r}{': ' + why if why else ''}")


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
            raise ValueError(f"unsupported architecture {archs[0]!r} (config.json key 'architectures'); "
                             f"supported: {sorted(ARCHITECTURES)}")
        return ARCHITECTURES[archs[0]]
    if hf.get("model_type") not in ARCHITECTURES.values():
        raise ValueError(f"unsupported model_type {hf.get('model_type')!r} (config.json key 'model_type'); "
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


def _renamed(overrides: dict) -> dict:
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
        qkv_bias=family == "qwen2" or bool(hf.get("attention_bias", False)),
        o_bias=family == "llama" and bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        architecture={v: k for k, v in ARCHITECTURES.items()}[family],
        bos_token_id=hf.get("bos_token_id"), eos_token_ids=_as_tuple(eos),
        pad_token_id=generation.get("pad_token_id", hf.get("pad_token_id")),
        hf_config_json=json.dumps(hf, sort_keys=True),
        generation_config_json=json.dumps(generation, sort_keys=True) if generation else "",
        **_rope_fields(hf),
    )
    fields.update(_renamed(overrides))
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


# ----------------------------------------------------------------------------- layout transforms


def _table_for(param_paths) -> dict[str, tuple[str, tuple[int, ...], int | None]]:
    return {ours: (hf, perm, split) for hf, ours, perm, split in KEY_TABLE if ours in param_paths}


def _hf_shape(our_shape, perm, split) -> tuple[int, ...]:
    """Shape of the HF tensor that becomes `our_shape` (one layer) under (perm, split)."""
    permuted = list(our_shape)
    if split is not None:
        permuted[split:split + 2] = [our_shape[split] * our_shape[split + 1]]
    hf = [0] * len(perm)
    for our_axis, hf_axis in enumerate(perm):
        hf[hf_axis] = permuted[our_axis]
    return tuple(hf)


def _read_block(tensor, our_index, our_shape, perm, split) -> np.ndarray:
    """Read only the HF rows/columns behind `our_index` (slices into one layer's tensor)."""
    idx = [slice(*s.indices(n)[:2]) for s, n in zip(our_index, our_shape)]
    permuted = list(idx)
    if split is not None:  # a slice over (heads, head_dim) reads whole heads, then trims head_dim
        sub = our_shape[split + 1]
        heads = idx[split]
        permuted[split:split + 2] = [slice(heads.start * sub, heads.stop * sub)]
    hf_index = [slice(None)] * len(perm)
    for our_axis, hf_axis in enumerate(perm):
        hf_index[hf_axis] = permuted[our_axis]
    block = np.asarray(tensor[tuple(hf_index)]).transpose(perm)
    if split is not None:
        shape = list(block.shape)
        shape[split:split + 1] = [idx[split].stop - idx[split].start, our_shape[split + 1]]
        block = block.reshape(shape)
        trim = [slice(None)] * block.ndim
        trim[split + 1] = slice(idx[split + 1].start, idx[split + 1].stop)
        block = block[tuple(trim)]
    return block


def _to_hf(our_array: np.ndarray, perm, split) -> np.ndarray:
    if split is not None:
        shape = list(our_array.shape)
        shape[split:split + 2] = [shape[split] * shape[split + 1]]
        our_array = our_array.reshape(shape)
    return np.ascontiguousarray(our_array.transpose(np.argsort(perm)))


# ----------------------------------------------------------------------------- load


def _checkpoint_files(path) -> dict[str, str]:
    """HF tensor name -> safetensors file. Refuses pickle checkpoints without opening them."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = _load_json(index)["weight_map"]
        return {name: os.path.join(path, f) for name, f in weight_map.items()}
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return dict.fromkeys(st.SafetensorsFile(single).names(), single)
    pickles = [f for f in PICKLE_FILES if os.path.exists(os.path.join(path, f))]
    if pickles:
        raise ValueError(f"{os.path.join(path, pickles[0])} is a pickle checkpoint; refusing to unpickle it "
                         "(it can run arbitrary code). Convert it to safetensors first.")
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")


def _target_sharding(spec, shape, mesh, rules):
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.sharding.NamedSharding(mesh, mesh_spec(spec, mesh, rules, shape))


def _load_param(files, opened, hf_name, layered, shape, perm, split, sharding, dtype):
    layer_shape = shape[1:] if layered else shape
    names = [hf_name.format(i=i) for i in range(shape[0])] if layered else [hf_name]
    for name in names:
        if name not in files:
            raise KeyError(f"tensor {name!r} missing from the checkpoint")
        found = opened(files[name]).shape(name)
        if tuple(found) != _hf_shape(layer_shape, perm, split):
            raise ValueError(f"tensor {name!r} has shape {tuple(found)}, expected "
                             f"{_hf_shape(layer_shape, perm, split)} from config.json")

    def read(index):
        if not layered:
            return _read_block(opened(files[names[0]]).tensor(names[0]), index, shape, perm, split).astype(dtype)
        layers = range(*index[0].indices(shape[0]))
        blocks = [_read_block(opened(files[names[i]]).tensor(names[i]), index[1:], layer_shape, perm, split)
                  for i in layers]
        return np.stack(blocks).astype(dtype)

    return jax.make_array_from_callback(shape, sharding, read)


def load_hf(path, *, dtype=None, param_dtype=jnp.float32, mesh=None, rules=None, **overrides) -> Decoder:
    """Decoder with weights from a local HF folder (safetensors only). With `mesh`, each parameter is
    placed on the sharding its logical axes map to under `rules` (default sharding.LOGICAL_RULES).
    `overrides` set ModelConfig fields such as remat or attn_implementation. With
    `quantize_base=True` the seven projections are stored int8 + scales (`quant`): each is read in
    `param_dtype` onto its sharding and quantized there, one projection at a time, so the
    full-precision copy of only one stacked projection exists at once."""
    files = _checkpoint_files(path)
    cfg = read_config(path, **_renamed(overrides))
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
    graphdef, state = nnx.split(model)
    flat = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(state)}
    table = _table_for(flat)
    cache: dict[str, st.SafetensorsFile] = {}

    def opened(file):
        if file not in cache:
            cache[file] = st.SafetensorsFile(file)
        return cache[file]

    def sharding_of(var):
        spec = jax.sharding.PartitionSpec(*(var.get_metadata().get("out_sharding") or ()))
        return _target_sharding(spec, var.shape, mesh, rules)

    for our_name, var in flat.items():
        if our_name.endswith(quant.SCALE):
            continue  # set with its weight
        hf_name, perm, split = table[our_name]
        scale = flat.get(our_name + quant.SCALE)
        value = _load_param(files, opened, hf_name, "{i}" in hf_name, var.shape, perm, split,
                            sharding_of(var), jnp.dtype(param_dtype))
        if scale is None:
            var.set_value(value)
            continue
        n_in = quant.input_axes(our_name.rsplit("/", 1)[-1])
        q, s = jax.jit(quant.quantize, static_argnums=(1,),
                       out_shardings=(sharding_of(var), sharding_of(scale)))(value, n_in)
        del value
        var.set_value(q)
        scale.set_value(s)
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------- save


def _hf_tensors(model: Decoder):
    """Yield (HF name, numpy array) one layer at a time, so the host holds one tensor at once. An
    int8 projection (`quantize_base`) is written dequantized, in the model's parameter dtype."""
    _, state = nnx.split(model)
    flat = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(state)}
    for our_name, (hf_name, perm, split) in _table_for(flat).items():
        array = flat[our_name][...]
        if "{i}" not in hf_name:
            yield hf_name, _to_hf(host_gather(array), perm, split)
            continue
        scale = flat.get(our_name + quant.SCALE)
        for i in range(array.shape[0]):
            layer = array[i]
            if scale is not None:
                n_in = quant.input_axes(our_name.rsplit("/", 1)[-1])
                layer = quant.dequantize(layer, scale[...][i], n_in, model.param_dtype, lead=0)
            yield hf_name.format(i=i), _to_hf(host_gather(layer), perm, split)


def save_hf(model: Decoder, path, *, tokenizer=None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
    """Write config.json (+ generation_config.json when the source had one) and safetensors that
    transformers loads; sharded with an index above `max_shard_bytes`. `tokenizer`: an HF tokenizer
    object or a folder whose tokenizer files are copied. On several processes, call it on all of
    them (they gather the parameters together); process 0 writes."""
    if jax.process_index() != 0:
        for _ in _hf_tensors(model):
            pass
        return
    os.makedirs(path, exist_ok=True)
    cfg = model.config
    dtype_name = jnp.dtype(model.param_dtype).name
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(cfg, dtype_name), f, indent=2, sort_keys=True)
    if cfg.generation_config_json:
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump(json.loads(cfg.generation_config_json), f, indent=2, sort_keys=True)
    st.write_sharded(_hf_tensors(model), path, max_shard_bytes)
    if tokenizer is not None:
        _save_tokenizer(tokenizer, path)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def _save_tokenizer(tokenizer, path):
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(path)
        return
    for name in TOKENIZER_FILES:
        source = os.path.join(tokenizer, name)
        if os.path.exists(source):
            shutil.copy(source, os.path.join(path, name))

