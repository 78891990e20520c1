"""One Flax NNX decoder for Llama 2/3/3.x, Mistral, Qwen2, Qwen3 and Gemma 3 text, chosen by `ModelConfig`.

Layers are stored stacked (leading "layers" axis) and run with `jax.lax.scan`, so compile time does
not grow with depth. Where sliding-window and full-attention layers interleave (Gemma 3), the scan
carries each layer's kind and `lax.cond` picks the attention call with its static window. Every
parameter carries logical axis names (`out_sharding` metadata) which `bco_jax.sharding` maps to mesh
axes; the model itself never names a mesh axis.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bco_jax.models import lora, quant
from bco_jax.models.attention import attend, attention_mask
from bco_jax.models.config import ModelConfig, compute_dtype
from bco_jax.models.projections import (
    ATTN_NORM,
    ATTN_OUT_NORM,
    BLOCKS,
    DOWN_PROJ,
    GATE_PROJ,
    K_NORM,
    K_PROJ,
    MLP_NORM,
    MLP_OUT_NORM,
    O_PROJ,
    PROJECTIONS,
    Q_NORM,
    Q_PROJ,
    UP_PROJ,
    V_PROJ,
    Norm,
    Projection,
    layer_norms,
)
from bco_jax.sharding import mesh_spec

EMBED_AXES, LM_HEAD_AXES = ("vocab", "embed"), ("embed", "vocab")  # logical axes of the [V, D] and [D, V] matrices
ACTIVATIONS = {"silu": jax.nn.silu, "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True)}


def rope_inv_freq(cfg: ModelConfig, sliding: bool = False) -> np.ndarray:
    """Inverse frequencies [head_dim / 2], float32 as transformers computes them. `sliding`: of the
    sliding-window layers, which have their own default RoPE when `rope_local_theta` is set."""
    dim = cfg.head_dim
    local = sliding and cfg.rope_local_theta is not None
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    theta = cfg.rope_local_theta if local else cfg.rope_theta
    inv_freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
    if cfg.rope_type == "default" or local:
        return inv_freq
    if cfg.rope_type == "linear":
        return (inv_freq / np.float32(cfg.rope_factor)).astype(np.float32)
    if cfg.rope_type == "llama3":
        return _llama3_inv_freq(cfg, inv_freq)
    raise ValueError(f"unsupported rope_type {cfg.rope_type!r}")


def _llama3_inv_freq(cfg: ModelConfig, inv_freq: np.ndarray) -> np.ndarray:
    # Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth blend in between.
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old_len = cfg.rope_original_max_positions
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(cfg: ModelConfig, positions_BxT: jax.Array, sliding: bool = False):
    """cos, sin [B, T, head_dim] in float32, HF "rotate half" layout (frequencies repeated twice)."""
    inv_freq = jnp.asarray(rope_inv_freq(cfg, sliding))
    angles_BxTxF = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
    angles_BxTxH = jnp.concatenate([angles_BxTxF, angles_BxTxF], axis=-1)
    return jnp.cos(angles_BxTxH), jnp.sin(angles_BxTxH)


def apply_rope(x_BxTxNxH, cos_BxTxH, sin_BxTxH):
    half = x_BxTxNxH.shape[-1] // 2
    rotated = jnp.concatenate([-x_BxTxNxH[..., half:], x_BxTxNxH[..., :half]], axis=-1)
    cos, sin = cos_BxTxH[:, :, None, :], sin_BxTxH[:, :, None, :]
    out = x_BxTxNxH.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
    return out.astype(x_BxTxNxH.dtype)


def rms_norm(x_BxTxD, weight_D, eps: float, dtype, offset: float = 0.0):
    """RMSNorm over the last axis in float32, scaled by (offset + weight): Gemma stores w for 1 + w."""
    x32 = x_BxTxD.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * (offset + weight_D.astype(jnp.float32))).astype(dtype)


def _linear(x, w, b, dtype, n_in: int = 1, scale=None):
    """x[..., in] @ w[in, out] + b, with `n_in` contracted axes. Tokens are flattened into one axis: XLA
    on CPU runs the backward of 2-D matmuls ~2x faster than of [B, T, ...] dot_generals (the same
    program on GPU / TPU, where the batch sharding of the leading axis carries over). With `scale`
    [out...], `w` is int8 and dequantized to `dtype` on the fly (`_int8_matmul`)."""
    lead, k = x.shape[:x.ndim - n_in], math.prod(w.shape[:n_in])
    if scale is None:
        y = x.reshape(-1, k) @ w.reshape(k, -1).astype(dtype)
    else:
        y = _int8_matmul(x.reshape(-1, k), w, scale, dtype, n_in)
    if b is not None:
        y = y + b.reshape(-1).astype(dtype)
    return y.reshape(*lead, *w.shape[n_in:])


@functools.partial(jax.checkpoint, prevent_cse=False, static_argnums=(3, 4))
def _int8_matmul(x_MxK, q, scale, dtype, n_in: int):
    """x @ dequantize(q, scale) for one layer's int8 weight q [in..., out...] and scale [out...],
    dequantized to the compute dtype. Rematerialized: the backward pass recomputes the dequantized
    weight from q, so the scan over layers keeps no residual of it (stacked over layers, it would be
    the whole base in the compute dtype again); q is reshaped in here too, so the residual is the
    scanned slice itself, which the scan forwards instead of stacking a copy. prevent_cse=False: it
    only runs inside the scan over layers."""
    w = quant.dequantize(q, scale, n_in, dtype, lead=0)
    return x_MxK @ w.reshape(x_MxK.shape[1], -1)


def _projection(cfg: ModelConfig, dtype, p, proj: Projection, x, key):
    """Projection `proj` (with its bias), plus its LoRA update (alpha / r) * dropout(x) A B when `p`
    holds adapters for it; `key` draws the dropout (None: no dropout, as at evaluation)."""
    name, n_in = proj.name, proj.n_in
    y = _linear(x, p[name], p.get(proj.bias), dtype, n_in, p.get(name + quant.SCALE))
    a = p.get(f"{name}_lora_a")
    if a is None:
        return y
    if key is not None and cfg.lora_dropout > 0:
        index = list(PROJECTIONS).index(name)  # each projection's own dropout stream
        keep = jax.random.bernoulli(jax.random.fold_in(key, index), 1 - cfg.lora_dropout, x.shape)
        x = jnp.where(keep, x / (1 - cfg.lora_dropout), 0).astype(x.dtype)
    low_rank = _linear(_linear(x, a, None, dtype, n_in), p[f"{name}_lora_b"], None, dtype)
    return y + (cfg.lora_alpha / cfg.lora_rank) * low_rank


def _layer(cfg: ModelConfig, dtype, p, h_BxTxD, context, is_causal, cache_kv, cache_index, key=None,
           packed=False, sliding=None):
    """One decoder layer on per-layer params `p`. `context`: {sliding?: (cos, sin, mask)} for the layer
    kinds the model has; `sliding` (traced bool) picks one when it has both. With `cache_kv` the new
    keys/values are written at `cache_index` and attention runs over the whole cache. `key`: this
    layer's LoRA dropout key."""
    def norm(which: Norm, x):
        return rms_norm(x, p[which.name], cfg.rms_norm_eps, dtype, cfg.norm_weight_offset)

    if len(context) == 1:
        (kind, (cos, sin, mask)), = context.items()
    else:  # both kinds: this layer's RoPE and (cached decoding) mask, chosen elementwise
        kind = None
        cos, sin, mask = (jnp.where(sliding, a, b) for a, b in zip(context[True], context[False]))
    x = norm(ATTN_NORM, h_BxTxD)
    q_BxTxNxH = _projection(cfg, dtype, p, Q_PROJ, x, key)
    k_BxTxKxH = _projection(cfg, dtype, p, K_PROJ, x, key)
    v_BxTxKxH = _projection(cfg, dtype, p, V_PROJ, x, key)
    if cfg.qk_norm:
        q_BxTxNxH, k_BxTxKxH = norm(Q_NORM, q_BxTxNxH), norm(K_NORM, k_BxTxKxH)
    q_BxTxNxH, k_BxTxKxH = apply_rope(q_BxTxNxH, cos, sin), apply_rope(k_BxTxKxH, cos, sin)
    if cache_kv is not None:
        k_cache, v_cache = cache_kv
        start = (0, cache_index, 0, 0)
        k_BxTxKxH = jax.lax.dynamic_update_slice(k_cache, k_BxTxKxH.astype(k_cache.dtype), start)
        v_BxTxKxH = jax.lax.dynamic_update_slice(v_cache, v_BxTxKxH.astype(v_cache.dtype), start)
    qkv = (q_BxTxNxH, k_BxTxKxH.astype(dtype), v_BxTxKxH.astype(dtype), mask)

    def attention(layer_sliding: bool):
        window = cfg.sliding_window if layer_sliding else None
        return lambda q, k, v, m: attend(cfg, q, k, v, m, is_causal, packed, window)

    if kind is not None:
        attn_BxTxNxH = attention(kind)(*qkv)
    else:  # one scan over both kinds: each branch a kernel call with its own static window
        attn_BxTxNxH = jax.lax.cond(sliding, attention(True), attention(False), *qkv)
    out_BxTxD = _projection(cfg, dtype, p, O_PROJ, attn_BxTxNxH, key)
    h_BxTxD = h_BxTxD + (norm(ATTN_OUT_NORM, out_BxTxD) if cfg.sandwich_norms else out_BxTxD)
    x = norm(MLP_NORM, h_BxTxD)
    gate_BxTxF = _projection(cfg, dtype, p, GATE_PROJ, x, key)
    up_BxTxF = _projection(cfg, dtype, p, UP_PROJ, x, key)
    down_BxTxD = _projection(cfg, dtype, p, DOWN_PROJ, ACTIVATIONS[cfg.hidden_act](gate_BxTxF) * up_BxTxF, key)
    if cfg.sandwich_norms:
        down_BxTxD = norm(MLP_OUT_NORM, down_BxTxD)
    new_kv = None if cache_kv is None else (k_BxTxKxH, v_BxTxKxH)
    return h_BxTxD + down_BxTxD, new_kv


