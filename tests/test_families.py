"""Gemma 3 (the family with every new trait: sandwich and (1 + w) norms, per-head q/k norms, mixed
sliding / global layers with their own RoPE) through the paths beyond the logits that test_models,
test_generate and test_hf check for every family: a packed LoRA run whose PEFT adapter transformers
loads, an int8 base, packed log-probs with per-layer windows, and vision-language checkpoints read as
their text tower."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_hf
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file
from train_fixtures import feedback_file, read_metrics, tiny_model_dir

from bco_jax import train
from bco_jax.config import parse_args
from bco_jax.models import Decoder, example_logps, load_hf, read_config, save_hf, sequence_logps


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma3")
    return {"model": tiny_model_dir(root / "model", family="gemma3", tie=True),
            "train": feedback_file(root / "train.jsonl", 32)}


def test_a_packed_lora_run_exports_what_peft_and_transformers_load(gemma, tmp_path):
    from peft import PeftModel

    out = tmp_path / "run"
    train.fit(parse_args(["--model", gemma["model"], "--train_data", gemma["train"], "--eval_data", "",
                          "--output_dir", str(out), "--batch_size", "8", "--max_steps", "2", "--learning_rate", "1e-2",
                          "--logging_steps", "1", "--warmup_ratio", "0", "--max_length", "16", "--length_buckets",
                          "16", "--tensorboard", "false", "--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8",
                          "--packing", "true"]))
    records = [r for r in read_metrics(out) if "loss" in r]
    assert len(records) == 2 and np.isfinite(records[-1]["loss"]) and records[-1]["delta"] != 0.0
    assert abs(records[0]["loss"] - np.log(2)) < 1e-6  # policy = reference at step 1
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11]])
    base = transformers.AutoModelForCausalLM.from_pretrained(gemma["model"], dtype=torch.float32)
    with torch.no_grad():
        plain = base(ids).logits
        peft_logits = PeftModel.from_pretrained(base, str(out / "adapter")).eval()(ids).logits
        merged = transformers.AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32)(ids).logits
    np.testing.assert_allclose(peft_logits.numpy(), merged.numpy(), atol=2e-5)
    assert (peft_logits - plain).abs().max() > 1e-3


def test_int8_base_is_close_to_float(gemma):
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 30, (2, 12)))
    mask = jnp.ones_like(ids)
    logps = {q: sequence_logps(load_hf(gemma["model"], quantize_base=q), ids, mask, mask)[0] for q in (False, True)}
    np.testing.assert_allclose(logps[True], logps[False], rtol=0.02)
    assert not np.array_equal(logps[True], logps[False])


def test_packed_rows_with_per_layer_windows_equal_each_example_alone():
    """Segments longer than the sliding layer's window of 3, beside a global layer."""
    cfg = read_config(dict(tiny_hf.SIZES, architectures=["Gemma3ForCausalLM"], sliding_window=3,
                           layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=24,
                           final_logit_softcapping=5.0))
    model = Decoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32)
    lengths, T = [(7, 2), (5, 1), (9, 3)], 24
    rng = np.random.default_rng(0)
    ids, seg, pos, loss = (np.zeros((1, T), np.int32) for _ in range(4))
    alone = [np.zeros((3, T), np.int32) for _ in range(3)]
    t = 0
    for e, (n, p) in enumerate(lengths):
        x = rng.integers(3, cfg.vocab_size, n)
        ids[0, t:t + n], seg[0, t:t + n], pos[0, t:t + n], loss[0, t + p:t + n] = x, e + 1, np.arange(n), 1
        alone[0][e, :n], alone[1][e, :n], alone[2][e, p:n] = x, 1, 1
        t += n
    got, _ = jax.jit(lambda *a: example_logps(model, *a, 3))(ids, (seg > 0).astype(np.int32), loss, seg, pos,
                                                             np.zeros(1, np.int32))
    want, _ = jax.jit(lambda *a: sequence_logps(model, *a))(*alone)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def vision_language_folder(folder, layout):
    """A tiny Gemma3ForConditionalGeneration, saved by transformers (the Hub's key layout) or with the
    keys transformers 4.52-4.57 wrote (model.language_model.*, model.vision_tower.*)."""
    torch.manual_seed(0)
    text = dict(tiny_hf.SIZES, num_key_value_heads=2, sliding_window=4, sliding_window_pattern=2)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    model = transformers.Gemma3ForConditionalGeneration(
        transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)).eval()
    model.save_pretrained(folder)
    if layout == "model.language_model":
        path = os.path.join(folder, "model.safetensors")
        renames = {"language_model.model.": "model.language_model.", "vision_tower.": "model.vision_tower.",
                   "multi_modal_projector.": "model.multi_modal_projector.", "language_model.lm_head.": "lm_head."}
        tensors = {}
        for name, value in load_file(path).items():
            prefix = next((p for p in renames if name.startswith(p)), "")
            tensors[renames.get(prefix, "") + name[len(prefix):]] = value
        assert any(k.startswith("model.language_model.") for k in tensors)
        save_file(tensors, path, metadata={"format": "pt"})
    return model


