"""Checkpoints: exact round trips (keys included), other meshes, pruning, atomicity, reference identity."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from bco_jax import udm
from bco_jax.checkpoint import Checkpointer
from bco_jax.resume import REFERENCE_FINGERPRINT, REFERENCE_PATH, check_reference, params_fingerprint


def _mesh(shape, names):
    return Mesh(np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape), names)


def _state(mesh):
    """A TrainState-like pytree, data-sharded on `mesh`."""
    row = NamedSharding(mesh, P("data"))
    rep = NamedSharding(mesh, P())
    put = jax.device_put
    return {
        "step": put(jnp.int32(7), rep),
        "params": {"w": put(jnp.arange(16 * 8, dtype=jnp.float32).reshape(16, 8) / 7, row),
                   "ref_bf16": put(jnp.linspace(-3, 3, 8 * 4, dtype=jnp.bfloat16).reshape(8, 4), row)},
        "counts": put(jnp.arange(8, dtype=jnp.int32) - 3, row),
        "rng": put(jax.random.key(42), rep),
        "rngs": put(jax.random.split(jax.random.key(1, impl="rbg"), 8), row),
    }


def _abstract(state, to_sharding):
    """Abstract copy of `state` whose leaves land on `to_sharding(leaf)`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=to_sharding(x)), state)


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert jax.random.key_impl(x) == jax.random.key_impl(y)
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


EXTRAS = {"data": {"position": 123, "seed": 0}, "config": {"beta": 0.1, "mesh": [8, 1, 1]},
          REFERENCE_PATH: "/models/ref", REFERENCE_FINGERPRINT: "sha256:abc"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    state = _state(_mesh((8,), ("data",)))
    with Checkpointer(out) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(7, state, EXTRAS)
        assert not ckpt.save(7, state, EXTRAS)  # an existing step is not rewritten
    return out, state


def test_round_trip_same_mesh(saved):
    out, state = saved
    with Checkpointer(out) as ckpt:
        assert ckpt.latest_step() == 7
        restored, extras = ckpt.restore(7, _abstract(state, lambda x: x.sharding))
    _assert_same(state, restored)
    assert extras == EXTRAS
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        assert y.sharding == x.sharding
    # The restored keys are live keys: they draw the same numbers.
    np.testing.assert_array_equal(jax.random.normal(state["rng"], (3,)),
                                  jax.random.normal(restored["rng"], (3,)))


@pytest.mark.parametrize("target", ["mesh_2x4", "single_device"])
def test_restore_onto_other_mesh(saved, target):
    out, state = saved
    if target == "mesh_2x4":
        mesh = _mesh((2, 4), ("data", "fsdp"))
        specs = {"step": P(), "params": {"w": P("data", "fsdp"), "ref_bf16": P("fsdp", None)},
                 "counts": P("fsdp"), "rng": P(), "rngs": P("fsdp")}
        shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                                 is_leaf=lambda s: isinstance(s, P))
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                state, shardings)
    else:
        abstract = _abstract(state, lambda x: SingleDeviceSharding(jax.devices()[3]))
    with Checkpointer(out) as ckpt:
        restored, _ = ckpt.restore(7, abstract)
    _assert_same(state, restored)
    for a, x in zip(jax.tree.leaves(abstract), jax.tree.leaves(restored)):
        assert x.sharding.is_equivalent_to(a.sharding, x.ndim)


def test_keep_last_n_and_none_keeps_all(tmp_path):
    state = {"x": jnp.arange(4.0)}
    with Checkpointer(tmp_path / "a", save_total_limit=2) as ckpt:
        for step in (10, 20, 30, 40):
            ckpt.save(step, state, {"step": step})
        ckpt.wait()
        assert ckpt.all_steps() == [30, 40]
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir() if p.name.isdigit()) \
        == ["30", "40"]
    with Checkpointer(tmp_path / "b") as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, state, {})
    assert Checkpointer(tmp_path / "b").all_steps() == [1, 2, 3]
    with pytest.raises(ValueError, match="save_total_limit"):
        Checkpointer(tmp_path / "c", save_total_limit=0)


def test_unfinished_checkpoint_is_ignored(tmp_path):
    state = {"x": jnp.arange(4.0), "k": jax.random.key(0)}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, state, {"data": 3})
    # What a run killed mid-save leaves: Orbax's tmp folder for a later step, never renamed.
    tmp = tmp_path / "checkpoints" / "9.orbax-checkpoint-tmp-1700000000000000"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "partial").write_bytes(b"\0" * 10)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 3
        assert ckpt.all_steps() == [3]
        with pytest.raises(FileNotFoundError, match="step 9"):
            ckpt.restore(9, state)
        restored, extras = ckpt.restore(ckpt.latest_step(), state)  # concrete arrays work as abstract
    _assert_same(state, restored)
    assert extras == {"data": 3}


