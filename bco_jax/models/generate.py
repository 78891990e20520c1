"""Batched sampling with a KV cache: one prefill pass over the (left-aligned) prompts, then one
token per step inside a `jax.lax.while_loop` that ends when every row has produced an EOS id.

On a mesh (`mesh=`), every process passes its own rows of the global batch (its `data_shard` block,
as training feeds them) and gets its own rows back; parameters stay on their shardings, the rows and
the KV cache are split over the batch axes and the cache's heads over `tensor`. With `row_ids`, each
row draws from its own key (the seed folded with the row's ids), so a row's answer does not depend
on how many processes or devices share the batch, or on which other rows it is batched with."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bco_jax.models.decoder import constrain, positions_from_mask
from bco_jax.sharding import local_rows, put_rows

CACHE_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")  # the KV cache's logical axes


def generate(model, prompt_ids, prompt_mask, *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, rng=None, eos_ids=None, pad_id=None, row_ids=None, mesh=None):
    """(tokens_BxN int32, mask_BxN int32) with N = max_new_tokens. mask is 1 on generated tokens up to
    and including the first EOS; later positions hold `pad_id` and mask 0. temperature 0 is greedy.
    `eos_ids` defaults to model.config.eos_token_ids (generation_config.json's list when present).
    `row_ids` [B] or [B, R] ints: row b samples with `rng` folded with its ids (else one key for the
    batch). `mesh`: the arguments are this process's rows, and so is the result (NumPy); every
    process of the job calls it with the same shapes."""
    cfg = model.config
    eos_ids = tuple(int(i) for i in (cfg.eos_token_ids if eos_ids is None else eos_ids))
    if pad_id is None:
        pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    rng = jax.random.key(0) if rng is None else rng
    graphdef, state = nnx.split(model)
    rows = [np.asarray(prompt_ids, np.int32), np.asarray(prompt_mask, np.int32)]
    if row_ids is not None:
        rows.append(np.asarray(row_ids, np.int32).reshape(len(rows[0]), -1))
    run = functools.partial(_generate, graphdef, state, temperature=jnp.float32(max(temperature, 1e-6)),
                            top_p=jnp.float32(top_p), max_new_tokens=int(max_new_tokens), eos_ids=eos_ids,
                            pad_id=int(pad_id), greedy=temperature == 0)
    if mesh is None:
        return run(*map(jnp.asarray, rows[:2]), rng, row_ids=None if row_ids is None else jnp.asarray(rows[2]))
    with jax.set_mesh(mesh):
        placed = put_rows(rows, mesh)
        tokens, mask = run(*placed[:2], rng, row_ids=placed[2] if row_ids is not None else None)
    return local_rows(tokens, mesh), local_rows(mask, mesh)


def left_padded(rows, pad_id: int, width: int | None = None):
    """(ids, mask) [n, width] int32 NumPy of token-id `rows` padded on the left (every prompt ends at
    the last column, as `generate` takes them); `width` defaults to the longest row."""
    width = max(len(row) for row in rows) if width is None else width
    ids, mask = np.full((len(rows), width), pad_id, np.int32), np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        if len(row):
            ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    return ids, mask


def right_align(mask_BxT, *arrays_BxT):
    """Move each row's leading padding to its end (the layout the training step and cuDNN attention
    take: real tokens first): returns the mask and `arrays_BxT` shifted alike."""
    T = mask_BxT.shape[1]
    lead_B = jnp.argmax(mask_BxT > 0, axis=1)
    src_BxT = (jnp.arange(T)[None, :] + lead_B[:, None]) % T
    return tuple(jnp.take_along_axis(x, src_BxT, 1) for x in (mask_BxT, *arrays_BxT))


def left_align(ids_BxP, mask_BxP):
    """Move each row's padding to the left, so every prompt ends at the last column."""
    P = ids_BxP.shape[1]
    last_real_B = P - 1 - jnp.argmax(mask_BxP[:, ::-1], axis=1)
    shift_B = P - 1 - last_real_B
    src_BxP = (jnp.arange(P)[None, :] - shift_B[:, None]) % P
    return jnp.take_along_axis(ids_BxP, src_BxP, 1), jnp.take_along_axis(mask_BxP, src_BxP, 1)


