"""Decoder logits equal transformers PyTorch float32 for each family, left and right padding."""
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_hf
from flax import nnx

from bco_jax import sharding
from bco_jax.models import (
    Decoder,
    ModelConfig,
    attention,
    compute_dtype,
    decays,
    load_hf,
    read_config,
    weight_decay_mask,
)

TOL = 1e-4


def replace_config(model, **changes):
    """The same weights under a changed ModelConfig field."""
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, state)
    model.config = dataclasses.replace(model.config, **changes)
    return model


@pytest.fixture(scope="module", params=sorted(tiny_hf.FAMILIES))
def family(request, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp(request.param))
    torch_model = tiny_hf.build(request.param, folder)
    return request.param, folder, torch_model, load_hf(folder)


def jitted_logits(model):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, ids, mask: nnx.merge(graphdef, s)(input_ids=ids, attention_mask=mask)), state


@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_match_transformers(family, side):
    name, _, torch_model, model = family
    ids, mask = tiny_hf.padded_batch(seed=1, side=side, length=12)  # 12 > Mistral's window of 4
    expected = tiny_hf.torch_logits(torch_model, ids, mask)
    fn, state = jitted_logits(model)
    got = np.asarray(fn(state, ids, mask))
    real = mask.astype(bool)
    diff = np.abs(got - expected)[real].max()
    assert diff < TOL, f"{name} {side}: max |logit diff| {diff:.2e}"
    if model.config.sliding_window:  # the inputs are longer than the window: dropping it must matter
        no_window = np.asarray(replace_config(model, sliding_window=None, layer_types=())(ids, mask))
        assert np.abs(no_window - expected)[real].max() > 1e-2


def test_padding_side_does_not_change_real_logits(family):
    _, _, _, model = family
    left_ids, left_mask = tiny_hf.padded_batch(seed=2, side="left")
    right_ids, right_mask = np.zeros_like(left_ids), np.zeros_like(left_mask)
    for b in range(len(left_ids)):  # the same tokens, moved to the start of the row
        real = left_ids[b][left_mask[b] == 1]
        right_ids[b, :len(real)], right_mask[b, :len(real)] = real, 1
    fn, state = jitted_logits(model)
    left = np.asarray(fn(state, left_ids, left_mask))[left_mask.astype(bool)]
    right = np.asarray(fn(state, right_ids, right_mask))[right_mask.astype(bool)]
    np.testing.assert_allclose(left, right, atol=1e-5)


def test_config_fields(family):
    name, folder, _, model = family
    cfg = model.config
    assert cfg.num_kv_heads == (4 if name == "llama_tied" else 2)
    assert cfg.sliding_window == (4 if name in ("mistral", "qwen3", "gemma3") else None)
    assert cfg.sliding_layers() == {"mistral": (True, True), "qwen3": (False, True),
                                    "gemma3": (True, False)}.get(name, (False, False))
    assert cfg.qkv_bias == (name in ("qwen2", "llama_tied"))
    assert cfg.tie_word_embeddings == (name in ("qwen2", "qwen3", "gemma3", "llama_tied"))
    assert cfg.qk_norm == (name in ("qwen3", "gemma3"))
    assert cfg.sandwich_norms == cfg.scale_embeddings == (cfg.norm_weight_offset == 1.0) == (name == "gemma3")
    assert hasattr(model, "lm_head") != cfg.tie_word_embeddings
    if name == "llama3":
        assert cfg.rope_type == "llama3" and cfg.eos_token_ids == (1, 2)
    if name == "gemma3":
        assert (cfg.rope_type, cfg.rope_factor, cfg.rope_theta, cfg.rope_local_theta) == ("linear", 2.0, 1000.0, 50.0)
        assert cfg.hidden_act == "gelu_pytorch_tanh"
        assert (cfg.query_pre_attn_scalar, cfg.final_logit_softcapping) == (24, 3.0)


def test_transformers4_config_form_reads_the_same(family):
    """4.x wrote rope_theta + rope_scaling at the top level; 5 writes rope_parameters. Gemma 3 on the
    Hub: the global RoPE so, the sliding layers' base in rope_local_base_freq, the layer kinds as a
    sliding_window_pattern."""
    name, folder, _, model = family
    hf = json.loads(read_config(folder).hf_config_json)
    rope = hf.pop("rope_parameters")
    if name == "gemma3":
        hf["rope_local_base_freq"] = rope.pop("sliding_attention")["rope_theta"]
        rope = rope.pop("full_attention")
        del hf["layer_types"]
        hf["sliding_window_pattern"] = 2
    hf["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type", "default") != "default":
        rope["type"] = rope.pop("rope_type")
        hf["rope_scaling"] = rope
    old = read_config(hf)
    new = model.config
    fields = ("rope_theta", "rope_type", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
              "rope_original_max_positions", "num_kv_heads", "head_dim", "sliding_window", "layer_types",
              "rope_local_theta")
    assert {f: getattr(old, f) for f in fields} == {f: getattr(new, f) for f in fields}


