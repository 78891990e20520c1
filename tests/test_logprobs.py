"""sequence_logps / token_logps: equal to a float64 log-softmax gather, differentiable under jit, the
completion-only head equal to the full one, and chunked so the full [B, T, V] float32 logits never
exist (XLA's compiled memory analysis)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bco_jax import sharding
from bco_jax.models import Decoder, ModelConfig, sequence_logps
from bco_jax.models.logprobs import chunk_slots, token_logps


def tiny(vocab=96, abstract=False, **kw):
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, **kw)
    def make():
        return Decoder(cfg, rngs=nnx.Rngs(0))
    return nnx.eval_shape(make) if abstract else make()


def reference_logps(model, ids, mask, loss_mask):
    graphdef, state = nnx.split(model)
    logits = np.asarray(jax.jit(lambda s: nnx.merge(graphdef, s)(ids, mask))(state), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    B, T = ids.shape
    total, count = np.zeros(B), np.zeros(B, np.int64)
    for b in range(B):
        for t in range(1, T):
            if loss_mask[b, t] and mask[b, t]:
                total[b] += logp[b, t - 1, ids[b, t]]
                count[b] += 1
    return total, count


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    B, T = 4, 13
    ids = rng.integers(0, 96, size=(B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    mask[3] = 0  # a padding row (data pipelines pad the last batch): must give 0 and finite gradients
    mask[1, :4] = 0  # left padding
    mask[2, 9:] = 0  # right padding
    loss_mask = np.zeros((B, T), np.int32)
    loss_mask[0, 6:] = 1
    loss_mask[1, 8:] = 1
    loss_mask[2, 5:9] = 1
    return ids, mask, loss_mask


@pytest.fixture(scope="module")
def reference(batch):
    model = tiny()
    return model, reference_logps(model, *batch)


@pytest.mark.parametrize("chunk", [8, 128])  # 2 positions per chunk (T = 13 padded); one chunk
def test_matches_float64_log_softmax_gather(batch, reference, chunk):
    model, (want, want_counts) = reference
    ids, mask, loss_mask = batch
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s: sequence_logps(nnx.merge(graphdef, s), ids, mask, loss_mask, chunk_tokens=chunk))
    logps, counts = fn(state)
    assert logps.dtype == jnp.float32 and counts.dtype == jnp.int32
    np.testing.assert_array_equal(counts, want_counts)
    np.testing.assert_allclose(np.asarray(logps), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("capacity, chunk", [(7, 8), (9, 128)])  # exact fit, 2 slots a chunk; slack, one chunk
def test_completion_only_head_matches_full_and_float64(batch, reference, capacity, chunk):
    model, (want, want_counts) = reference
    ids, mask, loss_mask = batch
    graphdef, state = nnx.split(model)

    def logps(s, capacity):
        return sequence_logps(nnx.merge(graphdef, s), ids, mask, loss_mask, completion_capacity=capacity,
                              chunk_tokens=chunk)

    (full, _), (short, counts) = jax.jit(logps, static_argnums=1)(state, None), jax.jit(logps, static_argnums=1)(
        state, capacity)
    np.testing.assert_array_equal(counts, want_counts)
    np.testing.assert_allclose(np.asarray(short), want, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(short), np.asarray(full), rtol=1e-5, atol=1e-5)
    def total(s, capacity):
        return logps(s, capacity)[0].sum()
    g_full, g_short = (jax.jit(jax.grad(total), static_argnums=1)(state, c) for c in (None, capacity))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g_full, g_short)


def test_token_logps_index_the_scored_tokens(batch, reference):
    model, _ = reference
    ids, mask, loss_mask = batch
    logps, weights, index = token_logps(model, ids, mask, loss_mask, 7, chunk_tokens=8)
    assert logps.shape == weights.shape == index.shape == (4, 7)
    for b in range(4):
        scored = np.flatnonzero(loss_mask[b] * mask[b])
        scored = scored[scored > 0]
        n = len(scored)
        np.testing.assert_array_equal(index[b, :n], scored)
        assert (weights[b, :n] == 1).all() and (weights[b, n:] == 0).all() and (logps[b, n:] == 0).all()
    full_logps, full_weights, full_index = token_logps(model, ids, mask, loss_mask)
    np.testing.assert_array_equal(full_index, np.broadcast_to(np.arange(1, 13), (4, 12)))
    for b in range(4):  # the same per-token values as the full path, at the same token index
        n = int(weights[b].sum())
        np.testing.assert_allclose(logps[b, :n], full_logps[b, index[b, :n] - 1], rtol=1e-5, atol=1e-5)


def test_chunk_is_sized_per_device(batch):
    """chunk_tokens bounds the logits on each device: a mesh that splits the batch 4 ways allows 4x
    the slots per chunk; a mesh axis that does not divide the batch does not split it."""
    assert chunk_slots(4, 12, 8) == 2
    with jax.set_mesh(sharding.make_mesh((8, 1, 1))):
        assert chunk_slots(4, 12, 8) == 2
    ids, mask, loss_mask = batch
    graphdef, state = nnx.split(tiny())
    fn = jax.jit(lambda s: sequence_logps(nnx.merge(graphdef, s), ids, mask, loss_mask,
                                          completion_capacity=8, chunk_tokens=8)[0])
    with jax.set_mesh(sharding.make_mesh((4, 1, 2))):
        assert chunk_slots(4, 12, 8) == 8
        assert chunk_slots(4, 12, 1024) == 12
        meshed = fn(state)
    np.testing.assert_allclose(meshed, fn(state), rtol=1e-6)


def test_gradient_matches_unchunked(batch):
    ids, mask, loss_mask = batch
    model = tiny(tie_word_embeddings=True)
    graphdef, state = nnx.split(model)

    def chunked(s):
        return sequence_logps(nnx.merge(graphdef, s), ids, mask, loss_mask, chunk_tokens=12)[0].sum()

    def direct(s):
        logp = jax.nn.log_softmax(nnx.merge(graphdef, s)(ids, mask))
        tok = jnp.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(tok * loss_mask[:, 1:] * mask[:, 1:])

    g1, g2 = jax.jit(jax.grad(chunked))(state), jax.jit(jax.grad(direct))(state)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(g1))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g2)


def test_full_logits_never_materialised():
    """V = 128256 (Llama 3) with a tiny hidden size: temp memory of value and gradient stays far
    below one [B, T, V] float32 buffer."""
    B, T, V = 4, 512, 128256
    model = tiny(vocab=V, abstract=True, tie_word_embeddings=True)
    graphdef, state = nnx.split(model)
    ids = jax.ShapeDtypeStruct((B, T), jnp.int32)

    def loss(s, ids, mask, loss_mask):
        return sequence_logps(nnx.merge(graphdef, s), ids, mask, loss_mask, chunk_tokens=64)[0].sum()

    full_logits_bytes = B * T * V * 4
    for fn in (loss, jax.grad(loss)):
        compiled = jax.jit(fn).lower(state, ids, ids, ids).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        print(f"{fn.__name__}: temp {temp / 2**20:.1f} MiB vs full logits {full_logits_bytes / 2**20:.1f} MiB")
        assert temp < full_logits_bytes / 4


def test_pad_id_beyond_the_vocabulary_gives_finite_logps():
    """An added [PAD] token can have id == vocab_size; padding must stay harmless."""
    import jax.numpy as jnp
    from flax import nnx

    from bco_jax.models import Decoder, ModelConfig, sequence_logps

    cfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=8)
    model = Decoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32)
    ids = jnp.array([[1, 5, 9, 7, 0, 0]])
    mask = jnp.array([[1, 1, 1, 1, 0, 0]])
    base = sequence_logps(model, ids, mask, mask)[0]
    padded = sequence_logps(model, ids.at[0, 4:].set(cfg.vocab_size), mask, mask)[0]
    assert jnp.isfinite(padded).all()
    np.testing.assert_allclose(padded, base, rtol=1e-6)


def test_bfloat16_lm_head_gradient_does_not_degrade_with_many_chunks():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from bco_jax.models import Decoder, ModelConfig, sequence_logps

    cfg = ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=16)
    ids = jax.random.randint(jax.random.key(0), (2, 128), 0, 256)
    mask = jnp.ones_like(ids)

    def lm_head_grad(dtype, chunk_tokens):
        model = Decoder(cfg, rngs=nnx.Rngs(0), dtype=dtype)
        graphdef, state = nnx.split(model)
        def loss(s):
            return sequence_logps(nnx.merge(graphdef, s), ids, mask, mask,
                                                chunk_tokens=chunk_tokens)[0].sum()
        return np.asarray(jax.grad(loss)(state)["lm_head"][...], np.float64)

    exact = lm_head_grad(jnp.float32, 4096)
    def err(g):
        return np.linalg.norm(g - exact) / np.linalg.norm(exact)
    one_chunk, many_chunks = err(lm_head_grad(jnp.bfloat16, 4096)), err(lm_head_grad(jnp.bfloat16, 4))
    assert many_chunks < 1.5 * one_chunk, (one_chunk, many_chunks)


def test_bfloat16_head_gradient_sums_chunks_in_float32_when_vocabulary_parallel():
    """fsdp=8 (the head vocabulary-parallel), bfloat16 compute, 64 chunks: the LM head's gradient is as
    close to the float32 one as with one chunk. The check can fail: a weight cast to bfloat16 before
    the scan (its gradient summed over chunks in bfloat16) misses it, measured here too."""
    from bco_jax.models.logprobs import _chunked_logps

    rng = np.random.default_rng(0)
    B, C, D, V = 8, 256, 32, 256
    h = jnp.asarray(rng.normal(size=(B, C, D)), jnp.bfloat16)
    targets = jnp.asarray(rng.integers(0, V, size=(B, C)), jnp.int32)
    weights = jnp.ones((B, C), jnp.float32)
    w = jnp.asarray(rng.normal(size=(D, V)) * 0.3, jnp.float32)

    def head_grad(dtype, chunk, cast_first=False):
        def total(w):
            return jnp.sum(_chunked_logps(h, targets, weights, w.astype(dtype) if cast_first else w, chunk, dtype))
        return np.asarray(jax.jit(jax.grad(total))(w), np.float64)

    exact = head_grad(jnp.float32, C)

    def err(g):
        return np.linalg.norm(g - exact) / np.linalg.norm(exact)

    one_chunk = err(head_grad(jnp.bfloat16, C))
    with jax.set_mesh(sharding.make_mesh((1, 8, 1))):
        many_chunks = err(head_grad(jnp.bfloat16, 4))
        summed_in_bfloat16 = err(head_grad(jnp.bfloat16, 4, cast_first=True))
    print(f"relative error: one chunk {one_chunk:.2e}, 64 chunks {many_chunks:.2e}, "
          f"64 chunks summed in bfloat16 {summed_in_bfloat16:.2e}")
    assert many_chunks < 1.5 * one_chunk < summed_in_bfloat16