def sample_token(logits_BxV, rng, temperature, top_p, greedy: bool):
    """One token per row: argmax, or a draw from the nucleus of softmax(logits / temperature). `rng`
    is one key for the batch, or [B] keys (one per row)."""
    if greedy:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = logits_BxV / temperature
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # Nucleus: keep the smallest prefix whose mass reaches top_p (the top token always survives).
    keep_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV < top_p
    threshold_B = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1)
    logits_BxV = jnp.where(logits_BxV >= threshold_B[:, None], logits_BxV, -jnp.inf)
    if rng.ndim == 0:
        return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)
    return jax.vmap(jax.random.categorical)(rng, logits_BxV).astype(jnp.int32)


def _row_keys(rng, row_ids_BxR):
    """[B] keys: `rng` folded with each of a row's ids in turn."""
    def fold(ids_R):
        return jax.lax.fori_loop(0, ids_R.shape[0], lambda i, k: jax.random.fold_in(k, ids_R[i]), rng)
    return jax.vmap(fold)(row_ids_BxR)


@functools.partial(jax.jit, static_argnums=(0,),
                   static_argnames=("max_new_tokens", "eos_ids", "pad_id", "greedy"))
def _generate(graphdef, state, ids_BxP, mask_BxP, rng, *, temperature, top_p, max_new_tokens, eos_ids,
              pad_id, greedy, row_ids=None):
    model = nnx.merge(graphdef, state)
    cfg = model.config
    ids_BxP, mask_BxP = left_align(ids_BxP, mask_BxP)
    (B, P), N = ids_BxP.shape, max_new_tokens
    cache_shape = (cfg.num_layers, B, P + N, cfg.num_kv_heads, cfg.head_dim)
    # Under `jax.set_mesh`: the cache's rows on the batch axes, its heads on `tensor`.
    cache = tuple(constrain(jnp.zeros(cache_shape, model.dtype), CACHE_AXES) for _ in range(2))
    kv_valid_BxS = jnp.concatenate([mask_BxP, jnp.zeros((B, N), jnp.int32)], axis=1)
    h_BxPxD, cache = model.forward(ids_BxP, positions_from_mask(mask_BxP), kv_valid_BxS, jnp.arange(P),
                                   cache, 0)
    next_position_B = jnp.sum(mask_BxP, axis=1)
    eos_E = jnp.asarray(eos_ids or (-1,), jnp.int32)

    def cond(carry):
        step, done_B = carry[0], carry[4]
        return (step < N) & ~jnp.all(done_B)

    def body(carry):
        step, cache, kv_valid_BxS, logits_BxV, done_B, tokens_BxN, out_mask_BxN, rng = carry
        if row_ids is None:
            rng, key = jax.random.split(rng)
        else:
            key = jax.vmap(jax.random.fold_in, (0, None))(rng, step)
        token_B = sample_token(logits_BxV, key, temperature, top_p, greedy)
        token_B = jnp.where(done_B, pad_id, token_B)
        tokens_BxN = tokens_BxN.at[:, step].set(token_B)
        out_mask_BxN = out_mask_BxN.at[:, step].set((~done_B).astype(jnp.int32))
        done_B = done_B | jnp.isin(token_B, eos_E)
        index = P + step
        kv_valid_BxS = kv_valid_BxS.at[:, index].set(1)
        h_Bx1xD, cache = model.forward(token_B[:, None], (next_position_B + step)[:, None], kv_valid_BxS,
                                       index[None], cache, index)
        logits_BxV = model.logits(h_Bx1xD)[:, 0]
        return step + 1, cache, kv_valid_BxS, logits_BxV, done_B, tokens_BxN, out_mask_BxN, rng

    if row_ids is not None:
        rng = _row_keys(rng, row_ids)
    carry = (jnp.int32(0), cache, kv_valid_BxS, model.logits(h_BxPxD[:, -1:])[:, 0],
             jnp.zeros((B,), bool), jnp.full((B, N), pad_id, jnp.int32), jnp.zeros((B, N), jnp.int32), rng)
    carry = jax.lax.while_loop(cond, body, carry)
    return carry[5], carry[6]
