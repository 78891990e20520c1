"""Attention, one entry point `attend`, with the kernel chosen by `ModelConfig.attn_implementation`.

Two masking forms, as in transformers: self-attention over one sequence takes the 2-D segment ids
[B, S] and `is_causal=True` (causality and Mistral's window are then known to the kernel, which skips
masked blocks); cached decoding takes a full boolean mask [B, 1, T, S] and `is_causal=False`, and
always runs on XLA. Segment ids: 0 is padding, 1, 2, ... are the examples packed in a row (sequence
packing), a token attends only to earlier tokens of its own segment; a padding mask is the
one-segment case.

Kernels for `is_causal=True`:
- "xla": plain XLA, in query blocks that each read only the keys they can see (any backend).
- "cudnn" (GPU): cuDNN flash attention, padding given as sequence lengths, so rows must be
  right-padded (real tokens, then padding), the training layout. It takes no segment ids: packed
  rows run on "xla" under "auto", and an explicit "cudnn" refuses them.
- "splash" (TPU): Pallas splash attention, padding given as segment ids (any padding side).
- "auto": cudnn on GPU (bfloat16 / float16), splash on TPU, xla otherwise.
Kernels are registered in `CAUSAL_KERNELS` by name. One more is registered for the memory planner
only, not offered to users: "score_free", a stand-in with a fused kernel's inputs, outputs and
gradients but no [T, S] scores, whose values mean nothing (`bco_jax.plan` compiles with it to count
what cudnn / splash hold on the target).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from bco_jax.sharding import mesh_spec

ATTN_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")  # the user's choices (--attn_implementation)
CAUSAL_KERNELS = {}  # name -> kernel(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_BxT, window, scale), see `_kernel`
XLA_QUERY_BLOCK = 128
SPLASH_BLOCK = 128


def resolve(attn_implementation: str, dtype, packed: bool = False) -> str:
    """The kernel "auto" stands for on the default backend, for inputs of `dtype`; `packed`: rows
    hold several segments (cuDNN's sequence lengths cannot say where they end)."""
    if attn_implementation != "auto":
        if packed and attn_implementation == "cudnn":
            raise ValueError("attn_implementation=cudnn takes no segment ids: packed rows need xla or splash")
        return attn_implementation
    backend = jax.default_backend()
    if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and not packed:
        return "cudnn"
    return "splash" if backend == "tpu" else "xla"


def attention_mask(kv_segment_BxS, q_index_T, window: int | None, q_segment_BxT=None):
    """[B, 1, T, S] bool: causal by index, padding keys (segment 0) hidden, Mistral window
    `q - k < window` (transformers 5 masking_utils.sliding_window_overlay). Indices, not positions:
    padding is contiguous at one end and a segment is contiguous, so index distances between tokens
    that may see each other equal position distances. With `q_segment_BxT` (the queries' segment
    ids) a query sees only keys of its own segment; without, every real key (cached decoding). A
    padding query would see no key at all; it sees itself instead (its output is never used)."""
    q_TxS, k_TxS = q_index_T[:, None], jnp.arange(kv_segment_BxS.shape[1])[None, :]
    allowed_TxS = k_TxS <= q_TxS
    if window is not None:
        allowed_TxS &= k_TxS > q_TxS - window
    visible_BxTxS = jnp.broadcast_to(kv_segment_BxS[:, None, :] > 0, (kv_segment_BxS.shape[0], *allowed_TxS.shape))
    if q_segment_BxT is not None:
        visible_BxTxS &= kv_segment_BxS[:, None, :] == q_segment_BxT[:, :, None]
    return (allowed_TxS[None] & (visible_BxTxS | (k_TxS == q_TxS)[None]))[:, None]


def attend(cfg, q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask, is_causal: bool, packed: bool = False,
           window: int | None = None):
    """Attention output [B, T, N, H], scores scaled by `cfg.attention_scale`. `is_causal=True`: `mask`
    is the segment ids [B, S] of a sequence attending to itself (S == T; a padding mask when `packed`
    is False) and `window` the layer's sliding window (static). `is_causal=False`: `mask` is
    [B, 1, T, S] bool, complete."""
    scale = cfg.attention_scale
    if not is_causal:
        return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask, scale=scale,
                                            implementation="xla")
    implementation = resolve(cfg.attn_implementation, q_BxTxNxH.dtype, packed)
    return CAUSAL_KERNELS[implementation](q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask, window, scale)


def _kernel(name: str):
    """Register a causal self-attention kernel under `name` (a `ModelConfig.attn_implementation`)."""
    def register(fn):
        CAUSAL_KERNELS[name] = fn
        return fn
    return register


