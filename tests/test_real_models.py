"""The first real LMs through bco-jax: SmolLM2-135M-Instruct (Llama, Q4_1) and Gemma 3 270M (Q4_K_M),
loaded from their GGUF files, against transformers' own loading of the same files (float32 logits,
greedy continuations token for token), then through the trainer: a BCO step and a LoRA step on
SmolLM2, and a LoRA run resumed bit for bit. Each model is loaded once per session (conftest `real`)."""
import json

import numpy as np
import pytest
import torch
from flax import nnx

from bco_jax import train
from bco_jax.config import parse_args
from bco_jax.models import generate

N_NEW = 32
CHAT_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Give me three uses for a brick.",
                "Explain what a prime number is.", "How do I boil an egg?"]
TEXT_PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):",
                "The three primary colours are", "Water boils at a temperature of"]


def prompts_of(loaded, name):
    """Token ids of the five prompts: chat-templated for SmolLM2 (it has a template), plain for Gemma."""
    tok = loaded.tokenizer
    if name == "smollm2":
        return [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                        tokenize=True)["input_ids"] for p in CHAT_PROMPTS]
    return [tok(p)["input_ids"] for p in TEXT_PROMPTS]


def padded(rows, side="left"):
    T = max(map(len, rows))
    ids, mask = np.zeros((len(rows), T), np.int32), np.zeros((len(rows), T), np.int32)
    for b, row in enumerate(rows):
        cols = slice(T - len(row), T) if side == "left" else slice(0, len(row))
        ids[b, cols], mask[b, cols] = row, 1
    return ids, mask


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_logits_match_transformers_loading_the_same_file(real, name):
    loaded = real[name]
    ids, mask = padded(prompts_of(loaded, name)[:2], side="right")
    ours = np.asarray(loaded.model(ids, mask))
    with torch.no_grad():
        theirs = loaded.hf_model(input_ids=torch.tensor(ids, dtype=torch.long),
                                 attention_mask=torch.tensor(mask)).logits.numpy()
    real_tokens = mask.astype(bool)
    diff = np.abs(ours - theirs)[real_tokens].max()
    print(f"{name}: max |logit diff| {diff:.2e} over {real_tokens.sum()} tokens, logits up to "
          f"{np.abs(theirs[real_tokens]).max():.1f}")
    assert diff < 3e-4  # measured: 1.1e-4 (SmolLM2, logits up to 38), 4.1e-5 (Gemma 3)


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_greedy_continuations_match_transformers_token_for_token(real, name):
    loaded = real[name]
    rows = prompts_of(loaded, name)
    ids, mask = padded(rows)
    tokens, out_mask = (np.asarray(x) for x in generate(loaded.model, ids, mask, max_new_tokens=N_NEW))
    eos = set(loaded.model.config.eos_token_ids)
    for b, row in enumerate(rows):
        with torch.no_grad():
            out = loaded.hf_model.generate(input_ids=torch.tensor([row]), attention_mask=torch.ones(1, len(row)),
                                           max_new_tokens=N_NEW, do_sample=False, eos_token_id=sorted(eos),
                                           pad_token_id=loaded.model.config.pad_token_id)
        theirs = out[0, len(row):].tolist()
        ours = tokens[b, :int(out_mask[b].sum())].tolist()
        assert ours == theirs, (name, loaded.tokenizer.decode(row), loaded.tokenizer.decode(ours),
                                loaded.tokenizer.decode(theirs))
    assert int(out_mask.sum()) > 2 * N_NEW  # not everything stopped at once