def test_hidden_states_and_params_carry_logical_axes(family):
    _, _, _, model = family
    ids, mask = tiny_hf.padded_batch(seed=3)
    graphdef, state = nnx.split(model)
    h = jax.jit(lambda s: nnx.merge(graphdef, s).hidden_states(input_ids=ids, attention_mask=mask))(state)
    assert h.shape == (*ids.shape, model.config.hidden_size)
    _, state = nnx.split(model)
    for path, var in nnx.to_flat_state(state):
        axes = var.get_metadata()["out_sharding"]
        assert len(axes) == var[...].ndim, path
        assert all(isinstance(a, str) for a in axes), path


GEMMA_TRAITS = dict(qk_norm=True, sandwich_norms=True, norm_weight_offset=1.0, scale_embeddings=True,
                    hidden_act="gelu_pytorch_tanh", query_pre_attn_scalar=12.0, final_logit_softcapping=10.0,
                    sliding_window=3, layer_types=("sliding_attention", "full_attention"), rope_local_theta=100.0)


def tiny_config(**kw):
    return ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=8, **kw)


@pytest.mark.parametrize("traits", [{}, "gemma3"], ids=["llama", "gemma3"])
def test_remat_policies_give_the_same_gradients(traits):
    traits = GEMMA_TRAITS if traits == "gemma3" else traits  # the mixed layers' lax.cond under jax.checkpoint
    ids = jnp.array([[0, 0, 5, 6, 7, 8], [3, 4, 5, 6, 7, 8]])
    mask = jnp.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    grads = {}
    for policy in ("none", "full", "save_dots"):
        model = Decoder(tiny_config(remat=policy, **traits), rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)

        def loss(s):
            logits = nnx.merge(graphdef, s)(ids, mask)
            return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * mask)

        grads[policy] = jax.jit(jax.grad(loss))(state)
    for policy in ("full", "save_dots"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     grads["none"], grads[policy])


@pytest.mark.parametrize("traits", [{}, GEMMA_TRAITS], ids=["llama", "gemma3"])
def test_bfloat16_compute_is_close_to_float32(traits):
    model = Decoder(tiny_config(**traits), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    @jax.jit
    def both(s, ids):
        f32, bf16 = nnx.merge(graphdef, s), nnx.merge(graphdef, s)
        bf16.dtype = jnp.dtype(jnp.bfloat16)
        return f32(ids), bf16(ids)

    f32, bf16 = both(state, jnp.array([[1, 2, 3, 4, 5, 6]]))
    assert bf16.dtype == jnp.float32  # logits stay float32
    np.testing.assert_allclose(bf16, f32, atol=5e-2)


def test_bad_options_name_the_key():
    with pytest.raises(ValueError, match="remat"):
        tiny_config(remat="sometimes")
    with pytest.raises(ValueError, match=r"attn_implementation must be one of \('auto', 'xla', 'cudnn', 'splash'\)"):
        tiny_config(attn_implementation="flash")


def test_attention_impl_is_a_deprecated_alias(tmp_path):
    folder = str(tmp_path)
    tiny_hf.build("llama3", folder)
    with pytest.warns(DeprecationWarning, match="attn_implementation"):
        assert read_config(folder, attention_impl="xla").attn_implementation == "xla"
    with pytest.warns(DeprecationWarning):
        assert load_hf(folder, attention_impl=None).config.attn_implementation == "auto"


def test_compute_dtype():
    assert compute_dtype() == jnp.float32  # tests run on CPU
    assert compute_dtype("bfloat16") == jnp.bfloat16
    assert Decoder(tiny_config(), rngs=nnx.Rngs(0)).dtype == compute_dtype()


def test_weight_decay_follows_logical_axes():
    """As transformers: matrices and embeddings decay, norm scales and biases do not; init follows."""
    model = Decoder(tiny_config(qkv_bias=True, o_bias=True, mlp_bias=True), rngs=nnx.Rngs(0))
    _, state = nnx.split(model)
    mask = weight_decay_mask(state)
    assert jax.tree.structure(mask) == jax.tree.structure(nnx.to_pure_dict(state))
    flat = {"/".join(map(str, path)): flag for path, flag in nnx.to_flat_state(nnx.State(mask))}
    no_decay = {"final_norm", "layers/attn_norm", "layers/mlp_norm", "layers/bq", "layers/bk", "layers/bv",
                "layers/bo", "layers/b_gate", "layers/b_up", "layers/b_down"}
    assert {name for name, flag in flat.items() if not flag} == no_decay
    assert len(flat) == len(no_decay) + 9  # embed, lm_head, 4 attention and 3 MLP matrices
    assert decays(("vocab", "embed")) and not decays(("layers", "norm")) and not decays(("q_heads", "head_dim"))
    assert decays(("layers", "lora", "q_heads", "head_dim"))  # a LoRA factor is a matrix, as in PEFT + HF Trainer
    values = {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}
    assert (values["layers/attn_norm"] == 1).all() and (values["layers/bo"] == 0).all()
    assert 0.01 < values["layers/wq"].std() < 0.03



def test_program_size_does_not_grow_with_depth():
    """Layers are scanned: 2 and 16 layers lower to the same program, up to the constants' shapes."""
    sizes = []
    for layers in (2, 16):
        cfg = dataclasses.replace(tiny_config(), num_layers=layers)
        graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
        text = jax.jit(lambda s: nnx.merge(graphdef, s)(jnp.ones((1, 4), jnp.int32))).lower(state).as_text()
        sizes.append(len(text))
    assert abs(sizes[1] - sizes[0]) < 0.02 * sizes[0]


# ------------------------------------------------------------------------------------ attention kernels


def qkv(B=3, T=13, N=4, K=2, H=8, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (B, T, N, H)), jax.random.normal(keys[1], (B, T, K, H)),
            jax.random.normal(keys[2], (B, T, K, H)))