@_kernel("xla")
def xla_causal(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_BxT, window: int | None, scale: float,
               block: int = XLA_QUERY_BLOCK):
    """Causal self-attention in blocks of queries, each against the keys it can see: about half the
    work of one [T, T] score matrix, which XLA cannot skip (2x faster on CPU, forward and backward).
    Grouped-query heads read their shared key/value head, never a repeated copy. `segment_BxT`:
    segment ids (a padding mask is one segment); a query sees keys of its own segment only."""
    B, T, N, H = q_BxTxNxH.shape
    K = k_BxTxKxH.shape[2]
    q_BxKxGxTxH = q_BxTxNxH.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)
    k_BxKxTxH, v_BxKxTxH = k_BxTxKxH.transpose(0, 2, 1, 3), v_BxTxKxH.transpose(0, 2, 1, 3)
    outs = []
    for start in range(0, T, block):
        stop = min(T, start + block)
        lo = 0 if window is None else max(0, start - window + 1)  # keys before lo are out of every window
        # indices relative to lo: causality, window and padding as for one [Q, S] block of the matrix
        allowed_BxQxS = attention_mask(segment_BxT[:, lo:stop], jnp.arange(start - lo, stop - lo), window,
                                       segment_BxT[:, start:stop])[:, 0]
        scores_BxKxGxQxS = jnp.einsum("bkgqh,bksh->bkgqs", q_BxKxGxTxH[:, :, :, start:stop], k_BxKxTxH[:, :, lo:stop],
                                      preferred_element_type=jnp.float32) * scale
        scores_BxKxGxQxS = jnp.where(allowed_BxQxS[:, None, None], scores_BxKxGxQxS, -1e30)
        probs_BxKxGxQxS = jax.nn.softmax(scores_BxKxGxQxS, axis=-1).astype(v_BxKxTxH.dtype)
        outs.append(jnp.einsum("bkgqs,bksh->bkgqh", probs_BxKxGxQxS, v_BxKxTxH[:, :, lo:stop]))
    return jnp.concatenate(outs, axis=3).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def cudnn_lengths(segment_BxT):
    """(lengths_B int32, real_BxT bool) of right-padded rows for cuDNN. `real_BxT`: index < the row's
    true length (its count of non-padding tokens). `lengths_B`: that length clamped to >= 1, as an
    all-padding row's 0 may be refused, or answered with NaN (its one "real" row is masked anyway)."""
    true_B = jnp.sum(segment_BxT > 0, axis=1, dtype=jnp.int32)
    real_BxT = jnp.arange(segment_BxT.shape[1], dtype=jnp.int32)[None, :] < true_B[:, None]
    return jnp.maximum(true_B, 1), real_BxT


def zero_padding(x_BxTx, real_BxT):
    """`x_BxTx` [B, T, ...] with its positions past each row's length set to 0, by select: a NaN or
    inf there cannot leak (0 * NaN is NaN), and the gradient there is 0."""
    real = real_BxT.reshape(*real_BxT.shape, *(1,) * (x_BxTx.ndim - 2))
    return jnp.where(real, x_BxTx, jnp.zeros((), x_BxTx.dtype))


@_kernel("cudnn")
def cudnn_causal(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, valid_BxT, window: int | None, scale: float):
    """cuDNN flash attention. Right-padded rows: the first `sum(valid > 0)` tokens are real. cuDNN
    learns of padding only through the lengths and promises nothing past them, so what it writes
    there is dropped both ways: padded output rows are zeroed (forward), and so are the inputs'
    padded positions, whose select then zeroes any gradient cuDNN leaves there (backward). Real rows
    never read padded keys, so neither changes them."""
    lengths_B, real_BxT = cudnn_lengths(valid_BxT)
    q_BxTxNxH, k_BxTxKxH, v_BxTxKxH = (zero_padding(x, real_BxT) for x in (q_BxTxNxH, k_BxTxKxH, v_BxTxKxH))
    q_BxTxNxH, k_BxTxKxH, v_BxTxKxH = heads_alike(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH)
    out_BxTxNxH = jax.nn.dot_product_attention(
        q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, scale=scale, is_causal=True, query_seq_lengths=lengths_B,
        key_value_seq_lengths=lengths_B, local_window_size=None if window is None else (window - 1, 0),
        implementation="cudnn")
    return zero_padding(out_BxTxNxH, real_BxT)


def heads_alike(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH):
    """q, k and v with their heads sharded alike under the ambient mesh: cuDNN's custom partitioning
    needs them equal, and when `tensor` divides the query heads but not the key/value heads (tensor >
    K) the rules would shard q's heads and replicate k's. Then every head is replicated (rows stay split)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return q_BxTxNxH, k_BxTxKxH, v_BxTxKxH
    B, N, K = q_BxTxNxH.shape[0], q_BxTxNxH.shape[2], k_BxTxKxH.shape[2]
    batch, q_heads = mesh_spec(("batch", "q_heads"), mesh, shape=(B, N))
    if q_heads == mesh_spec(("batch", "kv_heads"), mesh, shape=(B, K))[1]:
        return q_BxTxNxH, k_BxTxKxH, v_BxTxKxH
    spec = jax.sharding.PartitionSpec(batch)
    return tuple(jax.lax.with_sharding_constraint(x, spec) for x in (q_BxTxNxH, k_BxTxKxH, v_BxTxKxH))


def splash_block_sizes(T: int):
    """Splash tiles for T tokens, which splash_causal pads to P, a multiple of SPLASH_BLOCK (the kernel
    wants blocks of whole 128-lane tiles, so none below 128): every block, forward and backward, the
    largest of 512, 256, 128 that divides P (fewer grid steps, no more padding than 128-blocks)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    P = -(-T // SPLASH_BLOCK) * SPLASH_BLOCK
    b = next(size for size in (512, 256, SPLASH_BLOCK) if P % size == 0)
    return sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                         block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)


