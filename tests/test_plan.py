"""The memory planner: parameter counts against the paper-scale config, one real compile through the CLI, and
the online loop's sampling (KV cache) counted beside training."""
import json
import math
import os
import subprocess
import sys

import jax
import pytest

from bco_jax import plan, plan_sampling
from bco_jax.models import attention, read_config
from bco_jax.sharding import make_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(ROOT, "experiments", "recipes")

LLAMA_31_8B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    hidden_act="silu", rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192),
    attention_bias=False, mlp_bias=False, tie_word_embeddings=False, bos_token_id=128000,
    eos_token_id=[128001, 128008, 128009])
TINY = dict(LLAMA_31_8B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def test_llama_8b_parameter_count_analytic_equals_abstract_model():
    cfg = read_config(LLAMA_31_8B)
    (_, param_state), _ = plan.abstract_models(cfg, "bfloat16", "bfloat16")
    abstract = sum(math.prod(x.shape) for x in jax.tree.leaves(param_state))
    assert plan.analytic_parameter_count(cfg) == abstract == 8_030_261_248


# The text decoder's parameters as published (Gemma: the vision-language checkpoint's text tower).
RECIPE_COUNTS = {"Qwen3-8B": 8_190_735_360, "gemma-3-4b-it": 3_880_263_168, "gemma-3-12b-it": 11_766_034_176}


@pytest.mark.parametrize("name", sorted(RECIPE_COUNTS))
def test_qk_and_sandwich_norm_families_count_analytic_equals_abstract_model(name):
    cfg = read_config(os.path.join(RECIPES, "models", name))
    (_, param_state), _ = plan.abstract_models(cfg, "bfloat16", "bfloat16")
    abstract = sum(math.prod(x.shape) for x in jax.tree.leaves(param_state))
    assert plan.analytic_parameter_count(cfg) == abstract == RECIPE_COUNTS[name]


@pytest.mark.parametrize("overrides", [dict(tie_word_embeddings=True), dict(attention_bias=True, mlp_bias=True),
                                       dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"]),
                                       dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"]),
                                       dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"],
                                            sliding_window=8, tie_word_embeddings=True),
                                       dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"],
                                            layer_types=["sliding_attention", "full_attention"], sliding_window=8,
                                            tie_word_embeddings=False)])
def test_analytic_count_follows_ties_and_biases(overrides):
    cfg = read_config(dict(TINY, **overrides))
    (_, param_state), _ = plan.abstract_models(cfg, "float32", "float32")
    assert plan.analytic_parameter_count(cfg) == sum(math.prod(x.shape) for x in jax.tree.leaves(param_state))


@pytest.mark.parametrize("text, expected", [("16GiB", 16 * 2**30), ("80 GB", 80 * 10**9), ("512MiB", 2**29),
                                            ("1.5GiB", 3 * 2**29), ("1000", 1000)])
def test_parse_bytes(text, expected):
    assert plan.parse_bytes(text) == expected


def test_search_finds_the_largest_that_fits():
    calls = []

    def fits(rows):
        calls.append(rows)
        return rows <= 37

    assert plan.search(fits) == 37
    assert len(calls) <= 2 * math.ceil(math.log2(37)) + 1  # compiles, each minutes at scale
    assert plan.search(fits, known_fit=8) == 37
    assert plan.search(lambda r: r <= 3, known_fail=5) == 3
    assert plan.search(lambda r: False) == 0
    assert plan.search(lambda r: True, limit=64) == 64


