"""HuggingFace checkpoints: safetensors import / export (config.json is `config.py`'s).

Import reads tensors lazily from memory-mapped safetensors (or dequantizes them one at a time from a
GGUF file, `gguf_io`) and places each shard of each parameter straight onto its target device
(`jax.make_array_from_callback`), so a model larger than one device loads onto a mesh. Pickle
checkpoints are refused, never unpickled. No torch at run time. The name mapping is one table per
config, `key_table(cfg)`, whose per-layer rows come from `projections` (projections and norms).
"""
from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from bco_jax.errors import ConfigError, log
from bco_jax.models import gguf_io, quant
from bco_jax.models import safetensors_io as st
from bco_jax.models.config import config_to_hf, find_gguf, read_config, rename_deprecated
from bco_jax.models.decoder import Decoder
from bco_jax.models.projections import BLOCKS, PROJECTIONS, layer_norms
from bco_jax.sharding import host_gather, mesh_spec

PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def _layer_rows(cfg, block: str, projections) -> tuple:
    """A block's norms (its input norm first), then the weights and biases of its projections. HF
    stores a weight as [out, in] and we as [in..., out...]: permuted (1, 0), with the side that has
    heads x head_dim split in two (our q/k/v outputs, o's inputs)."""
    rows = [(f"model.layers.{{i}}.{n.hf_module(cfg)}.weight", f"layers/{n.name}", (0,), None)
            for n in layer_norms(cfg, block)]
    for p in projections:
        split = 0 if p.n_in == 2 else (1 if len(p.outputs) == 2 else None)
        rows.append((f"model.layers.{{i}}.{p.module}.weight", f"layers/{p.name}", (1, 0), split))
    for p in projections:
        split = 0 if len(p.outputs) == 2 else None
        rows.append((f"model.layers.{{i}}.{p.module}.bias", f"layers/{p.bias}", (0,), split))
    return tuple(rows)


def key_table(cfg) -> tuple:
    """(HF tensor name, our parameter path, HF->ours axis permutation, axis of the permuted tensor that
    is split into two of ours (heads x head_dim), or None) for a model of `cfg`. "{i}" entries are
    stacked over layers. The order is the order tensors are written in."""
    return (
        ("model.embed_tokens.weight", "embed", (0, 1), None),
        ("model.norm.weight", "final_norm", (0,), None),
        ("lm_head.weight", "lm_head", (1, 0), None),
        *(row for block, projections in BLOCKS for row in _layer_rows(cfg, block, projections)),
    )


# A vision-language checkpoint's text tower (Gemma3ForConditionalGeneration, both layouts transformers
# has written) read as a text-only one: stored prefix -> ours; and the towers skipped.
TEXT_TOWER_PREFIXES = {"model.language_model.": "model.", "language_model.model.": "model.",
                       "language_model.lm_head.": "lm_head."}
SKIPPED_TOWERS = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


# ----------------------------------------------------------------------------- layout transforms


def _table_for(cfg, param_paths) -> dict[str, tuple[str, tuple[int, ...], int | None]]:
    return {ours: (hf, perm, split) for hf, ours, perm, split in key_table(cfg) if ours in param_paths}


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


def _checkpoint_files(path) -> dict[str, tuple[str, str]]:
    """HF tensor name -> (file, its name there). Refuses pickle checkpoints without opening them."""
    gguf = find_gguf(path)
    if gguf is not None:
        return {name: (gguf, name) for name in gguf_io.open_checkpoint(gguf).names()}
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        stored = {name: os.path.join(path, f) for name, f in weight_map.items()}
    else:
        single = os.path.join(path, "model.safetensors")
        pickles = [f for f in PICKLE_FILES if os.path.exists(os.path.join(path, f))]
        if not os.path.exists(single) and pickles:
            raise ConfigError(f"{os.path.join(path, pickles[0])} is a pickle checkpoint; refusing to unpickle it "
                             "(it can run arbitrary code). Convert it to safetensors first.")
        if not os.path.exists(single):
            raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
        stored = dict.fromkeys(st.SafetensorsFile(single).names(), single)
    return _text_tower(stored, path)


def _text_tower(stored: dict[str, str], path) -> dict[str, tuple[str, str]]:
    files, skipped = {}, 0
    for name, file in stored.items():
        if name.startswith(SKIPPED_TOWERS):
            skipped += 1
            continue
        prefix = next((p for p in TEXT_TOWER_PREFIXES if name.startswith(p)), None)
        ours = name if prefix is None else TEXT_TOWER_PREFIXES[prefix] + name[len(prefix):]
        files[ours] = (file, name)
    if skipped:
        log.info("%s: reading the text tower; skipping %d vision tower / projector tensors", path, skipped)
    return files


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
        found = opened(files[name][0]).shape(files[name][1])
        if tuple(found) != _hf_shape(layer_shape, perm, split):
            raise ConfigError(f"tensor {name!r} has shape {tuple(found)}, expected "
                             f"{_hf_shape(layer_shape, perm, split)} from config.json")

    def tensor(name):
        file, stored = files[name]
        return opened(file).tensor(stored)

    def read(index):
        if not layered:
            return _read_block(tensor(names[0]), index, shape, perm, split).astype(dtype)
        layers = range(*index[0].indices(shape[0]))
        blocks = [_read_block(tensor(names[i]), index[1:], layer_shape, perm, split) for i in layers]
        return np.stack(blocks).astype(dtype)

    return jax.make_array_from_callback(shape, sharding, read)