@pytest.mark.parametrize("layout", ["language_model.model", "model.language_model"])
def test_vision_language_checkpoint_reads_and_exports_as_its_text_tower(layout, tmp_path):
    torch_model = vision_language_folder(tmp_path / "vlm", layout)
    model = load_hf(str(tmp_path / "vlm"))
    assert model.config.architecture == "Gemma3ForCausalLM" and model.config.sliding_layers() == (True, False)
    ids, mask = tiny_hf.padded_batch(seed=3, side="right", length=10)
    expected = tiny_hf.torch_logits(torch_model, ids, mask)
    np.testing.assert_allclose(np.asarray(model(ids, mask))[mask == 1], expected[mask == 1], atol=1e-4)
    save_hf(model, str(tmp_path / "text"))
    assert json.loads((tmp_path / "text" / "config.json").read_text())["architectures"] == ["Gemma3ForCausalLM"]
    text_only = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "text", dtype=torch.float32).eval()
    assert type(text_only).__name__ == "Gemma3ForCausalLM"
    np.testing.assert_allclose(tiny_hf.torch_logits(text_only, ids, mask)[mask == 1], expected[mask == 1], atol=1e-4)


@pytest.mark.parametrize("key, value", [("attn_logit_softcapping", 50.0), ("use_bidirectional_attention", True),
                                        ("hidden_activation", "gelu")])
def test_options_gemma_does_not_implement_name_the_key(key, value):
    hf = dict(tiny_hf.SIZES, architectures=["Gemma3ForCausalLM"], **{key: value})
    with pytest.raises(ValueError, match=key.replace("hidden_activation", "hidden_act")):
        read_config(hf)


def test_gemma_hub_defaults_fill_a_sparse_text_config():
    """A Hub Gemma 3 config gives few text keys; the rest are Gemma3TextConfig's defaults."""
    hf = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "eos_token_id": [1, 106],
          "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                          "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                          "sliding_window": 1024}}
    cfg = read_config(hf)
    theirs = transformers.Gemma3TextConfig(**{k: v for k, v in hf["text_config"].items() if k != "model_type"})
    assert (cfg.vocab_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        theirs.vocab_size, theirs.num_attention_heads, theirs.num_key_value_heads, theirs.head_dim)
    assert cfg.sliding_layers() == tuple(t == "sliding_attention" for t in theirs.layer_types)
    assert (cfg.rope_type, cfg.rope_factor, cfg.rope_theta, cfg.rope_local_theta) == ("linear", 8.0, 1e6, 1e4)
    assert theirs.rope_parameters["full_attention"]["factor"] == 8.0
    assert cfg.eos_token_ids == (1, 106) and cfg.tie_word_embeddings and cfg.query_pre_attn_scalar == 256
    assert dataclasses.replace(cfg, hf_config_json="").attention_scale == 256 ** -0.5
