"""Sequence log-probabilities, the quantity every loss consumes.

The LM head runs over chunks of the sequence inside a rematerialised scan, so only [B, chunk, V]
float32 logits exist at once, in the forward and in the backward pass (vocabularies are 128k-152k:
full [B, T, V] float32 logits of a 4k-token batch would be tens of GB).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

DEFAULT_CHUNK = 128


def sequence_logps(model, input_ids, attention_mask, loss_mask, *, chunk_size: int = DEFAULT_CHUNK):
    """(logps_B float32, counts_B int32): sum of log p(input_ids[b, t] | tokens < t) over positions
    with loss_mask[b, t] = 1 (the completion; each predicted from position t - 1), and their count.
    A loss-mask bit on position 0 has no prediction and is ignored."""
    h_BxTxD = model.hidden_states(input_ids, attention_mask)
    B, T, D = h_BxTxD.shape
    # Position t predicts token t + 1: shift targets and weights left by one.
    targets_BxT = jnp.pad(input_ids[:, 1:], ((0, 0), (0, 1)))
    weights_BxT = jnp.pad((loss_mask[:, 1:] * attention_mask[:, 1:]).astype(jnp.float32), ((0, 0), (0, 1)))
    chunk = min(chunk_size, T)
    n_chunks = -(-T // chunk)
    pad = n_chunks * chunk - T
    h_NxBxCxD = _chunks(jnp.pad(h_BxTxD, ((0, 0), (0, pad), (0, 0))), n_chunks, chunk)
    targets_NxBxC = _chunks(jnp.pad(targets_BxT, ((0, 0), (0, pad))), n_chunks, chunk)
    weights_NxBxC = _chunks(jnp.pad(weights_BxT, ((0, 0), (0, pad))), n_chunks, chunk)
    w_DxV = model.lm_head_weight()

    @jax.checkpoint  # the backward pass recomputes each chunk's logits instead of storing them all
    def chunk_logps(h_BxCxD, targets_BxC, weights_BxC):
        logits_BxCxV = jnp.einsum("bcd,dv->bcv", h_BxCxD, w_DxV, preferred_element_type=jnp.float32)
        target_logits_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
        logps_BxC = target_logits_BxC - jax.nn.logsumexp(logits_BxCxV, axis=-1)
        return jnp.sum(logps_BxC * weights_BxC, axis=1)

    def body(total_B, xs):
        return total_B + chunk_logps(*xs), None

    logps_B, _ = jax.lax.scan(body, jnp.zeros((B,), jnp.float32), (h_NxBxCxD, targets_NxBxC, weights_NxBxC))
    counts_B = jnp.sum(weights_BxT, axis=1).astype(jnp.int32)
    return logps_B, counts_B


def _chunks(x_BxTx, n_chunks, chunk):
    """[B, N*C, ...] -> [N, B, C, ...] so scan walks the sequence chunk by chunk."""
    B = x_BxTx.shape[0]
    return jnp.moveaxis(x_BxTx.reshape(B, n_chunks, chunk, *x_BxTx.shape[2:]), 1, 0)
