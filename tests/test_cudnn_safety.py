"""Issue 19, item 5: what a fused kernel leaves at padded positions (cuDNN learns of padding only
through sequence lengths and promises nothing past them) never reaches a real row, a loss or a
gradient. cuDNN does not run on CPU: its wrapper runs here against a stand-in kernel that plants NaN
past the lengths, forward and backward; the log-prob path gets NaN planted in its hidden states at
padding; and the config refuses cudnn in float32."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bco_jax.config import parse_args
from bco_jax.errors import ConfigError
from bco_jax.models import Decoder, ModelConfig, attention, sequence_logps
from bco_jax.models.logprobs import _chunked_logps

B, T, N, K, H = 3, 6, 4, 2, 8
LENGTHS = (6, 3, 0)  # full, right-padded, all padding


def segments():
    return (np.arange(T)[None, :] < np.array(LENGTHS)[:, None]).astype(np.int32)


def qkv(seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(B, T, n, H)), jnp.float32) for n in (N, K, K))


def test_lengths_clamped_and_padded_rows_zeroed():
    lengths, real = attention.cudnn_lengths(jnp.asarray(segments()))
    np.testing.assert_array_equal(lengths, [6, 3, 1])  # an all-padding row is given length 1, not 0
    np.testing.assert_array_equal(real, segments().astype(bool))  # its row stays all padding
    x = np.array(qkv()[0])
    x[~segments().astype(bool)] = np.nan
    out = np.asarray(attention.zero_padding(jnp.asarray(x), real))
    np.testing.assert_array_equal(out[segments() > 0], x[segments() > 0])  # real rows bit for bit
    assert (out[segments() == 0] == 0).all()


def nan_past_lengths(x, lengths):
    return jnp.where(jnp.arange(x.shape[1])[None, :, None, None] < lengths[:, None, None, None], x, jnp.nan)


def fake_cudnn(real_dpa, seen):
    """jax.nn.dot_product_attention as the worst cuDNN could be: right on real rows, NaN past the
    lengths in its output and in its gradients, NaN in every row of a length-0 sequence."""
    def fake(q, k, v, *, scale, is_causal, query_seq_lengths, key_value_seq_lengths, local_window_size,
             implementation):
        assert implementation == "cudnn" and is_causal
        jax.debug.callback(lambda lengths: seen.append(np.asarray(lengths)), query_seq_lengths)

        @jax.custom_vjp
        def kernel(q, k, v):
            return forward(q, k, v)[0]

        def forward(q, k, v):
            out, vjp = jax.vjp(lambda q, k, v: real_dpa(
                q, k, v, scale=scale, is_causal=True, query_seq_lengths=query_seq_lengths,
                key_value_seq_lengths=key_value_seq_lengths, local_window_size=local_window_size,
                implementation="xla"), q, k, v)
            out = jnp.where((query_seq_lengths > 0)[:, None, None, None], out, jnp.nan)
            return nan_past_lengths(out, query_seq_lengths), vjp

        def backward(vjp, g):
            return tuple(nan_past_lengths(d, query_seq_lengths) for d in vjp(g))

        kernel.defvjp(forward, backward)
        return kernel(q, k, v)
    return fake


@pytest.mark.parametrize("window", [2])  # a window exercises the masked wrapper fully
def test_cudnn_wrapper_drops_what_the_kernel_leaves_past_the_lengths(monkeypatch, window):
    seen = []
    monkeypatch.setattr(jax.nn, "dot_product_attention", fake_cudnn(jax.nn.dot_product_attention, seen))
    seg = jnp.asarray(segments())
    real = segments() > 0
    w = jnp.asarray(np.random.default_rng(1).normal(size=(B, T, N, H)), jnp.float32)

    def loss(kernel, q, k, v):
        out = kernel(q, k, v, seg, window, 0.3)
        return jnp.sum(jnp.where(real[..., None, None], out, 0) * w), out

    ((_, got), g_got), ((_, want), g_want) = (
        jax.jit(jax.value_and_grad(lambda *a: loss(kernel, *a), (0, 1, 2), has_aux=True))(*qkv())
        for kernel in (attention.cudnn_causal, attention.xla_causal))
    np.testing.assert_array_equal(np.asarray(seen[0]), [6, 3, 1])
    got, want = np.asarray(got), np.asarray(want)
    assert (got[~real] == 0).all()
    np.testing.assert_allclose(got[real], want[real], rtol=1e-6, atol=1e-6)
    for name, a, b in zip("qkv", g_got, g_want):
        assert np.isfinite(np.asarray(a)).all(), name
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6, err_msg=name)


def test_chunked_head_ignores_nan_hidden_states_in_unscored_slots():
    rng = np.random.default_rng(2)
    Bh, C, D, V = 2, 5, 8, 11
    h = jnp.asarray(rng.normal(size=(Bh, C, D)), jnp.float32)
    weights = jnp.asarray([[1, 1, 0, 1, 0], [0, 1, 1, 0, 0]], jnp.float32)
    poisoned = jnp.where(weights[..., None] > 0, h, jnp.nan)
    targets = jnp.asarray(rng.integers(0, V, size=(Bh, C)), jnp.int32)
    w = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)

    def total(h, w):
        return jnp.sum(_chunked_logps(h, targets, weights, w, 2, jnp.float32))

    clean, poison = (jax.value_and_grad(total, (0, 1))(x, w) for x in (h, poisoned))
    assert np.isfinite(float(poison[0]))
    assert float(poison[0]) == float(clean[0])
    for a, b in zip(poison[1], clean[1]):
        assert np.isfinite(np.asarray(a)).all()
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class NaNAtPadding:
    """The model with NaN in its hidden states at padding, as a fused kernel may leave them."""

    def __init__(self, model):
        self.model, self.dtype, self.config = model, model.dtype, model.config

    def hidden_states(self, input_ids, attention_mask, *args, **kw):
        h = self.model.hidden_states(input_ids, attention_mask, *args, **kw)
        return jnp.where(attention_mask[..., None] > 0, h, jnp.nan)

    def lm_head_weight(self):
        return self.model.lm_head_weight()


@pytest.mark.parametrize("capacity", [9])  # capacity None: the same head path, checked above
def test_sequence_logps_and_gradients_ignore_nan_at_padding(capacity):
    cfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=8)
    graphdef, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 64, size=(4, 13)).astype(np.int32)
    mask = np.ones((4, 13), np.int32)
    mask[1, 9:] = 0  # right padding
    mask[2, :4] = 0  # left padding
    mask[3] = 0  # all padding
    loss_mask = np.zeros((4, 13), np.int32)
    loss_mask[0, 6:] = loss_mask[1, 5:] = loss_mask[2, 8:] = 1

    def logps(s, wrap):
        model = nnx.merge(graphdef, s)
        return sequence_logps(wrap(model), ids, mask, loss_mask, completion_capacity=capacity, chunk_tokens=8)[0]

    def run(wrap):
        def loss(s):
            out = logps(s, wrap)
            return jnp.sum(out * jnp.arange(1.0, 5.0)), out
        (_, out), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
        return np.asarray(out), jax.tree.leaves(grad)

    want, g_want = run(lambda m: m)
    got, g_got = run(NaNAtPadding)
    assert np.isfinite(got).all() and got[3] == 0
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    for a, b in zip(g_got, g_want):
        assert np.isfinite(np.asarray(a)).all()
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_cudnn_refused_in_float32():
    with pytest.raises(ConfigError, match=r"^attn_implementation: cudnn runs in bfloat16"):
        parse_args(["--attn_implementation", "cudnn", "--dtype", "float32"])
    assert parse_args(["--attn_implementation", "cudnn", "--dtype", "bfloat16"]).model.attn_implementation == "cudnn"
