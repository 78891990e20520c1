"""The embedding and LM head under FSDP: no device holds a whole [D, V] matrix of them (weight or
gradient, float32 or bfloat16), read from the compiled program on 8 simulated devices, and the
vocabulary-parallel head gives the values and gradients of the unsharded one."""
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bco_jax import sharding
from bco_jax.models import Decoder, ModelConfig, sequence_logps
from bco_jax.models.logprobs import vocab_parallel_rules


def config(vocab, hidden, **kw):
    return ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_layers=1,
                       num_heads=4, num_kv_heads=2, head_dim=16, **kw)


def test_no_device_holds_a_whole_head_or_embedding():
    """fsdp=8, bfloat16 compute on float32 parameters, 8 chunks: before the head was vocabulary-parallel
    each chunk gathered the float32 [D, V] weight onto every device and reduced a full [D, V] gradient
    (f32 and bf16 [D, V] buffers in the program; temporaries 11.05 MiB, now 3.06, the head is 4 MiB)."""
    D, V, B, T = 64, 16384, 16, 64
    cfg = config(V, D)
    mesh = sharding.make_mesh((1, 8, 1))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)))
    shardings = nnx.to_pure_dict(sharding.model_shardings(state, mesh))
    params = sharding.abstract_on(nnx.to_pure_dict(state), shardings)
    ids = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=NamedSharding(mesh, P(("data", "fsdp"))))

    def loss(p, ids):
        return sequence_logps(nnx.merge(graphdef, p), ids, ids, ids, chunk_tokens=8)[0].sum()

    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.grad(loss), out_shardings=shardings).lower(params, ids).compile()
    whole = re.compile(rf"\b(f32|bf16)\[({D},{V}|{V},{D})\]")
    found = sorted({m.group(0) for m in whole.finditer(compiled.as_text())})
    head_bytes = D * V * 4
    temp = compiled.memory_analysis().temp_size_in_bytes
    print(f"temporaries {temp / 2**20:.2f} MiB, the whole float32 head {head_bytes / 2**20:.2f} MiB")
    assert not found, f"whole [D, V] head / embedding buffers on a device: {found}"
    assert temp < head_bytes, (temp, head_bytes)


def test_vocab_parallel_rules_move_fsdp_onto_the_vocabulary_where_it_divides():
    with jax.set_mesh(sharding.make_mesh((2, 4, 1))):
        rules = dict(vocab_parallel_rules(128))
        assert rules["batch"] == ("data",) and rules["vocab"] == ("tensor", "fsdp") and rules["embed"] is None
        assert vocab_parallel_rules(102) is None  # 4 does not divide 102: XLA's layout
    with jax.set_mesh(sharding.make_mesh((8, 1, 1))):
        assert vocab_parallel_rules(128) is None  # nothing to move
    assert vocab_parallel_rules(128) is None  # no mesh


def test_vocabulary_parallel_head_matches_unsharded():
    """Tied (the head is the embedding's transpose: both layouts meet in one gradient) and scaled."""
    cfg = config(128, 32, tie_word_embeddings=True, scale_embeddings=True)
    graphdef, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(1), dtype=jnp.float32))
    rng = np.random.default_rng(3)
    ids = rng.integers(0, cfg.vocab_size + 1, size=(4, 24)).astype(np.int32)  # id V: an added [PAD]
    mask = np.ones_like(ids)
    mask[1, 18:] = 0
    loss_mask = np.zeros_like(ids)
    loss_mask[:, 9:] = 1

    def loss(s):
        logps, _ = sequence_logps(nnx.merge(graphdef, s), ids, mask, loss_mask, completion_capacity=16,
                                  chunk_tokens=4)
        return jnp.sum(logps * jnp.arange(1, 5)), logps

    fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (_, want), g_want = fn(state)
    with jax.set_mesh(sharding.make_mesh((2, 4, 1))):
        (_, got), g_got = fn(state)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g_got, g_want)
