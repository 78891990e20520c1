"""Flax NNX decoders (Llama / Mistral / Qwen2), HF checkpoint import/export, log-probs, sampling."""
