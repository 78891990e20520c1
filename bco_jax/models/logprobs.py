"""Sequence log-probabilities, the quantity every loss consumes.

The LM head runs over chunks of `chunk_tokens` tokens (batch and sequence flattened) inside a
rematerialised scan, so only [chunk, V] float32 logits exist at once, in the forward and in the
backward pass. Vocabularies are 128k-152k: full [B, T, V] float32 logits of a 16 x 4k batch would be
~32 GB; one 512-token chunk is ~250 MB whatever the batch size.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

DEFAULT_CHUNK_TOKENS = 512


def sequence_logps(model, input_ids, attention_mask, loss_mask, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
    """(logps_B float32, counts_B int32): sum of log p(input_ids[b, t] | tokens < t) over positions
    with loss_mask[b, t] = 1 (the completion; each predicted from position t - 1), and their count.
    A loss-mask bit on position 0 or on a padding token is ignored."""
    h_BxTxD = model.hidden_states(input_ids, attention_mask)
    B, T, D = h_BxTxD.shape
    # Position t predicts token t + 1: shift targets and weights left by one.
    targets_BxT = jnp.pad(input_ids[:, 1:], ((0, 0), (0, 1)))
    weights_BxT = jnp.pad((loss_mask[:, 1:] * attention_mask[:, 1:]).astype(jnp.float32), ((0, 0), (0, 1)))
    token_logps_BxT = _token_logps(h_BxTxD.reshape(B * T, D), targets_BxT.reshape(B * T),
                                   model.lm_head_weight(), chunk_tokens).reshape(B, T)
    logps_B = jnp.sum(token_logps_BxT * weights_BxT, axis=1)
    counts_B = jnp.sum(weights_BxT, axis=1).astype(jnp.int32)
    return logps_B, counts_B


def _token_logps(h_NxD, targets_N, w_DxV, chunk_tokens: int):
    """log p(target) per token [N], computing logits chunk by chunk."""
    N, D = h_NxD.shape
    chunk = min(chunk_tokens, N)
    n_chunks = -(-N // chunk)
    pad = n_chunks * chunk - N
    h_KxCxD = jnp.pad(h_NxD, ((0, pad), (0, 0))).reshape(n_chunks, chunk, D)
    targets_KxC = jnp.pad(targets_N, (0, pad)).reshape(n_chunks, chunk)

    @jax.checkpoint  # the backward pass recomputes each chunk's logits instead of storing them all
    def chunk_logps(h_CxD, targets_C):
        logits_CxV = jnp.einsum("cd,dv->cv", h_CxD, w_DxV, preferred_element_type=jnp.float32)
        target_logits_C = jnp.take_along_axis(logits_CxV, targets_C[:, None], axis=-1)[:, 0]
        return target_logits_C - jax.nn.logsumexp(logits_CxV, axis=-1)

    _, logps_KxC = jax.lax.scan(lambda carry, xs: (carry, chunk_logps(*xs)), None, (h_KxCxD, targets_KxC))
    return logps_KxC.reshape(-1)[:N]