def padding(B, T, side):
    """Row 0 full, row 1 a few pads, row 2 mostly padding."""
    lengths = [T, T - 3, 2][:B]
    index = np.arange(T)[None]
    n = np.array(lengths)[:, None]
    return jnp.asarray(index < n if side == "right" else index >= T - n, jnp.int32)


SCALE = 0.3  # not head_dim ** -0.5: every kernel must take the scale it is given (Gemma's query_pre_attn_scalar)


def dense_reference(q, k, v, valid, window, scale=SCALE):
    mask = attention.attention_mask(valid, jnp.arange(q.shape[1]), window)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")


def assert_same_attention(kernel, valid, window, T, atol=1e-5):
    """Equal outputs on real queries, and equal gradients, to XLA's dense masked attention, both with
    scores scaled by SCALE."""
    kernel = functools.partial(lambda f, *a: f(*a, SCALE), kernel)
    q, k, v = qkv(T=T)
    real = np.asarray(valid, bool)
    weights = jnp.sin(jnp.arange(q.size).reshape(q.shape)) * valid[:, :, None, None]  # real queries only

    def loss(f):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(f(q, k, v, valid, window) * weights), (0, 1, 2)))

    np.testing.assert_allclose(np.asarray(kernel(q, k, v, valid, window))[real],
                               np.asarray(dense_reference(q, k, v, valid, window))[real], atol=atol)
    (got, got_grads), (want, want_grads) = loss(kernel)(q, k, v), loss(dense_reference)(q, k, v)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, b in zip(got_grads, want_grads):
        np.testing.assert_allclose(a, b, atol=atol)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("window", [None, 4])
def test_blocked_xla_attention_equals_dense(side, window):
    """Blocks of 4 queries over 13 tokens: a partial last block, windows that drop whole key blocks."""
    def kernel(*a):
        return attention.xla_causal(*a, block=4)

    assert_same_attention(kernel, padding(3, 13, side), window, T=13)


@pytest.mark.parametrize("side, window, T", [("right", None, 12), ("left", 4, 12), ("right", 5, 200)])
def test_splash_attention_equals_dense(side, window, T):
    """Pallas interpret mode on CPU; T = 200 is padded to one 256-block."""
    assert_same_attention(attention.splash_causal, padding(3, T, side), window, T=T, atol=2e-5)


def test_splash_attention_under_a_mesh_runs_per_batch_shard():
    q, k, v = qkv(B=4, T=12)
    valid = jnp.concatenate([padding(3, 12, "right"), jnp.ones((1, 12), jnp.int32)])
    want = dense_reference(q, k, v, valid, None)
    with jax.set_mesh(sharding.make_mesh((2, 2, 2))):
        got = jax.jit(attention.splash_causal, static_argnums=(4, 5))(q, k, v, valid, None, SCALE)
    real = np.asarray(valid, bool)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-5)


@pytest.mark.parametrize("implementation", ["xla", "splash"])
def test_decoder_logits_do_not_depend_on_the_kernel(family, implementation):
    name, _, torch_model, model = family
    ids, mask = tiny_hf.padded_batch(seed=1, side="right", length=12)
    expected = tiny_hf.torch_logits(torch_model, ids, mask)
    got = np.asarray(replace_config(model, attn_implementation=implementation)(ids, mask))
    assert np.abs(got - expected)[mask.astype(bool)].max() < TOL, name


def test_auto_picks_the_kernel_by_backend(monkeypatch):
    assert attention.resolve("auto", jnp.float32) == "xla"  # CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert attention.resolve("auto", jnp.bfloat16) == "cudnn"
    assert attention.resolve("auto", jnp.float32) == "xla"  # cuDNN flash attention needs 16-bit inputs
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert attention.resolve("auto", jnp.float32) == "splash"
    assert attention.resolve("xla", jnp.bfloat16) == "xla"