def feedback(path, n=8):
    rows = [{"prompt": [{"role": "user", "content": f"What is {a} + {a + 1}?"}],
             "completion": [{"role": "assistant", "content": f"It is {2 * a + 1 + (a % 2)}."}],
             "label": a % 2 == 0} for a in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def flags(real, data, out, *extra, steps=1):
    return ["--model", real["smollm2"].path, "--train_data", data, "--eval_data", "", "--output_dir", str(out),
            "--batch_size", "2", "--max_length", "64", "--length_buckets", "64", "--max_steps", str(steps),
            "--logging_steps", "1", "--learning_rate", "1e-4", "--warmup_ratio", "0", "--tensorboard", "false",
            "--save_reference", "false", "--export_hf", "false", "--mesh", "1,1,1", *extra]


def first_record(out):
    return next(json.loads(line) for line in open(out / "metrics.jsonl") if '"loss"' in line)


def test_a_bco_step_on_smollm2(real, tmp_path):
    data = feedback(tmp_path / "train.jsonl")
    train.fit(parse_args(flags(real, data, tmp_path / "bco", "--save_steps", "10")))
    record = first_record(tmp_path / "bco")
    assert np.isfinite(record["grad_norm"]) and record["grad_norm"] > 0
    assert record["loss"] == pytest.approx(np.log(2), abs=1e-6)  # policy = reference at step 1


def test_a_lora_run_on_smollm2_resumes_bit_for_bit(real, tmp_path):
    import shutil

    from safetensors.numpy import load_file

    data = feedback(tmp_path / "train.jsonl")
    out = tmp_path / "run"
    lora = flags(real, data, out, "--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--save_steps", "1",
                 "--export_hf", "true", steps=2)
    train.fit(parse_args(lora))
    record = first_record(out)
    assert record["loss"] == pytest.approx(np.log(2), abs=1e-6) and np.isfinite(record["grad_norm"])
    straight = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    # Killed before step 2's checkpoint and exports were written: the rerun resumes from step 1.
    for gone in ("checkpoints/2", "hf", "adapter", "bco_state.json"):
        shutil.rmtree(out / gone) if (out / gone).is_dir() else (out / gone).unlink()
    train.fit(parse_args(lora))
    resumed = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert straight.keys() == resumed.keys() and all(np.array_equal(straight[k], resumed[k]) for k in straight)
    assert any(np.abs(straight[k]).max() > 0 for k in straight if "lora_B" in k)  # the adapters trained
    # The export is a normal HF folder transformers reads, with the tokenizer built from the GGUF file.
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(out / "hf")("Hi")["input_ids"] == \
        real["smollm2"].tokenizer("Hi")["input_ids"]
    # evaluate reads the run: its export as the policy, the GGUF file it trained from as the reference.
    from bco_jax import evaluate
    report = evaluate.run(evaluate.parse(["--model", str(out), "--data", data, "--num_samples",
                                          "1", "--max_new_tokens", "2", "--batch_size", "4", "--max_length", "64"]))
    assert report["reference"] == real["smollm2"].path and np.isfinite(report["rewards/chosen"])


def test_the_planner_reads_a_gguf_file(real):
    import jax

    from bco_jax import plan
    count = plan.analytic_parameter_count(plan.model_config(real["smollm2"].path, "none"))
    assert count == sum(x.size for x in jax.tree.leaves(nnx.state(real["smollm2"].model))) == 134_515_008



def test_a_model_without_a_chat_template_takes_plain_text_and_refuses_chats(real, tmp_path):
    from bco_jax.data import DataConfig, DataError, load_dataset

    tokenizer = real["gemma3"].tokenizer  # Gemma 3 270M (base): no chat template in the file
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"prompt": "2 + 2 =", "completion": c, "label": c == " 4"}) + "\n"
                             for c in (" 4", " 5")))
    rows = load_dataset([str(plain)], tokenizer, DataConfig(max_length=32, length_buckets=[32]))
    assert len(rows) == 2
    with pytest.raises(DataError, match=r"chat.jsonl:1: conversational data needs a chat template"):
        load_dataset([feedback(tmp_path / "chat.jsonl", 2)], tokenizer, DataConfig(max_length=32, length_buckets=[32]))