def test_close_waits_for_async_save(tmp_path):
    big = {"w": jnp.ones((512, 1024), jnp.float32) * 3}  # 2 MiB: the write outlives save()
    expected = jax.tree.map(np.asarray, big)
    ckpt = Checkpointer(tmp_path, async_save=True)
    ckpt.save(1, big, {"a": 1})
    big["w"].delete()  # what donating the state to the next train step does: save must not need it
    ckpt.close()
    names = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert "1" in names and not any("tmp" in n for n in names)
    with Checkpointer(tmp_path) as again:
        one_device = SingleDeviceSharding(jax.devices()[0])
        restored, extras = again.restore(1, _abstract(expected, lambda x: one_device))
    _assert_same(expected, restored)
    assert extras == {"a": 1}


def test_udm_params_and_bad_extras(tmp_path):
    rng = np.random.default_rng(0)
    params = udm.fit_prompt_classifier(rng.normal(size=(64, 8)) + 1, rng.normal(size=(32, 8)))
    replicated = NamedSharding(_mesh((8,), ("data",)), P())
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(TypeError):
            ckpt.save(1, {"udm": params}, {"bad": object()})
        ckpt.save(1, {"udm": params}, {})
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                                {"udm": udm.abstract_params(8)})
        restored, _ = ckpt.restore(1, abstract)
    _assert_same({"udm": params}, restored)


def _hf_folder(path, weight_bytes):
    path.mkdir()
    (path / "model-00001-of-00001.safetensors").write_bytes(weight_bytes)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    (path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    (path / "tokenizer.json").write_text("{}")
    return path


def test_params_fingerprint(tmp_path):
    weights = bytes(range(256)) * 5000  # > 1 MiB: several streamed blocks
    folder = _hf_folder(tmp_path / "ref", weights)
    fp = params_fingerprint(folder)
    assert fp.startswith("sha256:") and len(fp) == 7 + 64
    assert params_fingerprint(_hf_folder(tmp_path / "copy", weights)) == fp  # content, not location
    (folder / "tokenizer.json").write_text('{"changed": true}')
    assert params_fingerprint(folder) == fp  # tokenizer is not part of the weights
    flipped = bytearray(weights)
    flipped[1_200_000] ^= 1
    (folder / "model-00001-of-00001.safetensors").write_bytes(bytes(flipped))
    assert params_fingerprint(folder) != fp
    (tmp_path / "copy" / "config.json").write_text(json.dumps({"hidden_size": 9}))
    assert params_fingerprint(tmp_path / "copy") != fp
    assert params_fingerprint(folder / "model-00001-of-00001.safetensors").startswith("sha256:")
    with pytest.raises(FileNotFoundError):
        params_fingerprint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        params_fingerprint(tmp_path / "empty")


def test_check_reference():
    extras = {REFERENCE_FINGERPRINT: "sha256:aaa", REFERENCE_PATH: "/models/ref"}
    check_reference(extras, "sha256:aaa")
    with pytest.raises(ValueError) as err:
        check_reference(extras, "sha256:bbb")
    msg = str(err.value)
    assert "sha256:aaa" in msg and "sha256:bbb" in msg and "/models/ref" in msg and "\n" not in msg
    with pytest.raises(ValueError, match="None"):
        check_reference({}, "sha256:bbb")


def test_a_checkpoint_unreadable_on_another_process_is_abandoned_by_all(tmp_path, monkeypatch):
    """`agreed` is the all-gather every process answers after reading a step: one process's failure
    (stood in for here: it answers False for step 2 after this process read it fine) makes every
    process fall back to step 1, so none restores a step the others abandoned (a hang)."""
    import bco_jax.checkpoint as ckpt_lib

    state = {"x": jnp.arange(4.0)}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, {"step": 1})
        ckpt.save(2, {"x": jnp.arange(4.0) + 1}, {"step": 2})
    answers = iter([False, True, True])  # step 2's metadata: not everywhere; step 1: metadata, arrays
    monkeypatch.setattr(ckpt_lib, "agreed", lambda ok: ok and next(answers))
    with Checkpointer(tmp_path) as ckpt:
        step, restored, extras = ckpt.restore_latest(state)
    assert step == 1 and extras == {"step": 1}
    np.testing.assert_array_equal(np.asarray(restored["x"]), np.arange(4.0))
    assert (tmp_path / "checkpoints" / "2.corrupt").is_dir()
