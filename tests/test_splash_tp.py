"""Splash attention under tensor parallelism: heads sharded on "tensor" when it divides both the query
and the key/value heads, replicated otherwise; block sizes chosen per sequence length. Pallas runs in
interpret mode on CPU (slow), so the shapes are tiny."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from bco_jax.models import attention

B, T, N, K, H = 2, 16, 4, 2, 8
SCALE = 0.3


def mesh(shape):
    return jax.make_mesh(shape, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3,
                         devices=jax.devices()[:int(np.prod(shape))])


def inputs():
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (B, T, N, H))
    k, v = (jax.random.normal(key, (B, T, K, H)) for key in keys[1:])
    valid = jnp.asarray(np.arange(T)[None] < np.array([[T], [T - 5]]), jnp.int32)  # right padding
    return q, k, v, valid


def spy_on_shard_map(monkeypatch):
    """Record the in_specs of every shard_map and the per-shard shapes its body sees."""
    real, seen = jax.shard_map, {"specs": [], "shapes": []}

    def shard_map(f, **kwargs):
        def body(*args):
            seen["shapes"].append(tuple(a.shape for a in args))
            return f(*args)
        seen["specs"].append(kwargs["in_specs"])
        return real(body, **kwargs)

    monkeypatch.setattr(jax, "shard_map", shard_map)
    return seen


def assert_equals_xla(shape, window):
    """Real output rows and gradients w.r.t. q, k, v equal the dense XLA kernel's, under `shape`."""
    q, k, v, valid = inputs()
    weights = jnp.cos(jnp.arange(q.size).reshape(q.shape)) * valid[:, :, None, None]

    def loss(kernel):
        return jax.jit(jax.value_and_grad(
            lambda q, k, v: jnp.sum(kernel(q, k, v, valid, window, SCALE) * weights), (0, 1, 2)))

    want, want_grads = loss(attention.xla_causal)(q, k, v)
    with jax.set_mesh(mesh(shape)):
        out = jax.jit(attention.splash_causal, static_argnums=(4, 5))(q, k, v, valid, window, SCALE)
        got, got_grads = loss(attention.splash_causal)(q, k, v)
    real = np.asarray(valid, bool)
    np.testing.assert_allclose(np.asarray(out)[real],
                               np.asarray(attention.xla_causal(q, k, v, valid, window, SCALE))[real], atol=2e-5)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, b in zip(got_grads, want_grads):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_heads_sharded_on_tensor_equal_xla():
    assert_equals_xla((1, 1, 2), None)


def test_tensor_larger_than_kv_heads_replicates_them_and_is_still_right():
    assert_equals_xla((1, 1, 4), 5)


@pytest.mark.parametrize("shape, q_local, kv_local, heads", [
    ((2, 1, 2), (1, T, N // 2, H), (1, T, K // 2, H), "tensor"),  # rows on data, heads on tensor
    ((1, 1, 4), (B, T, N, H), (B, T, K, H), None),  # 4 does not divide K = 2: every shard, every head
])
def test_each_shard_runs_its_own_heads(monkeypatch, shape, q_local, kv_local, heads):
    seen = spy_on_shard_map(monkeypatch)
    q, k, v, valid = inputs()
    with jax.set_mesh(mesh(shape)):
        jax.eval_shape(lambda *a: attention.splash_causal(*a, None, SCALE), q, k, v, valid)
    [(q_spec, k_spec, v_spec, segment_spec)] = seen["specs"]
    assert q_spec == k_spec == v_spec and q_spec[2] == heads
    assert len(segment_spec) == 1  # segment ids: by rows only
    [(q_shape, k_shape, v_shape, segment_shape)] = seen["shapes"]
    assert q_shape == q_local and k_shape == v_shape == kv_local and segment_shape == (q_local[0], T)


@pytest.mark.parametrize("length, block", [(32, 128), (128, 128), (200, 256), (384, 128), (1024, 512),
                                           (4096, 512)])
def test_splash_block_sizes(length, block):
    sizes = attention.splash_block_sizes(length)
    assert {getattr(sizes, f) for f in ("block_q", "block_kv", "block_kv_compute", "block_q_dkv", "block_kv_dkv",
                                        "block_kv_dkv_compute", "block_q_dq", "block_kv_dq")} == {block}
    assert sizes.has_backward_blocks


def test_no_mesh_no_shard_map(monkeypatch):
    seen = spy_on_shard_map(monkeypatch)
    q, k, v, valid = inputs()
    assert jax.eval_shape(lambda *a: attention.splash_causal(*a, None, SCALE), q, k, v, valid).shape == q.shape
    assert seen["specs"] == []


@pytest.mark.parametrize("shape, q_heads", [((1, 1, 4), None), ((1, 1, 2), "tensor")])
def test_cudnn_inputs_get_their_heads_sharded_alike(shape, q_heads):
    """cuDNN's custom partitioning needs q, k and v sharded alike: with tensor 4 > K = 2 the rules
    would split q's heads only, so all three are replicated over heads; with tensor 2 both split."""
    from bco_jax.models.attention import heads_alike

    mesh = jax.make_mesh(shape, ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=jax.devices()[:int(np.prod(shape))])
    q, k = jnp.ones((2, 16, 4, 8)), jnp.ones((2, 16, 2, 8))
    with jax.set_mesh(mesh):
        heads = P(None, None, "tensor")
        q, k = jax.device_put(q, NamedSharding(mesh, heads)), jax.device_put(k, NamedSharding(mesh, P()))
        outs = jax.jit(heads_alike)(q, k, k)
    specs = [tuple(o.sharding.spec) + (None,) * (4 - len(o.sharding.spec)) for o in outs]
    if q_heads is None:
        assert all(spec[2] is None for spec in specs), specs
    else:  # already alike on entry (tensor divides both): left to the rules
        assert outs[0].sharding.spec[2] == "tensor"
