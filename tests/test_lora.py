"""LoRA: adapters off is the base exactly, the merged export equals the adapted model, PEFT loads our
adapter onto the base in transformers and gets the same logits, the trainer trains adapters only (the
reference is the base), resumes and restarts from an adapter folder; and with a separate ref_model
(TRL's PEFT policy + explicit reference)."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from train_fixtures import feedback_file, read_metrics, tiny_model_dir

from bco_jax import train
from bco_jax.config import parse_args
from bco_jax.models import Decoder, ModelConfig, lora, sequence_logps
from bco_jax.models.projections import PROJECTIONS

CFG = ModelConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8)


def adapted(cfg=CFG, targets=(), rank=4, dropout=0.0):
    cfg = dataclasses.replace(cfg, lora_rank=rank, lora_alpha=8.0, lora_dropout=dropout,
                              lora_targets=lora.resolve_targets(list(targets)))
    graphdef, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32))
    base_graphdef = nnx.split(Decoder(CFG, rngs=nnx.Rngs(0), dtype=jnp.float32))[0]
    return graphdef, base_graphdef, *lora.split_adapters(nnx.to_pure_dict(state))


def test_adapters_off_is_the_base_and_merging_is_exact():
    graphdef, base_graphdef, base, adapters = adapted()
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 48, (3, 10)))
    mask = jnp.ones_like(ids)
    fresh = sequence_logps(nnx.merge(graphdef, lora.join_adapters(base, adapters)), ids, mask, mask)[0]
    plain = sequence_logps(nnx.merge(base_graphdef, base), ids, mask, mask)[0]
    np.testing.assert_array_equal(fresh, plain)  # B = 0 at init
    trained = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), adapters)
    ours = sequence_logps(nnx.merge(graphdef, lora.join_adapters(base, trained)), ids, mask, mask)[0]
    merged = sequence_logps(nnx.merge(base_graphdef, lora.merged_weights(base, trained, 8.0 / 4)), ids, mask, mask)[0]
    np.testing.assert_allclose(ours, merged, rtol=1e-5)
    assert np.max(np.abs(np.asarray(ours) - np.asarray(plain))) > 1e-3


def test_targets_and_dropout():
    assert lora.resolve_targets("all-linear") == lora.resolve_targets([]) == tuple(PROJECTIONS)
    assert lora.resolve_targets(["v_proj", "q_proj"]) == ("wq", "wv")
    with pytest.raises(ValueError, match="unknown module"):
        lora.resolve_targets(["qkv"])
    graphdef, _, base, adapters = adapted(targets=["q_proj", "down_proj"], dropout=0.5)
    assert sorted(adapters["layers"]) == ["w_down_lora_a", "w_down_lora_b", "wq_lora_a", "wq_lora_b"]
    trained = jax.tree.map(lambda x: x + 0.05, adapters)
    model = nnx.merge(graphdef, lora.join_adapters(base, trained))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 48, (2, 8)))
    mask = jnp.ones_like(ids)
    plain = sequence_logps(model, ids, mask, mask)[0]
    dropped = [sequence_logps(model, ids, mask, mask, dropout_rng=jax.random.key(k))[0] for k in (0, 0, 1)]
    np.testing.assert_array_equal(dropped[0], dropped[1])  # the same key, the same draw
    assert not np.allclose(dropped[0], plain) and not np.allclose(dropped[0], dropped[2])


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return {"model": tiny_model_dir(root / "model"), "ref": tiny_model_dir(root / "ref", seed=1),
            "train": feedback_file(root / "train.jsonl", 64)}


def flags(assets, out, *extra, steps=4):
    return ["--model", assets["model"], "--train_data", assets["train"], "--eval_data", "", "--output_dir", str(out),
            "--batch_size", "16", "--max_steps", str(steps), "--save_steps", "2", "--learning_rate", "1e-2",
            "--logging_steps", "1", "--warmup_ratio", "0", "--max_length", "16", "--length_buckets", "16",
            "--tensorboard", "false", "--lr_scheduler_type", "constant", "--use_peft", "true", "--lora_r", "4",
            "--lora_alpha", "8", *extra]


def test_trainer_trains_adapters_exports_peft_and_resumes(assets, tmp_path):
    import torch
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    straight = tmp_path / "straight"
    train.fit(parse_args(flags(assets, straight)))
    records = [r for r in read_metrics(straight) if "loss" in r]
    assert len(records) == 4 and records[-1]["delta"] != 0.0  # rewards moved: the adapters trained
    # The checkpoint holds the adapters (and their moments) only.
    import orbax.checkpoint as ocp
    meta = ocp.StandardCheckpointer().metadata(str(straight / "checkpoints" / "4" / "state"))
    params = meta.item_metadata["train"]["params"] if hasattr(meta, "item_metadata") else meta["train"]["params"]
    assert set(params) == {"layers"} and all("_lora_" in k for k in params["layers"])

    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11]])
    base = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32)
    with torch.no_grad():
        plain = base(ids).logits
        peft_logits = PeftModel.from_pretrained(base, str(straight / "adapter")).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(straight / "hf", dtype=torch.float32)(ids).logits
    np.testing.assert_allclose(peft_logits.numpy(), merged.numpy(), atol=2e-5)
    assert (peft_logits - plain).abs().max() > 1e-3

    # Killed after step 2 and resumed: the same adapters as the straight run (bit for bit on CPU).
    resumed = tmp_path / "resumed"
    train.fit(parse_args(flags(assets, resumed, steps=2)))
    train.fit(parse_args(flags(assets, resumed)))
    a = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

    # A run that starts from the exported adapter and takes a step of learning rate 0 exports it unchanged.
    again = tmp_path / "again"
    train.fit(parse_args(flags(assets, again, "--lora_adapter", str(straight / "adapter"), "--learning_rate", "0",
                               steps=1)))
    c = load_file(str(again / "adapter" / "adapter_model.safetensors"))
    assert all(np.allclose(a[k], c[k], atol=1e-7) for k in a)
    assert os.path.exists(again / "hf" / "config.json")



def test_separate_ref_model(assets, tmp_path):
    """use_peft with a ref_model other than the base (TRL's PEFT policy + explicit reference): the
    policy is the base + adapters, the other model the reference. At step 0 the adapters are off
    (B = 0), so the first step's rewards are beta * (logp_base - logp_ref) != 0; the precomputed
    reference log-probs are the other model's; the export merges the adapters into the base."""
    from safetensors.numpy import load_file

    from bco_jax import losses as L
    from bco_jax.build import build, export_policy, initial_state, precompute
    from bco_jax.models import load_hf
    from bco_jax.precompute import attach_tables
    from bco_jax.sharding import put_batch

    cfg = parse_args(flags(assets, tmp_path, "--ref_model", assets["ref"], "--precompute_ref_log_probs", "true"))
    assert cfg.model.use_peft and cfg.model.separate_reference  # no longer refused
    run = build(cfg)
    assert run.frozen[1] is not None and run.frozen[0] is not run.frozen[1]
    state = initial_state(run)
    local = next(run.iterator)  # the first batch, scored by hand by both models
    rows, labels = (np.asarray(x, bool) for x in (local.example_mask, local.labels))
    ids, mask, loss_mask = (jnp.asarray(x) for x in (local.main.input_ids, local.main.attention_mask,
                                                      local.main.loss_mask))
    base_lp, ref_lp = (np.asarray(sequence_logps(load_hf(assets[k]), ids, mask, loss_mask)[0])
                       for k in ("model", "ref"))
    with jax.set_mesh(run.mesh):  # as the trainer runs
        tables = precompute(run)
        # (b) precomputed: the reference's log-probs, not the base's
        np.testing.assert_allclose(tables.ref_table[local.example_index[rows]], ref_lp[rows], rtol=1e-5)
        # (a) the live step against the hand computation (delta = 0 at step 0)
        batch = put_batch(attach_tables(local), run.mesh, cfg.run.gradient_accumulation_steps)
        state, metrics = run.program.step(state, run.frozen, batch)  # the LM-head capacity: batch.shape
        rewards = cfg.loss.beta * (base_lp - ref_lp)
        losses, _ = L.bco_loss(jnp.asarray(base_lp), jnp.asarray(ref_lp), jnp.asarray(labels), 0.0,
                               beta=cfg.loss.beta)
        np.testing.assert_allclose(metrics["loss"], np.mean(np.asarray(losses)[rows]), rtol=1e-5)
        for name, up in (("chosen", labels & rows), ("rejected", ~labels & rows)):
            np.testing.assert_allclose(metrics[f"rewards_sum/{name}"], rewards[up].sum(), rtol=1e-4, atol=1e-6)
        assert np.abs(rewards[rows]).max() > 1e-3
        export_policy(run, state)
    # The merged export is the base's (not the reference's) weights plus the trained update.
    merged, base = (load_file(os.path.join(p, "model.safetensors")) for p in (tmp_path / "hf", assets["model"]))
    key = "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_array_equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert 0 < np.abs(merged[key] - base[key]).max() < 0.1
    assert os.path.exists(tmp_path / "adapter" / "adapter_model.safetensors")


def test_load_in_8bit_trains_on_an_int8_base_and_exports_float(assets, tmp_path):
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from bco_jax.config import ConfigError, validate

    with pytest.raises(ConfigError, match="load_in_8bit"):
        validate(parse_args(["--load_in_8bit", "true"]))
    runs = {}
    for name, extra in (("float", []), ("int8", ["--load_in_8bit", "true"])):
        out = tmp_path / name
        train.fit(parse_args(flags(assets, out, "--save_steps", "4", *extra, steps=3)))
        runs[name] = [r for r in read_metrics(out) if "loss" in r]
    assert runs["int8"][-1]["delta"] != 0.0 and np.isfinite(runs["int8"][-1]["loss"])
    # The int8 base (the reference too) changes the numbers a little, not the run.
    np.testing.assert_allclose(runs["int8"][-1]["loss"], runs["float"][-1]["loss"], rtol=0.05)
    assert runs["int8"][-1]["loss"] != runs["float"][-1]["loss"]
    assert json.load(open(tmp_path / "int8" / "reference" / "reference.json"))["int8"] is True
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():  # the export is a plain float model the adapters were merged into
        logits = {n: AutoModelForCausalLM.from_pretrained(tmp_path / n / "hf", dtype=torch.float32)(ids).logits
                  for n in runs}
    assert (logits["int8"] - logits["float"]).abs().max() < 0.05