@_kernel("splash")
def splash_causal(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_BxT, window: int | None, scale: float):
    """Pallas splash attention: compiled on TPU, interpreted elsewhere (slow; for tests). `segment_BxT`
    are segment ids: padding is segment 0, the real tokens of a row segment 1 (or 1, 2, ... when
    packed), so no segment attends to another. Under `jax.set_mesh`, one kernel per batch shard and
    per shard of the heads (on the q_heads / kv_heads mesh axis when it divides both N and K; else
    every shard runs every head). Heads split contiguously keep grouped-query groups whole: a shard's
    query heads j use its key/value heads j // (N // K), as unsharded."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    B, T, N, H = q_BxTxNxH.shape
    K = k_BxTxKxH.shape[2]
    P = -(-T // SPLASH_BLOCK) * SPLASH_BLOCK  # the blocks (multiples of 128) must tile the sequence
    head_mask = sa.CausalMask((P, P)) if window is None else sa.LocalMask((P, P), (window - 1, 0), 0)
    # One MQA kernel per key/value head, for its N // K query heads: the same on every head shard.
    kernel = sa.make_splash_mqa_single_device(sa.MultiHeadMask([head_mask] * (N // K)),
                                              block_sizes=splash_block_sizes(T),
                                              interpret=jax.default_backend() != "tpu")

    def run(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_BxT):  # one shard's rows and heads (b, n, kv)
        b, _, n, _ = q_BxTxNxH.shape
        kv = k_BxTxKxH.shape[2]
        pad = ((0, 0), (0, P - T), (0, 0), (0, 0))
        # A Python float scales without promoting bfloat16 (a NumPy scalar would make it float32).
        q_BxPxNxH = jnp.pad(q_BxTxNxH * float(scale), pad)
        q_BxKxGxPxH = q_BxPxNxH.reshape(b, P, kv, n // kv, H).transpose(0, 2, 3, 1, 4)
        k_BxKxPxH = jnp.pad(k_BxTxKxH, pad).transpose(0, 2, 1, 3)
        v_BxKxPxH = jnp.pad(v_BxTxKxH, pad).transpose(0, 2, 1, 3)
        segment_BxP = jnp.pad(segment_BxT.astype(jnp.int32), ((0, 0), (0, P - T)))
        per_kv_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))  # one MQA kernel per key/value head
        out = jax.vmap(per_kv_head)(q_BxKxGxPxH, k_BxKxPxH, v_BxKxPxH, sa.SegmentIds(q=segment_BxP, kv=segment_BxP))
        return out.transpose(0, 3, 1, 2, 4)[:, :T].reshape(b, T, n, H).astype(q_BxTxNxH.dtype)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return run(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_BxT)
    batch, heads = mesh_spec(("batch", "q_heads"), mesh, shape=(B, N))
    if heads != mesh_spec(("batch", "kv_heads"), mesh, shape=(B, K))[1]:
        heads = None  # e.g. tensor > K: every shard runs every head (correct, t times the work)
    if batch is None and heads is None:
        return run(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_BxT)
    # A Pallas call is not partitioned by XLA: shard it by hand. Segment ids: by rows only.
    spec, rows = jax.sharding.PartitionSpec(batch, None, heads), jax.sharding.PartitionSpec(batch)
    return jax.shard_map(run, in_specs=(spec, spec, spec, rows), out_specs=spec, check_vma=False)(
        q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_BxT)


@_kernel("score_free")
def score_free_causal(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_BxT, window: int | None, scale: float):
    """Planning only: a stand-in for a fused kernel with the same inputs, output and gradients in
    O(B T N H) memory, no [T, S] scores. Its values mean nothing; only its memory is planned."""
    groups = q_BxTxNxH.shape[2] // k_BxTxKxH.shape[2]
    k_BxTxNxH, v_BxTxNxH = (jnp.repeat(x, groups, axis=2) for x in (k_BxTxKxH, v_BxTxKxH))
    gate_BxTxNx1 = jax.nn.sigmoid(jnp.sum(q_BxTxNxH * k_BxTxNxH, axis=-1, keepdims=True, dtype=jnp.float32))
    return (gate_BxTxNx1 * v_BxTxNxH).astype(q_BxTxNxH.dtype)
