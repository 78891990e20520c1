"""Sequence log-probabilities, the quantity every loss consumes.

The LM head runs over chunks of the sequence inside a rematerialised scan, so only
[B, chunk_tokens / B, V] float32 logits exist at once, in the forward and in the backward pass.
Vocabularies are 128k-152k: full [B, T, V] float32 logits of a 16 x 4k batch would be ~32 GB; one
512-token chunk is ~250 MB whatever the batch size. Chunks cut the sequence axis, never the batch
axis, so each chunk keeps the batch sharding (every data-parallel device works on every chunk).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

DEFAULT_CHUNK_TOKENS = 512


def sequence_logps(model, input_ids, attention_mask, loss_mask, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
    """(logps_B float32, counts_B int32): sum of log p(input_ids[b, t] | tokens < t) over positions
    with loss_mask[b, t] = 1 (the completion; each predicted from position t - 1), and their count.
    A loss-mask bit on position 0 or on a padding token is ignored. `chunk_tokens` bounds the logits
    held at once (over the whole batch)."""
    h_BxTxD = model.hidden_states(input_ids, attention_mask)
    B, T, _ = h_BxTxD.shape
    # Position t predicts token t + 1: shift targets and weights left by one.
    targets_BxT = jnp.pad(input_ids[:, 1:], ((0, 0), (0, 1)))
    weights_BxT = jnp.pad((loss_mask[:, 1:] * attention_mask[:, 1:]).astype(jnp.float32), ((0, 0), (0, 1)))
    chunk = max(1, min(T, chunk_tokens // B))
    # The weight enters the scan in its parameter dtype and is cast inside each chunk: its gradient
    # is then summed over chunks in float32 (a bfloat16 sum loses precision with every chunk).
    w = model.embed[...].T if model.config.tie_word_embeddings else model.lm_head[...]
    logps_B = _chunked_logps(h_BxTxD, targets_BxT, weights_BxT, w, chunk, model.dtype)
    counts_B = jnp.sum(weights_BxT, axis=1).astype(jnp.int32)
    return logps_B, counts_B


def _chunked_logps(h_BxTxD, targets_BxT, weights_BxT, w_DxV, chunk: int, dtype):
    B, T, D = h_BxTxD.shape
    n_chunks = -(-T // chunk)
    pad = n_chunks * chunk - T
    h_KxBxCxD = _split(jnp.pad(h_BxTxD, ((0, 0), (0, pad), (0, 0))), n_chunks)
    targets_KxBxC = _split(jnp.pad(targets_BxT, ((0, 0), (0, pad))), n_chunks)
    weights_KxBxC = _split(jnp.pad(weights_BxT, ((0, 0), (0, pad))), n_chunks)

    @jax.checkpoint  # the backward pass recomputes each chunk's logits instead of storing them all
    def chunk_logps(h_BxCxD, targets_BxC, weights_BxC):
        logits_BxCxV = jnp.einsum("bcd,dv->bcv", h_BxCxD.astype(dtype), w_DxV.astype(dtype),
                                  preferred_element_type=jnp.float32)
        # mode="clip": a pad id >= vocab_size (an added [PAD]) must not turn the row into NaN.
        target_logits_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1,
                                                mode="clip")[..., 0]
        logps_BxC = target_logits_BxC - jax.nn.logsumexp(logits_BxCxV, axis=-1)
        return jnp.sum(logps_BxC * weights_BxC, axis=1)

    def body(total_B, xs):
        return total_B + chunk_logps(*xs), None

    total_B, _ = jax.lax.scan(body, jnp.zeros((B,), jnp.float32), (h_KxBxCxD, targets_KxBxC, weights_KxBxC))
    return total_B


def _split(x_BxTx, n_chunks):
    """[B, K*C, ...] -> [K, B, C, ...]: scan walks the sequence, each step sees the whole batch."""
    B, T = x_BxTx.shape[:2]
    return jnp.moveaxis(x_BxTx.reshape(B, n_chunks, T // n_chunks, *x_BxTx.shape[2:]), 1, 0)
