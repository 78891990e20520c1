"""Flax NNX decoders (Llama / Mistral / Qwen2), HF checkpoint import/export, log-probs, sampling."""
from bco_jax.models.decoder import Decoder, ModelConfig, compute_dtype, decays, weight_decay_mask
from bco_jax.models.generate import generate
from bco_jax.models.hf import load_hf, read_config, save_hf
from bco_jax.models.logprobs import example_logps, sequence_logps, token_logps

__all__ = ["Decoder", "ModelConfig", "compute_dtype", "decays", "example_logps", "generate", "load_hf", "read_config",
           "save_hf", "sequence_logps", "token_logps", "weight_decay_mask"]