def layer_param_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """Per-layer parameter name -> (shape, logical axes), without the leading layers axis: each block's
    input norm, its projections, its other norms (those the config has, `projections.NORMS`), then
    the biases (`projections.PROJECTIONS`). The order is the order parameters are initialized in (it
    draws their random keys)."""
    shapes = {}
    for block, projections in BLOCKS:
        first, *other_norms = layer_norms(cfg, block)
        shapes.update((item.name, (item.shape(cfg), item.axes)) for item in (first, *projections, *other_norms))
    shapes.update((p.bias, (p.bias_shape(cfg), p.bias_axes)) for p in PROJECTIONS.values() if p.has_bias(cfg))
    return shapes


def decays(logical_axes: tuple[str | None, ...]) -> bool:
    """Whether weight decay applies (as transformers: not to norms and biases). Every matrix, the
    embedding and LM head included, reads or writes the hidden size, "embed", and each LoRA factor
    has a rank axis, "lora"; norm scales ("norm") and biases (the output axes of their matrix,
    "bias" for the hidden size) have neither."""
    return "embed" in logical_axes or "lora" in logical_axes


def weight_decay_mask(param_state: nnx.State) -> dict:
    """Pure-dict pytree of bools (the structure of `nnx.to_pure_dict(param_state)`): which
    parameters decay, from their logical axes (`out_sharding` metadata)."""
    flags = [(path, decays(var.get_metadata()["out_sharding"])) for path, var in nnx.to_flat_state(param_state)]
    return nnx.to_pure_dict(nnx.from_flat_state(flags))


