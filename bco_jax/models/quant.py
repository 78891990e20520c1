"""Int8 weight-only quantization of the frozen base under LoRA (QLoRA-style; TRL's `load_in_8bit`).

Each projection the table marks `quantize` (`projections.PROJECTIONS`: all seven; stacked over
layers, e.g. the q projection [L, D, N, H]) is stored as int8 values Q with one float32 scale per
output channel and layer:
    scale[l, out...] = max |W[l, :, out...]| / 127     (absmax over the input axes)
    Q = round(W / scale) in [-127, 127],     W ~ Q * scale,     |W - Q * scale| <= scale / 2.
The scale leaf is `<proj>_scale` [L, out...] beside the weight, with the weight's logical axes minus
its input axes, so `sharding.LOGICAL_RULES` shard it like the weight's output channels.

The decoder (`ModelConfig.quantize_base`) declares the projections int8 and dequantizes one layer's
weight at a time inside the layer scan, in the compute dtype (`decoder._int8_matmul`). LoRA adapters
stay float32 and apply on top. Kept unquantized: the embedding and the LM head (quality-sensitive:
every logit goes through them; int8 on the vocabulary projection is what LLM.int8 / bitsandbytes
skip too), norm scales and biases (tiny: O(D) per layer).

Why float32 scales: they cost 4 bytes per output channel per layer, i.e. 4 / fan_in bytes per weight
(0.001 B at D = 4096), and keep the dequantized weight a single rounding from Q * scale; a bfloat16
scale would add a systematic per-channel error of up to 2^-9, the size of the int8 step itself.

Trees are pure param dicts (`nnx.to_pure_dict(state)`, the form `lora.split_adapters` and the build
use): {"embed": ..., "layers": {<projection>: ..., ...}, ...}.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from bco_jax.models.projections import PROJECTIONS, sizes

QUANTIZED = tuple(name for name, p in PROJECTIONS.items() if p.quantize)  # stored int8 + scale in an int8 base
SCALE = "_scale"  # suffix of a quantized projection's scale leaf
QMAX = 127  # symmetric: -128 is never used, so negation is exact


def scale_shape(name: str, layer_shape: tuple[int, ...], axes: tuple[str, ...]):
    """(shape, logical axes) of projection `name`'s per-layer scale: its weight's output axes."""
    n_in = PROJECTIONS[name].n_in
    return tuple(layer_shape[n_in:]), tuple(axes[n_in:])


def quantize(w, n_in: int, lead: int = 1):
    """w [lead..., in..., out...] (`n_in` input axes after `lead` leading axes) -> (int8 Q of w's
    shape, float32 scale [lead..., out...]): per output channel absmax / 127, Q = round(w / scale).
    An all-zero channel gets scale 0 and Q 0."""
    w32 = jnp.asarray(w).astype(jnp.float32)
    reduce = tuple(range(lead, lead + n_in))
    scale = jnp.max(jnp.abs(w32), axis=reduce) / QMAX
    safe = jnp.expand_dims(jnp.where(scale > 0, scale, 1.0), reduce)
    q = jnp.clip(jnp.round(w32 / safe), -QMAX, QMAX).astype(jnp.int8)
    return q, scale


def dequantize(q, scale, n_in: int, dtype=jnp.float32, lead: int = 1):
    """Q * scale in float32, then cast to `dtype` (one rounding): the weight the quantized model uses."""
    expanded = jnp.expand_dims(jnp.asarray(scale, jnp.float32), tuple(range(lead, lead + n_in)))
    return (jnp.asarray(q).astype(jnp.float32) * expanded).astype(dtype)


_quantize_jit = jax.jit(quantize, static_argnums=(1, 2))
_dequantize_jit = jax.jit(dequantize, static_argnums=(2, 3, 4))


def is_quantized(params: dict) -> bool:
    """Whether a pure param dict holds an int8 base (any `layers/<proj>_scale` leaf)."""
    return any(key.endswith(SCALE) for key in params.get("layers", {}))


def quantize_base(params: dict, targets=QUANTIZED) -> dict:
    """A pure param dict of a float base (stacked layers) -> the same dict with each projection of
    `targets` replaced by its int8 values plus a `<proj>_scale` leaf: the tree of a `Decoder` built
    with `quantize_base=True`. Everything else (embedding, LM head, norms, biases, LoRA adapters) is
    returned as is. One projection is quantized at a time, under jit: on a mesh, Q keeps the weight's
    sharding and the scale that of its output axes. The input tree is not freed (the caller holds
    it); to load a large base without its full-precision copy use `load_hf(..., quantize_base=True)`."""
    if is_quantized(params):
        raise ValueError("the tree is already quantized")
    layers = dict(params["layers"])
    for name in targets:
        layers[name], layers[name + SCALE] = _quantize_jit(layers[name], PROJECTIONS[name].n_in, 1)
    return {**params, "layers": layers}


def dequantize_base(params: dict, dtype=None) -> dict:
    """The inverse of `quantize_base` up to rounding: a plain float tree (for a `Decoder` built
    without `quantize_base`), each projection Q * scale in `dtype` (default: the embedding's dtype,
    i.e. the dtype the base was loaded in)."""
    dtype = jnp.dtype(dtype or params["embed"].dtype)
    layers = {k: v for k, v in params["layers"].items() if not k.endswith(SCALE)}
    for key in params["layers"]:
        if key.endswith(SCALE):
            name = key[:-len(SCALE)]
            layers[name] = _dequantize_jit(layers[name], params["layers"][key], PROJECTIONS[name].n_in, dtype, 1)
    return {**params, "layers": layers}


def projection_bytes(cfg, dtype=jnp.bfloat16, quantized: bool = True) -> int:
    """Bytes of the quantized projections of `cfg` (a ModelConfig) over all layers: int8 + float32
    scales when `quantized`, else in `dtype`. For plans and reports; the model's own abstract
    state (`nnx.eval_shape`) gives the same numbers."""
    total = 0
    for name in QUANTIZED:
        p = PROJECTIONS[name]
        n = math.prod(p.shape(cfg))
        if quantized:
            total += n + 4 * math.prod(sizes(cfg, p.outputs))
        else:
            total += n * jnp.dtype(dtype).itemsize
    return total * cfg.num_layers
