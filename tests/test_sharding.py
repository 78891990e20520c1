"""Mesh construction, logical-axis rules, and loading a checkpoint straight onto an 8-device mesh."""
import jax
import numpy as np
import pytest
import tiny_hf
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bco_jax import sharding
from bco_jax.models import load_hf, sequence_logps


def test_make_mesh_fills_minus_one():
    mesh = sharding.make_mesh((2, -1, 1))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert dict(sharding.make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match="devices"):
        sharding.make_mesh((3, -1, 1))
    with pytest.raises(ValueError, match="at most one"):
        sharding.make_mesh((-1, -1, 1))


def test_mesh_spec_maps_and_drops_non_dividing_axes():
    mesh = sharding.make_mesh((2, 2, 2))
    assert sharding.mesh_spec(("layers", "embed", "q_heads", "head_dim"), mesh) == P(None, "fsdp", "tensor", None)
    assert sharding.mesh_spec(("batch", "length"), mesh) == P(("data", "fsdp"), None)
    assert sharding.mesh_spec(("vocab", "embed"), mesh, shape=(7, 64)) == P(None, "fsdp")
    # a custom table: pure data parallel replicates every parameter
    rules = [(name, None) for name, _ in sharding.LOGICAL_RULES]
    assert sharding.mesh_spec(("vocab", "embed"), mesh, rules) == P(None, None)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("mesh_llama"))
    tiny_hf.build("llama3", folder)
    return folder


def test_load_onto_mesh_gives_same_logits(checkpoint):
    mesh = sharding.make_mesh((2, 2, 2))
    single = load_hf(checkpoint)
    sharded = load_hf(checkpoint, mesh=mesh)
    assert sharded.layers.wq[...].sharding == NamedSharding(mesh, P(None, "fsdp", "tensor", None))
    assert sharded.embed[...].sharding == NamedSharding(mesh, P("tensor", "fsdp"))
    shard_shape = sharded.layers.w_gate[...].addressable_shards[0].data.shape
    assert shard_shape == (2, 32, 48)  # [layers, embed / fsdp, mlp / tensor]

    ids, mask = tiny_hf.padded_batch(seed=11, batch=4)
    graphdef, state = nnx.split(sharded)
    batch_sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
    fn = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m))
    got = fn(state, jax.device_put(ids, batch_sharding), jax.device_put(mask, batch_sharding))
    np.testing.assert_allclose(np.asarray(got), np.asarray(single(ids, mask)), atol=1e-5)
    with jax.set_mesh(mesh):  # activations pinned to the batch axes inside the mesh context
        pinned = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m))(state, ids, mask)
    np.testing.assert_allclose(np.asarray(pinned), np.asarray(got), atol=1e-5)
    # what the train step does: log-probs and their gradient of the merged, sharded state
    loss_mask = jax.device_put(mask, batch_sharding)
    logps_fn = jax.jit(jax.value_and_grad(
        lambda s, i, m: sequence_logps(nnx.merge(graphdef, s), i, m, m, chunk_tokens=16)[0].sum()))
    value, grads = logps_fn(state, jax.device_put(ids, batch_sharding), loss_mask)
    want = sequence_logps(single, ids, mask, mask)[0].sum()
    np.testing.assert_allclose(value, want, rtol=1e-5)
    wq_sharding = sharded.layers.wq[...].sharding
    assert grads["layers"]["wq"][...].sharding.is_equivalent_to(wq_sharding, 4)  # gradients stay sharded


def test_model_shardings_cover_every_param(checkpoint):
    mesh = sharding.make_mesh((1, 4, 2))
    _, state = nnx.split(load_hf(checkpoint))
    shardings = sharding.model_shardings(state, mesh)
    flat = nnx.to_flat_state(shardings)
    assert len(flat) == len(nnx.to_flat_state(state))
    placed = jax.device_put(state, shardings)
    for (path, var), (_, s) in zip(nnx.to_flat_state(placed), flat):
        assert var[...].sharding == s, path


def test_save_from_mesh_round_trips(checkpoint, tmp_path):
    from bco_jax.models import save_hf
    sharded = load_hf(checkpoint, mesh=sharding.make_mesh((1, 4, 2)))
    save_hf(sharded, str(tmp_path))
    again = load_hf(str(tmp_path))
    for name in ("wq", "wo", "w_down"):
        np.testing.assert_array_equal(np.asarray(getattr(again.layers, name)[...]),
                                      np.asarray(getattr(sharded.layers, name)[...]))
