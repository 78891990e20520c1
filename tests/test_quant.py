"""Int8 weight-only quantization of the frozen base (QLoRA-style, `load_in_8bit`): the per-channel round
trip bound, log-probs close to the float model (and equal to the model with the dequantized weights),
int8 storage, gradients reaching the adapters only, the merged export, HF load / save, and placement on
2-device meshes with the ordinary logical-axis rules."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bco_jax import sharding
from bco_jax.models import Decoder, ModelConfig, load_hf, lora, quant, save_hf, token_logps
from bco_jax.models.decoder import _linear, layer_param_shapes
from bco_jax.models.projections import PROJECTIONS

CFG = ModelConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8)  # a tiny Llama
LORA = dict(lora_rank=4, lora_alpha=8.0, lora_targets=tuple(PROJECTIONS))


def graphdef_of(cfg):
    return nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32)))[0]


@functools.cache
def models():
    """A random float32 Llama's base, its int8 form, and non-zero adapters. Drawn with NumPy in the
    shapes the model declares (jax.random compiles a program per shape: seconds on a busy CPU)."""
    abstract = nnx.split(nnx.eval_shape(lambda: Decoder(dataclasses.replace(CFG, **LORA), rngs=nnx.Rngs(0))))[1]
    rng = np.random.default_rng(0)

    def draw(path, x):
        name = str(path[-1].key)
        if name.endswith("norm"):
            return jnp.asarray(1 + 0.1 * rng.standard_normal(x.shape), jnp.float32)
        return jnp.asarray((0.05 if "_lora_" in name else 0.02) * rng.standard_normal(x.shape), jnp.float32)

    base, adapters = lora.split_adapters(jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(abstract)))
    return base, quant.quantize_base(base), adapters


@functools.partial(jax.jit, static_argnums=0)
def logps(graphdef, params, ids, mask):
    """Per-token log-probs [B, T - 1] of the model (graphdef, params)."""
    return token_logps(nnx.merge(graphdef, params), ids, mask, mask)[0]


def batch(seed=0):
    ids = jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, (3, 10)))
    return ids, jnp.ones_like(ids)


def test_round_trip_is_within_half_a_step_per_channel():
    rng = np.random.default_rng(0)
    for name, (shape, axes) in layer_param_shapes(CFG).items():
        if name not in quant.QUANTIZED:
            continue
        n_in = PROJECTIONS[name].n_in
        w = rng.standard_normal((3, *shape)).astype(np.float32) * np.exp(rng.standard_normal((3, *shape)))
        w[0, ..., 0] = 0.0  # an all-zero channel (layer 0, first output along the last axis)
        q, scale = jax.jit(quant.quantize, static_argnums=1)(w, n_in)
        assert q.dtype == jnp.int8 and scale.dtype == jnp.float32
        assert scale.shape == (3, *quant.scale_shape(name, shape, axes)[0])
        back = np.asarray(jax.jit(quant.dequantize, static_argnums=2)(q, scale, n_in))
        half_step = np.expand_dims(np.asarray(scale), tuple(range(1, 1 + n_in))) / 2
        assert np.all(np.abs(w - back) <= half_step * (1 + 1e-6)), name
        # the absmax of every non-zero channel lands on +-127; the zero channel stays exactly zero
        peak = np.abs(np.asarray(q, np.int32)).max(axis=tuple(range(1, 1 + n_in)))
        assert peak.max() <= 127 and np.all((peak == 127) | (np.asarray(scale) == 0))
        assert np.all(back[0, ..., 0] == 0)


def test_quantized_model_logps_and_storage():
    base, q_base, _ = models()
    # The tree quantize_base makes is the one a Decoder built with quantize_base declares (what
    # build.py's abstract model and its shardings see): same keys, shapes, dtypes.
    q_cfg = dataclasses.replace(CFG, quantize_base=True)
    abstract = nnx.to_pure_dict(nnx.split(nnx.eval_shape(lambda: Decoder(q_cfg, rngs=nnx.Rngs(0))))[1])
    assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract) == jax.tree.map(lambda x: (x.shape, x.dtype), q_base)
    for name in quant.QUANTIZED:
        assert q_base["layers"][name].dtype == jnp.int8 and q_base["layers"][name + quant.SCALE].dtype == jnp.float32
    assert q_base["embed"].dtype == q_base["lm_head"].dtype == q_base["layers"]["attn_norm"].dtype == jnp.float32
    # Bytes of the projections: exactly half of bfloat16, plus float32 scales (4 / fan_in bytes per weight).
    int8_bytes = sum(q_base["layers"][n].nbytes for n in quant.QUANTIZED)
    scale_bytes = sum(q_base["layers"][n + quant.SCALE].nbytes for n in quant.QUANTIZED)
    bf16_bytes = sum(base["layers"][n].size * 2 for n in quant.QUANTIZED)
    assert 2 * int8_bytes == bf16_bytes and 8 * scale_bytes <= int8_bytes  # fan_in >= 32 here
    assert quant.projection_bytes(CFG) == int8_bytes + scale_bytes
    assert quant.projection_bytes(CFG, jnp.bfloat16, quantized=False) == bf16_bytes

    ids, mask = batch()
    plain = np.asarray(logps(graphdef_of(CFG), base, ids, mask))
    quantized = np.asarray(logps(graphdef_of(q_cfg), q_base, ids, mask))
    dequantized = np.asarray(logps(graphdef_of(CFG), quant.dequantize_base(q_base), ids, mask))
    np.testing.assert_allclose(quantized, dequantized, atol=1e-5)  # on-the-fly dequantization is exact
    # int8 against float32 on this model (weights std 0.02; logps ~ -3.9): |d logp| per token < 3e-3
    # (measured: max 9.5e-4, mean 3.7e-4; bfloat16 weights give about the same).
    assert 0 < np.abs(quantized - plain).max() < 3e-3


def test_int8_matmul_gradients_are_those_of_the_dequantized_weight():
    """The rematerialized int8 matmul: the gradient to x (which carries the adapters' gradients to the
    layers below) equals the dense one's; the int8 values take none."""
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((6, 4, 8)).astype(np.float32), rng.standard_normal((8, 2, 5)).astype(np.float32)
    q, scale = quant.quantize(w[None], 1)
    dense = quant.dequantize(q, scale, 1)[0]

    def f(x, q):
        return jnp.sum(jnp.sin(_linear(x, q, None, jnp.float32, 1, scale[0])))

    value, (gx, gq) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), allow_int=True))(x, q[0])
    want, want_gx = jax.value_and_grad(lambda x: jnp.sum(jnp.sin(_linear(x, dense, None, jnp.float32))))(x)
    np.testing.assert_allclose(value, want, atol=1e-5)
    np.testing.assert_allclose(gx, want_gx, rtol=1e-5, atol=1e-6)
    assert gq.dtype == jax.dtypes.float0


