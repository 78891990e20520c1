"""Log-probabilities of the scored (completion) tokens, the quantity every loss consumes.

Only positions that predict a scored token need the LM head. With `completion_capacity=C`, each row's
predicting positions are gathered into [B, C] slots (per row: the batch axis keeps its sharding), so
the head costs C / T of the full one (about half for BCO's prompt + completion rows).

The head runs over chunks of the slots inside a rematerialised scan, so only [B, chunk, V] float32
logits exist at once, in the forward and in the backward pass (one chunk is not rematerialised: it
costs the same memory without the recomputed matmul). Vocabularies are 128k-152k: full
[B, T, V] float32 logits of a 16 x 4k batch would be ~32 GB; one 512-token chunk is ~250 MB. Chunks
cut the slot axis, never the batch axis, so every data-parallel device works on every chunk.

Under FSDP the head is vocabulary-parallel (`vocab_parallel_rules`): the weight moves once from its
hidden-size shards to vocabulary shards, each chunk gathers the (compute-dtype) hidden states of
the rows instead, and each device computes every row's logits over its slice of the vocabulary.
No device holds the whole [D, V] weight or its gradient (8B: 2 GiB each in float32), and the
gradient needs no reduction across devices.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from bco_jax.models.decoder import LM_HEAD_AXES, batch_shards, constrain, constrain_batch, softcap
from bco_jax.sharding import LOGICAL_RULES, mesh_spec

DEFAULT_CHUNK_TOKENS = 512


def sequence_logps(model, input_ids, attention_mask, loss_mask, *, completion_capacity: int | None = None,
                   chunk_tokens: int = DEFAULT_CHUNK_TOKENS, dropout_rng=None):
    """(logps_B float32, counts_B int32): sum of log p(input_ids[b, t] | tokens < t) over positions
    with loss_mask[b, t] = 1 (the completion; each predicted from position t - 1), and their count.
    A loss-mask bit on position 0 or on a padding token is ignored. See `token_logps` for
    `completion_capacity` and `chunk_tokens`; `dropout_rng` draws LoRA dropout (training only)."""
    logps_BxC, weights_BxC, _ = token_logps(model, input_ids, attention_mask, loss_mask, completion_capacity,
                                            chunk_tokens=chunk_tokens, dropout_rng=dropout_rng)
    return jnp.sum(logps_BxC, axis=1), jnp.sum(weights_BxC, axis=1).astype(jnp.int32)


def example_logps(model, input_ids, attention_mask, loss_mask, segment_ids, positions, row_first_example,
                  num_examples: int, *, completion_capacity: int | None = None,
                  chunk_tokens: int = DEFAULT_CHUNK_TOKENS, dropout_rng=None):
    """(logps_E float32, counts_E int32) of the examples packed in the rows (sequence packing):
    segment s >= 1 of row r is example `row_first_example[r] + s - 1` of E = `num_examples` (static);
    each example's per-token log-probs (`token_logps`) are summed through their token index."""
    logps_BxC, weights_BxC, index_BxC = token_logps(
        model, input_ids, attention_mask, loss_mask, completion_capacity, segment_ids=segment_ids,
        positions=positions, chunk_tokens=chunk_tokens, dropout_rng=dropout_rng)
    segment_BxC = jnp.take_along_axis(segment_ids, index_BxC, axis=1)
    # Unused slots go to example E, which segment_sum drops.
    example_BxC = jnp.where(weights_BxC > 0, row_first_example[:, None] + segment_BxC - 1, num_examples)
    logps_E = jax.ops.segment_sum(logps_BxC.reshape(-1), example_BxC.reshape(-1), num_segments=num_examples)
    counts_E = jax.ops.segment_sum(weights_BxC.reshape(-1), example_BxC.reshape(-1), num_segments=num_examples)
    return logps_E, counts_E.astype(jnp.int32)


def token_logps(model, input_ids, attention_mask, loss_mask, completion_capacity: int | None = None, *,
                segment_ids=None, positions=None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, dropout_rng=None):
    """Per-token log-probs of the scored tokens, in C slots per row, in sequence order.

    Returns (logps_BxC float32, weights_BxC float32, token_index_BxC int32): slot c of row b holds
    log p(input_ids[b, i] | tokens < i) for i = token_index[b, c], weighted by loss_mask & attention_mask
    at i; unused slots have weight 0 and log-prob 0. `completion_capacity=None`: C = T - 1, every
    token from index 1. Else C must be a static int >= the largest number of scored tokens in a row
    (rows with more lose their last ones). `chunk_tokens` bounds the logits held at once per device.
    `segment_ids`, `positions`: packed rows (see `Decoder.hidden_states`); the first token of a
    segment is never scored (nothing of its example precedes it), as position 0 of a row."""
    B, T = input_ids.shape
    # Position t predicts token t + 1.
    weights_BxP = (loss_mask[:, 1:] * attention_mask[:, 1:]).astype(jnp.float32)
    if segment_ids is not None:
        weights_BxP = weights_BxP * (segment_ids[:, 1:] == segment_ids[:, :-1])
    if completion_capacity is None:
        positions_BxC = jnp.broadcast_to(jnp.arange(T - 1), (B, T - 1))
    else:  # scored positions first, in order; a stable sort keeps the batch axis where it is
        positions_BxC = jnp.argsort(weights_BxP == 0, axis=1, stable=True)[:, :completion_capacity]
    positions_BxC = positions_BxC.astype(jnp.int32)
    h_BxTxD = model.hidden_states(input_ids, attention_mask, segment_ids, positions, dropout_rng=dropout_rng)
    h_BxCxD = jnp.take_along_axis(h_BxTxD, positions_BxC[..., None], axis=1)
    targets_BxC = jnp.take_along_axis(input_ids, positions_BxC + 1, axis=1)
    weights_BxC = jnp.take_along_axis(weights_BxP, positions_BxC, axis=1)
    chunk = chunk_slots(B, positions_BxC.shape[1], chunk_tokens)
    # The weight enters the scan in its parameter dtype and each chunk casts its own (sharded) copy:
    # its gradient is then summed over chunks in float32 (a bfloat16 sum loses precision with every chunk).
    logps_BxC = _chunked_logps(h_BxCxD, targets_BxC, weights_BxC, model.lm_head_weight(), chunk, model.dtype,
                               model.config.final_logit_softcapping)
    return logps_BxC, weights_BxC, positions_BxC + 1


