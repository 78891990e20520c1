"""Tiny random HF checkpoints (test-only helper for the model tests): built with transformers,
weights re-drawn with a larger spread so logits have clear top-2 gaps, saved as real HF folders."""
import json
import os

import numpy as np
import torch
import transformers

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 500000.0}

FAMILIES = {
    # GQA, llama3 rope scaling, untied, several EOS ids
    "llama3": (transformers.LlamaConfig, dict(num_key_value_heads=2, rope_parameters=LLAMA3_ROPE,
                                              eos_token_id=[1, 2], bos_token_id=0)),
    # plain multi-head attention, tied embeddings, attention + mlp biases
    "llama_tied": (transformers.LlamaConfig, dict(num_key_value_heads=4, tie_word_embeddings=True,
                                                  attention_bias=True, mlp_bias=True, eos_token_id=2)),
    # sliding window shorter than the test sequences
    "mistral": (transformers.MistralConfig, dict(num_key_value_heads=2, sliding_window=4, eos_token_id=2)),
    # q/k/v biases, tied embeddings
    "qwen2": (transformers.Qwen2Config, dict(num_key_value_heads=2, tie_word_embeddings=True, eos_token_id=2)),
    # per-head q/k norms; a full-attention layer, then a sliding one (max_window_layers)
    "qwen3": (transformers.Qwen3Config, dict(num_key_value_heads=2, tie_word_embeddings=True, eos_token_id=2,
                                             use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    # (1 + w) and sandwich norms, scaled embeddings, GELU-tanh, a sliding layer then a global one with
    # their own RoPE (linear scaling on the global one only), query_pre_attn_scalar != head_dim,
    # soft-capped logits
    "gemma3": (transformers.Gemma3TextConfig, dict(
        num_key_value_heads=2, sliding_window=4, sliding_window_pattern=2, query_pre_attn_scalar=24,
        final_logit_softcapping=3.0, eos_token_id=2, bos_token_id=0, pad_token_id=0,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}})),
}

SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, head_dim=16, max_position_embeddings=256)


def build(family: str, folder: str, seed: int = 0, **save_kwargs):
    """Save a tiny random `family` model to `folder`; returns the float32 torch model (eval mode)."""
    config_cls, extra = FAMILIES[family]
    config = config_cls(**SIZES, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                          attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(folder, **save_kwargs)
    return model


def padded_batch(seed=0, batch=3, length=12, vocab=128, side="left"):
    """ids, mask [B, T] int32 with rows of different lengths padded on `side` (first row full)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(batch, length)).astype(np.int32)
    lengths = [length] + [max(2, length - 3 * i - 2) for i in range(1, batch)]
    mask = np.zeros((batch, length), np.int32)
    for b, n in enumerate(lengths):
        mask[b, length - n:] = 1 if side == "left" else 0
        if side == "right":
            mask[b, :n] = 1
    ids = np.where(mask == 1, ids, 0).astype(np.int32)
    return ids, mask


def torch_logits(model, ids, mask):
    """transformers float32 logits with explicit positions from the mask (its plain forward counts
    padding as positions)."""
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions, dtype=torch.long))
    return out.logits.float().numpy()


def rewrite_config(folder, fn):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump(fn(config), f)