def _param(rngs, shape, names, dtype, norm_weight_offset: float = 0.0):
    # eager_sharding=False: logical names are not mesh axes; sharding is applied by load_hf / train.
    if decays(names):
        init = nnx.initializers.normal(0.02)
    elif names[-1] == "norm" and not norm_weight_offset:  # norm scales start at 1, (1 + w) ones at w = 0
        init = nnx.initializers.ones
    else:  # zeros for biases
        init = nnx.initializers.zeros
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=False)


class Layers(nnx.Module):
    """All decoder layers, each parameter stacked on a leading "layers" axis."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype):
        shapes = layer_param_shapes(cfg)
        for name, (shape, axes) in shapes.items():
            setattr(self, name, _param(rngs, (cfg.num_layers, *shape), ("layers", *axes), param_dtype,
                                       cfg.norm_weight_offset))
        scales = ()
        if cfg.quantize_base:  # drawn in param_dtype as above, then stored int8 + scale
            scales = tuple(name + quant.SCALE for name in quant.QUANTIZED)
            for name in quant.QUANTIZED:
                (shape, axes), n_in = shapes[name], PROJECTIONS[name].n_in
                q, scale = quant.quantize(getattr(self, name)[...], n_in)
                setattr(self, name, nnx.Param(q, out_sharding=("layers", *axes), eager_sharding=False))
                scale_axes = ("layers", *quant.scale_shape(name, shape, axes)[1])
                setattr(self, name + quant.SCALE, nnx.Param(scale, out_sharding=scale_axes, eager_sharding=False))
        for name in cfg.lora_targets:  # adapters are trained in float32 whatever the base's dtype
            (a_shape, a_axes), (b_shape, b_axes) = lora.adapter_shapes(name, *shapes[name], cfg.lora_rank)
            a = lora.init_a(rngs.params(), (cfg.num_layers, *a_shape), jnp.float32)
            setattr(self, f"{name}_lora_a", nnx.Param(a, out_sharding=("layers", *a_axes), eager_sharding=False))
            b = jnp.zeros((cfg.num_layers, *b_shape), jnp.float32)
            setattr(self, f"{name}_lora_b", nnx.Param(b, out_sharding=("layers", *b_axes), eager_sharding=False))
        self.names = tuple(shapes) + scales + tuple(f"{t}_lora_{ab}" for t in cfg.lora_targets for ab in "ab")

    def arrays(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in self.names}


class Decoder(nnx.Module):
    """`model(input_ids, attention_mask=None) -> logits` [B, T, V] float32. `dtype`: compute dtype
    (default `compute_dtype()`); `param_dtype`: storage dtype of the parameters."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        self.config = config
        self.dtype = compute_dtype() if dtype is None else jnp.dtype(dtype)
        self.param_dtype = jnp.dtype(param_dtype)
        V, D = config.vocab_size, config.hidden_size
        self.embed = _param(rngs, (V, D), EMBED_AXES, param_dtype)
        self.layers = Layers(config, rngs=rngs, param_dtype=param_dtype)
        self.final_norm = _param(rngs, (D,), ("norm",), param_dtype, config.norm_weight_offset)
        if not config.tie_word_embeddings:
            self.lm_head = _param(rngs, (D, V), LM_HEAD_AXES, param_dtype)

    def __call__(self, input_ids, attention_mask=None):
        return self.logits(self.hidden_states(input_ids, attention_mask))

    def hidden_states(self, input_ids, attention_mask=None, segment_ids=None, positions=None, *, dropout_rng=None):
        """Final hidden states [B, T, D] (final norm applied, no LM head), compute dtype.
        `segment_ids` [B, T] int32 (sequence packing): 0 on padding, 1, 2, ... for the examples of a
        row, each a contiguous run; attention never crosses a segment. `positions` [B, T]: rotary
        positions (default: counted from 0 per segment, or over the real tokens of an unpacked row).
        `dropout_rng`: draws LoRA dropout (training); None: none."""
        input_ids_BxT = input_ids
        mask_BxT = jnp.ones_like(input_ids_BxT) if attention_mask is None else attention_mask
        packed = segment_ids is not None
        segment_BxT = segment_ids if packed else mask_BxT  # a padding mask is one segment per row
        if positions is not None:
            positions_BxT = positions
        else:
            positions_BxT = positions_from_segments(segment_BxT) if packed else positions_from_mask(mask_BxT)
        h_BxTxD, _ = self.forward(input_ids_BxT, positions_BxT, segment_BxT, jnp.arange(input_ids_BxT.shape[1]),
                                  dropout_rng=dropout_rng, packed=packed)
        return h_BxTxD

    def lm_head_weight(self):
        """[D, V] in the parameter dtype (the transposed embedding when tied), uncast: callers cast
        it where they use it, so its gradient accumulates in the parameter dtype. Pinned (under
        `jax.set_mesh`) to the parameter's own sharding, so its gradient arrives sharded alike."""
        w_DxV = self.embed[...].T if self.config.tie_word_embeddings else self.lm_head[...]
        return constrain(w_DxV, LM_HEAD_AXES)

    def logits(self, h_BxTxD):
        """LM head with float32 accumulation and output (soft-capped where the config says)."""
        logits = jnp.einsum("btd,dv->btv", h_BxTxD.astype(self.dtype), self.lm_head_weight().astype(self.dtype),
                            preferred_element_type=jnp.float32)
        return softcap(logits, self.config.final_logit_softcapping)

    def forward(self, input_ids_BxT, positions_BxT, kv_valid_BxS, q_index_T, cache=None, cache_index=0,
                dropout_rng=None, packed=False):
        """Core pass. Without `cache`, S == T and `kv_valid_BxS` may hold segment ids (`packed`:
        several per row). With `cache` = (k_LxBxSxKxH, v_LxBxSxKxH) the new keys/values go to
        `cache_index` and the updated cache is returned."""
        cfg, dtype = self.config, self.dtype
        # mode="clip": padding may use an id >= vocab_size (an added [PAD]); it is masked, but must not be NaN.
        # Under FSDP, XLA looks the tokens up in each device's [V, D / fsdp] slice of the table (no
        # device gathers the table; tests/test_head_sharding.py), then moves compute-dtype rows.
        h_BxTxD = jnp.take(constrain(self.embed[...], EMBED_AXES), input_ids_BxT, axis=0, mode="clip")
        if cfg.scale_embeddings:  # in the parameter dtype, as transformers scales them
            h_BxTxD = h_BxTxD * jnp.asarray(math.sqrt(cfg.hidden_size), h_BxTxD.dtype)
        h_BxTxD = constrain_batch(h_BxTxD.astype(dtype))
        sliding_L = cfg.sliding_layers()
        context = {}  # per layer kind: RoPE, and the mask (segment ids for self-attention: the kernel windows)
        for sliding in sorted(set(sliding_L)):
            cos, sin = rope_cos_sin(cfg, positions_BxT, sliding)
            if cache is None:  # queries and keys are the same sequence: the padding mask suffices
                context[sliding] = (cos, sin, kv_valid_BxS)
            else:
                window = cfg.sliding_window if sliding else None
                context[sliding] = (cos, sin, attention_mask(kv_valid_BxS, q_index_T, window))

        def body(h, xs):
            p, kv, key, sliding = xs
            h, kv = _layer(cfg, dtype, p, h, context, cache is None, kv, cache_index, key, packed, sliding)
            return constrain_batch(h), kv

        body = _remat(body, cfg.remat)
        keys = None if dropout_rng is None else jax.random.split(dropout_rng, cfg.num_layers)
        kinds = jnp.asarray(sliding_L) if len(context) > 1 else None
        h_BxTxD, new_cache = jax.lax.scan(body, h_BxTxD, (self.layers.arrays(), cache, keys, kinds))
        return rms_norm(h_BxTxD, self.final_norm[...], cfg.rms_norm_eps, dtype, cfg.norm_weight_offset), new_cache