def chunk_slots(batch_size: int, slots: int, chunk_tokens: int) -> int:
    """Slots per chunk so that one chunk holds about `chunk_tokens` tokens on each device (the batch
    split as `constrain_batch` splits it under `jax.set_mesh`): as many logits per device when the
    head is vocabulary-parallel (fsdp times the rows, over 1 / fsdp of the vocabulary)."""
    return max(1, min(slots, chunk_tokens * batch_shards(batch_size) // batch_size))


def vocab_parallel_rules(vocab_size: int):
    """The LM head's logical rules under the current mesh: `LOGICAL_RULES` with the hidden size's mesh
    axes (fsdp, the "embed" rule) moved off "embed" and "batch" onto "vocab". A device then holds the
    [D, V / fsdp] slice of the weight and every row (of its data shard) of the logits over that
    slice, so its slice of the weight's gradient is complete: no [D, V] partial sum to reduce. None
    (XLA's layout) without a mesh, when those axes have size 1, or when they do not divide V."""
    mesh, table = jax.sharding.get_abstract_mesh(), dict(LOGICAL_RULES)

    def axes(name):
        return (table[name],) if isinstance(table[name], str) else tuple(table[name] or ())

    fsdp = () if mesh.empty else tuple(a for a in axes("embed") if mesh.shape[a] > 1)
    if not fsdp:
        return None
    table.update(batch=tuple(a for a in axes("batch") if a not in fsdp), vocab=axes("vocab") + fsdp, embed=None)
    kept = mesh_spec(("vocab",), mesh, tuple(table.items()), shape=(vocab_size,))[0] or ()
    return tuple(table.items()) if set(fsdp) <= set((kept,) if isinstance(kept, str) else kept) else None


def _chunked_logps(h_BxCxD, targets_BxC, weights_BxC, w_DxV, chunk: int, dtype, cap: float | None = None):
    B, C, _ = h_BxCxD.shape
    n_chunks = -(-C // chunk)
    pad = n_chunks * chunk - C
    rules = vocab_parallel_rules(w_DxV.shape[1])

    def place(x, axes):  # the vocabulary-parallel layout; XLA's own where there is none
        return x if rules is None else constrain(x, axes, rules)

    # Resharded once, in the parameter dtype: an all-to-all of each device's shard, never a gather.
    w_DxV = place(w_DxV, LM_HEAD_AXES)

    def split(x_BxCx):  # [B, K*c, ...] -> [K, B, c, ...]: scan walks the slots, each step the whole batch
        x_BxCx = jnp.pad(x_BxCx, ((0, 0), (0, pad)) + ((0, 0),) * (x_BxCx.ndim - 2))
        return jnp.moveaxis(x_BxCx.reshape(B, n_chunks, chunk, *x_BxCx.shape[2:]), 1, 0)

    def chunk_logps(_, xs):
        h_BxcxD, targets_Bxc, weights_Bxc = xs
        # Selects, not products (0 * NaN is NaN): what a fused attention kernel may leave at padding
        # (an unscored slot) reaches neither the logits, nor the sum, nor the LM head's gradient.
        scored_Bxc = weights_Bxc != 0
        # Vocabulary-parallel: every row of the data shard comes to each device (compute-dtype bytes).
        h_BxcxD = place(jnp.where(scored_Bxc[..., None], h_BxcxD, jnp.zeros((), h_BxcxD.dtype)), ("batch", None, None))
        # One 2-D matmul over the chunk's tokens: its backward runs ~1.5x faster on CPU than a 3-D one's.
        logits_NxV = softcap(jnp.matmul(h_BxcxD.reshape(B * chunk, -1).astype(dtype), w_DxV.astype(dtype),
                                        preferred_element_type=jnp.float32), cap)
        logits_NxV = place(logits_NxV, ("batch", "vocab"))
        # mode="clip": a pad id >= vocab_size (an added [PAD]) must not turn the row into NaN.
        target_logits_N = jnp.take_along_axis(logits_NxV, targets_Bxc.reshape(-1, 1), axis=-1, mode="clip")[:, 0]
        logps_N = target_logits_N - jax.nn.logsumexp(logits_NxV, axis=-1)
        return None, constrain_batch(jnp.where(scored_Bxc, logps_N.reshape(B, chunk) * weights_Bxc, 0.0))

    if n_chunks > 1:  # the backward pass recomputes each chunk's logits instead of storing them all
        chunk_logps = jax.checkpoint(chunk_logps)
    _, logps_KxBxc = jax.lax.scan(chunk_logps, None, (split(h_BxCxD), split(targets_BxC), split(weights_BxC)))
    return jnp.moveaxis(logps_KxBxc, 0, 1).reshape(B, n_chunks * chunk)[:, :C]