def load_hf(path, *, dtype=None, param_dtype=jnp.float32, mesh=None, rules=None, **overrides) -> Decoder:
    """Decoder with weights from a local HF folder (safetensors only) or a GGUF file (or a folder
    holding one, `config.find_gguf`), dequantized one tensor at a time. With `mesh`, each parameter is
    placed on the sharding its logical axes map to under `rules` (default sharding.LOGICAL_RULES).
    `overrides` set ModelConfig fields such as remat or attn_implementation. With
    `quantize_base=True` the seven projections are stored int8 + scales (`quant`): each is read in
    `param_dtype` onto its sharding and quantized there, one projection at a time, so the
    full-precision copy of only one stacked projection exists at once."""
    files = _checkpoint_files(path)
    cfg = read_config(path, **rename_deprecated(overrides))
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
    graphdef, state = nnx.split(model)
    flat = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(state)}
    table = _table_for(cfg, flat)
    cache: dict = {}

    def opened(file):
        if file not in cache:
            if file.endswith(".gguf"):
                cache[file] = gguf_io.open_checkpoint(file)
            else:
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
        n_in = PROJECTIONS[our_name.rsplit("/", 1)[-1]].n_in
        q, s = jax.jit(quant.quantize, static_argnums=(1,),
                       out_shardings=(sharding_of(var), sharding_of(scale)))(value, n_in)
        del value
        var.set_value(q)
        scale.set_value(s)
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------- save


def source_dtype(hf_config: dict):
    """The dtype a config.json says its weights are in (`dtype`, or transformers 4's `torch_dtype`):
    float32, bfloat16 or float16; None when it names none of them."""
    name = hf_config.get("dtype") or hf_config.get("torch_dtype")
    return jnp.dtype(name) if name in ("float32", "bfloat16", "float16") else None


def _hf_tensors(cfg, params: dict, dtype, layer=None):
    """Yield (HF name, numpy array) of the pure param dict `params` of a model of `cfg`: one tensor
    at a time, a stacked one layer at a time, each cast to `dtype` where it lies before it is
    gathered, so a host holds one tensor (in `dtype`) at once. An int8 projection (`quantize_base`)
    is dequantized. `layer(name, i)`: layer i of `layers/<name>` as the caller computes it (the LoRA
    export merges its adapters there), or None to write it as stored."""
    flat = traverse_util.flatten_dict(params, sep="/")
    for our_name, (hf_name, perm, split) in _table_for(cfg, flat).items():
        array = flat[our_name]
        if "{i}" not in hf_name:
            yield hf_name, _to_hf(host_gather(array.astype(dtype)), perm, split)
            continue
        name = our_name.rsplit("/", 1)[-1]
        scale = flat.get(our_name + quant.SCALE)
        for i in range(array.shape[0]):  # no reference kept: one layer on the devices at a time
            value = _layer(array, scale, name, i, dtype, layer).astype(dtype)
            yield hf_name.format(i=i), _to_hf(host_gather(value), perm, split)
            del value


def _layer(array, scale, name: str, i: int, dtype, layer):
    """Layer i of the stacked `layers/<name>`: the caller's `layer(name, i)`, else as stored (an int8
    projection dequantized)."""
    value = layer(name, i) if layer is not None else None
    if value is not None:
        return value
    if scale is not None:
        return quant.dequantize(array[i], scale[i], PROJECTIONS[name].n_in, dtype, lead=0)
    return array[i]


def save_hf(model: Decoder, path, *, tokenizer=None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype=None):
    """Write config.json (+ generation_config.json when the source had one) and safetensors that
    transformers loads, in `dtype` (default: the model's parameter dtype); sharded with an index
    above `max_shard_bytes`. `tokenizer`: an HF tokenizer object or a folder whose tokenizer files
    are copied. On several processes, call it on all of them (they gather the parameters together);
    process 0 writes."""
    write_hf(model.config, nnx.to_pure_dict(nnx.split(model)[1]), path, dtype=dtype or model.param_dtype,
             tokenizer=tokenizer, max_shard_bytes=max_shard_bytes)


def write_hf(cfg, params: dict, path, *, dtype, tokenizer=None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
             layer=None):
    """`save_hf` of a pure param dict of a model of `cfg`, in `dtype`; `layer(name, i)` as in
    `_hf_tensors` computes stacked layers on the fly (the LoRA export's merge)."""
    tensors = _hf_tensors(cfg, params, jnp.dtype(dtype), layer)
    if jax.process_index() != 0:
        for _ in tensors:
            pass
        return
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(cfg, jnp.dtype(dtype).name), f, indent=2, sort_keys=True)
    if cfg.generation_config_json:
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump(json.loads(cfg.generation_config_json), f, indent=2, sort_keys=True)
    st.write_sharded(tensors, path, max_shard_bytes)
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

