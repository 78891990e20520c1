"""Tiny real HF folders (transformers writes them) and feedback files for the trainer's tests."""

import json
import os

import numpy as np


def tiny_model_dir(path, *, seed=0, vocab_size=None, layers=2, hidden=32, tie=False, family="llama"):
    """A random LlamaForCausalLM (or Gemma3ForCausalLM: `family="gemma3"`, a sliding layer of window
    4 then a global one) saved by transformers, with the oracle task's char tokenizer."""
    import torch
    import transformers

    from bco_jax.oracle.tokenizer import save_tokenizer

    tok = save_tokenizer(path)
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size or len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, tie_word_embeddings=tie,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if family == "gemma3":
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
            **common, head_dim=hidden // 4, sliding_window=4, sliding_window_pattern=2, query_pre_attn_scalar=16))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    model.save_pretrained(path)
    return str(path)


def feedback_file(path, n=64, *, seed=0, paired=False, bad_line=None):
    """Arithmetic feedback: a right answer is a thumbs-up, a wrong one a thumbs-down."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        a, b = int(rng.integers(0, 50)), int(rng.integers(0, 50))
        prompt, right, wrong = f"{a}+{b}=", str(a + b), str(a + b + int(rng.integers(1, 9)))
        if paired:
            rows.append({"prompt": prompt, "chosen": right, "rejected": wrong})
        else:
            up = bool(rng.random() < 0.5) if i > 1 else i == 0
            rows.append({"prompt": prompt, "completion": right if up else wrong, "label": up})
    with open(path, "w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            f.write(("{not json" if i == bad_line else json.dumps(row)) + "\n")
    return str(path)


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