def _plan_cli(folder, *flags):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the planner sets its own device count
    done = subprocess.run([sys.executable, "-m", "bco_jax.plan", "--model", str(folder / "config.json"),
                           "--mesh", "1,2,1", "--batch_size", "4", "--max_length", "32", "--json", *flags],
                          capture_output=True, text=True, env=env, timeout=300, check=True, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_cli_compiles_the_step_and_reports_consistent_bytes(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    out = _plan_cli(tmp_path, "--device_memory", "1TiB")
    cfg = read_config(TINY)
    d = out["per_device"]
    assert out["parameters"] == out["parameters_analytic"] == plan.analytic_parameter_count(cfg)
    assert out["devices"] == 2 and out["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1}
    assert d["total_bytes"] == sum(v for k, v in d.items() if k != "total_bytes")
    # float32 master weights split over 2 fsdp shards; only the norm scales [D] are replicated
    replicated = (2 * cfg.num_layers + 1) * cfg.hidden_size
    assert d["params_bytes"] == 4 * (out["parameters"] - replicated) // 2 + 4 * replicated
    # AdamW: two float32 moments like the parameters, plus scalars (count, step, reward shift, rng)
    assert 2 * d["params_bytes"] <= d["optimizer_bytes"] < 2 * d["params_bytes"] + 1024
    assert d["reference_bytes"] == d["params_bytes"] // 2  # bfloat16 reference, same shardings
    assert d["temporaries_bytes"] > 0 and out["xla_argument_bytes"] == (
        d["params_bytes"] + d["optimizer_bytes"] + d["reference_bytes"] + d["batch_bytes"])
    assert out["fits"] is True and out["max_batch_per_device"] is None
    assert out["sampling"] is None and (out["peak"], out["peak_bytes"]) == ("training", d["total_bytes"])

    tight = _plan_cli(tmp_path, "--device_memory", "1MiB", "--precompute_ref_log_probs", "true")
    assert tight["fits"] is False and tight["per_device"]["reference_bytes"] == 0


def test_lora_plan_trains_adapters_only(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    full = _plan_cli(tmp_path, "--device_memory", "1TiB")
    peft = _plan_cli(tmp_path, "--device_memory", "1TiB", "--use_peft", "true", "--lora_r", "2",
                     "--lora_target_modules", "q_proj,v_proj")
    cfg = read_config(TINY)
    D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    assert peft["parameters"] == full["parameters"]
    assert peft["trainable_parameters"] == cfg.num_layers * 2 * ((D + N * H) + (D + K * H))  # r = 2: A and B
    # The base is frozen in bfloat16 and is the reference; float32 adapters and their moments are all that train.
    assert peft["per_device"]["reference_bytes"] == full["per_device"]["reference_bytes"]
    assert peft["per_device"]["params_bytes"] < full["per_device"]["params_bytes"] / 20


def test_score_free_stand_in_matches_attention_shapes_and_gradients():
    q = jax.random.normal(jax.random.key(0), (2, 8, 4, 16))
    k, v = (jax.random.normal(jax.random.key(i), (2, 8, 2, 16)) for i in (1, 2))
    out = attention.score_free_causal(q, k, v, None, None, 0.25)
    assert out.shape == q.shape and out.dtype == q.dtype
    grads = jax.grad(lambda q, k, v: attention.score_free_causal(q, k, v, None, None, 0.25).sum(), (0, 1, 2))(q, k, v)
    assert all(g.shape == x.shape and bool(abs(g).sum() > 0) for g, x in zip(grads, (q, k, v)))


def test_recipe_is_a_valid_trainer_config():
    from bco_jax.config import parse_args

    cfg = parse_args(["--config", os.path.join(RECIPES, "llama3.1-8b-instruct-bco.yaml")])
    assert (cfg.loss.loss_type, cfg.optim.learning_rate, cfg.data.max_length) == ("bco", 5e-7, 1024)
    counts = {name: plan.analytic_parameter_count(read_config(os.path.join(RECIPES, "models", name)))
              for name in ("Llama-3.2-1B", "Llama-3.1-8B", "Llama-3.1-70B", *RECIPE_COUNTS)}
    assert counts == {"Llama-3.2-1B": 1_235_814_400, "Llama-3.1-8B": 8_030_261_248, "Llama-3.1-70B": 70_553_706_496,
                      **RECIPE_COUNTS}


def test_online_plan_counts_the_kv_cache_and_peaks_at_sampling(tmp_path):
    """An online key plans a round's sampling: generate's KV cache per device is layers x 2 (K, V) x rows x
    length x kv_heads x head_dim x itemsize, rows split over the data-parallel devices and kv heads over
    `tensor`; a large round makes the sampling the peak the verdict reads."""
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    args = plan.checked(plan.parser().parse_args([
        "--model", str(tmp_path), "--mesh", "1,2,2", "--batch_size", "4", "--max_length", "64",
        "--prompts_per_round", "32", "--num_generations", "8", "--max_completion_length", "24",
        "--device_memory", "4MiB"]))
    out = plan.plan(args, make_mesh((1, 2, 2), jax.devices()[:4]))
    cfg, s, d = read_config(TINY), out["sampling"], out["per_device"]
    rows, kv_heads, length = 32 * 8 // 2, cfg.num_kv_heads // 2, 64  # per device; prompts of 64 - 24 tokens
    assert (s["rows"], s["rows_per_device"], s["prompt_length"]) == (256, rows, 40)
    assert s["kv_cache_bytes"] == cfg.num_layers * 2 * rows * length * kv_heads * cfg.head_dim * 2  # bfloat16
    assert s["prefill_scores_bytes_per_layer"] == rows * cfg.num_heads // 2 * 40 * length * 4
    assert s["temporaries_bytes"] > s["kv_cache_bytes"]  # the compiled generate holds the cache, and more
    assert s["resident_bytes"] == d["params_bytes"] + d["optimizer_bytes"] + d["reference_bytes"]
    assert s["total_bytes"] == s["resident_bytes"] + s["prompts_bytes"] + s["temporaries_bytes"]
    assert d["total_bytes"] <= out["usable_bytes"] < s["total_bytes"]  # training fits, the round does not
    assert (out["peak"], out["peak_bytes"], out["fits"]) == ("sampling", s["total_bytes"], False)
    assert "sampling: kv cache" in plan.table(out)
    # kv heads that `tensor` does not divide are whole on every device, as generate's constraint leaves them
    assert plan_sampling.kv_cache_bytes(cfg, make_mesh((1, 1, 4), jax.devices()[:4]), 8, 16, "float32") == (
        cfg.num_layers * 2 * 8 * 16 * cfg.num_kv_heads * cfg.head_dim * 4)