def softcap(logits, cap: float | None):
    """cap * tanh(logits / cap) (Gemma's final logit soft-capping); unchanged when `cap` is None."""
    return logits if cap is None else cap * jnp.tanh(logits / cap)


def constrain_batch(x_Bx):
    """Under `jax.set_mesh(mesh)`, pin the batch axis of activations to the mesh axes that the
    "batch" rule names, so XLA gathers FSDP-sharded weights rather than resharding activations.
    No-op without a mesh context, or when the batch does not divide."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x_Bx
    spec = mesh_spec(("batch",) + (None,) * (x_Bx.ndim - 1), mesh, shape=x_Bx.shape)
    return jax.lax.with_sharding_constraint(x_Bx, spec) if spec[0] else x_Bx


def constrain(x, logical_axes, rules=None):
    """Under `jax.set_mesh(mesh)`, pin `x` to the mesh layout of its logical axes (`LOGICAL_RULES`,
    or `rules`; mesh axes that do not divide a dimension are dropped). No-op without a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, mesh_spec(logical_axes, mesh, rules, shape=x.shape))


def batch_shards(batch_size: int) -> int:
    """How many ways `constrain_batch` splits a batch of `batch_size` (1 without a mesh context)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    axes = mesh_spec(("batch",), mesh, shape=(batch_size,))[0] or ()
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def _remat(fn, policy: str):
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn, prevent_cse=False)
    # Keep matmul outputs, recompute the cheap elementwise work (norms, rope, silu).
    return jax.checkpoint(fn, prevent_cse=False,
                          policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)


def positions_from_mask(attention_mask_BxT):
    """Positions count real tokens from 0, so left and right padding give the same positions."""
    return jnp.maximum(jnp.cumsum(attention_mask_BxT.astype(jnp.int32), axis=1) - 1, 0)


def positions_from_segments(segment_ids_BxT):
    """Positions counted from 0 at the start of every segment (a packed row's examples)."""
    T = segment_ids_BxT.shape[1]
    index_T = jnp.arange(T, dtype=jnp.int32)
    starts_BxT = jnp.concatenate([jnp.ones_like(segment_ids_BxT[:, :1], bool),
                                  segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1)
    return index_T - jax.lax.cummax(jnp.where(starts_BxT, index_T, 0), axis=1)
