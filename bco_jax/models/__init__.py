"""Flax NNX decoders (Llama / Mistral / Qwen2 / Qwen3 / Gemma 3), HF checkpoint and GGUF import, HF
export, log-probs, sampling.

Inside, imports go one way: projections (the tables of a layer's projections and norms) -> gguf_io
(GGUF files read as HF checkpoints) and attention -> config (ModelConfig, config.json) -> quant ->
lora -> decoder -> hf, logprobs, generate.
"""
from bco_jax.models.config import ModelConfig, compute_dtype, read_config
from bco_jax.models.decoder import Decoder, decays, weight_decay_mask
from bco_jax.models.generate import generate
from bco_jax.models.hf import load_hf, save_hf
from bco_jax.models.logprobs import example_logps, sequence_logps, token_logps

__all__ = ["Decoder", "ModelConfig", "compute_dtype", "decays", "example_logps", "generate", "load_hf", "read_config",
           "save_hf", "sequence_logps", "token_logps", "weight_decay_mask"]
