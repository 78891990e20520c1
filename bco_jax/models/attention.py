"""Attention, one entry point `attend`, with the kernel chosen by `ModelConfig.attn_implementation`.

Two masking forms, as in transformers: self-attention over one sequence takes the 2-D padding mask
[B, S] and `is_causal=True` (causality and Mistral's window are then kernel flags, which lets fused
kernels skip masked blocks); cached decoding takes a full boolean mask [B, 1, T, S] and
`is_causal=False`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

ATTN_IMPLEMENTATIONS = ("auto", "xla")


def resolve(attn_implementation: str) -> str:
    """The kernel "auto" stands for on the default backend."""
    if attn_implementation != "auto":
        return attn_implementation
    return "xla"


def attention_mask(kv_valid_BxS, q_index_T, window: int | None):
    """[B, 1, T, S] bool: causal by index, padding keys hidden, Mistral window `q - k < window`
    (transformers 5 masking_utils.sliding_window_overlay). Indices, not positions: padding is
    contiguous at one end, so index distances between real tokens equal position distances."""
    k_index_S = jnp.arange(kv_valid_BxS.shape[1])
    q_TxS, k_TxS = q_index_T[:, None], k_index_S[None, :]
    allowed_TxS = k_TxS <= q_TxS
    if window is not None:
        allowed_TxS &= k_TxS > q_TxS - window
    return (allowed_TxS[None] & padding_mask(kv_valid_BxS, q_index_T)[:, 0])[:, None]


def padding_mask(kv_valid_BxS, q_index_T):
    """[B, 1, T, S] bool: real keys. A padding query would see no key at all; letting it see itself
    avoids NaN rows in fused kernels (its output is never used)."""
    self_TxS = q_index_T[:, None] == jnp.arange(kv_valid_BxS.shape[1])[None, :]
    return (kv_valid_BxS[:, None, :].astype(bool) | self_TxS[None])[:, None]


def attend(cfg, q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask, is_causal: bool):
    """Attention output [B, T, N, H]. `is_causal=True`: `mask` is the padding mask [B, S] of a
    sequence attending to itself (S == T). `is_causal=False`: `mask` is [B, 1, T, S] bool, complete."""
    if not is_causal:
        return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask)
    window = None if cfg.sliding_window is None else (cfg.sliding_window - 1, 0)
    return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=padding_mask(mask, jnp.arange(mask.shape[1])),
                                        is_causal=True, local_window_size=window, implementation="xla")