def test_gradients_reach_the_adapters_not_the_int8_base():
    _, q_base, adapters = models()
    q_graphdef = graphdef_of(dataclasses.replace(CFG, quantize_base=True, **LORA))
    ids, mask = batch(1)

    def loss(adapters, base):
        return token_logps(nnx.merge(q_graphdef, lora.join_adapters(base, adapters)), ids, mask, mask)[0].sum()

    grads, base_grads = jax.jit(jax.grad(loss, argnums=(0, 1), allow_int=True))(adapters, q_base)
    for key, g in grads["layers"].items():
        assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, key
    for name in quant.QUANTIZED:  # the int8 leaves take no gradient (float0: no tangent space)
        assert base_grads["layers"][name].dtype == jax.dtypes.float0

    # Export: merged into the dequantized base, a plain tree that equals the adapted int8 model.
    merged = jax.jit(lora.merged_weights, static_argnums=2)(q_base, adapters, LORA["lora_alpha"] / LORA["lora_rank"])
    assert not quant.is_quantized(merged) and merged["layers"]["wq"].dtype == jnp.float32
    ours = logps(q_graphdef, lora.join_adapters(q_base, adapters), ids, mask)
    np.testing.assert_allclose(logps(graphdef_of(CFG), merged, ids, mask), ours, atol=1e-5)
    assert np.abs(np.asarray(ours) - np.asarray(logps(q_graphdef, lora.join_adapters(
        q_base, jax.tree.map(jnp.zeros_like, adapters)), ids, mask))).max() > 1e-3


def test_load_hf_quantized_on_two_device_meshes(tmp_path):
    base, q_base, _ = models()
    q_graphdef = graphdef_of(dataclasses.replace(CFG, quantize_base=True))
    save_hf(nnx.merge(graphdef_of(CFG), base), str(tmp_path / "float"))
    loaded = nnx.to_pure_dict(nnx.split(load_hf(str(tmp_path / "float"), quantize_base=True))[1])
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), loaded, q_base))
    ids, mask = batch(2)
    reference = np.asarray(logps(q_graphdef, q_base, ids, mask))

    devices = jax.devices()[:2]
    for shape, wq, wq_scale, wo_scale in [
            ((1, 2, 1), P(None, "fsdp", None, None), P(None, None, None), P(None, "fsdp")),
            ((1, 1, 2), P(None, None, "tensor", None), P(None, "tensor", None), P(None, None))]:
        mesh = sharding.make_mesh(shape, devices)
        layers = load_hf(str(tmp_path / "float"), mesh=mesh, quantize_base=True).layers
        assert layers.wq[...].dtype == jnp.int8
        for array, spec in ((layers.wq, wq), (layers.wq_scale, wq_scale), (layers.wo_scale, wo_scale)):
            assert array[...].sharding.is_equivalent_to(NamedSharding(mesh, spec), array[...].ndim)
        # The rules applied to the quantized tree (what build.py does) give the same placement.
        shardings = nnx.to_pure_dict(sharding.model_shardings(nnx.split(nnx.eval_shape(
            lambda: Decoder(dataclasses.replace(CFG, quantize_base=True), rngs=nnx.Rngs(0))))[1], mesh))
        placed = jax.device_put(q_base, shardings)
        for key, value in placed["layers"].items():
            assert value.sharding == getattr(layers, key)[...].sharding, key
        np.testing.assert_allclose(np.asarray(logps(q_graphdef, placed, ids, mask)), reference, atol=1e-5)

    # save_hf writes the dequantized weights: loading them back gives the int8 model's log-probs.
    save_hf(nnx.merge(q_graphdef, q_base), str(tmp_path / "export"))
    again = nnx.to_pure_dict(nnx.split(load_hf(str(tmp_path / "export")))[1])
    assert again["layers"]["wq"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logps(graphdef_of(CFG), again, ids, mask)), reference, atol=1e-5)
