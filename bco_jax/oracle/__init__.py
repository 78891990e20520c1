"""A controlled task with a known reward (two-digit arithmetic), its tokenizer and shipped assets.

The shipped assets (`ASSETS`) are a tiny SFT model trained on noisy answers and feedback datasets
labelled by the oracle; they are the trainer's default demonstration and the evidence experiments'
starting point. `reward` is usable as `--reward_fn bco_jax.oracle:reward`.
"""
from __future__ import annotations

import os

from bco_jax.oracle.task import (FAMILIES, answer, graded_reward, is_success, parse_prompt,
                                 prompt_family, rating, reward, split_prompts)

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "oracle")
MODEL_DIR = os.path.join(ASSETS, "sft")

__all__ = ["ASSETS", "MODEL_DIR", "FAMILIES", "answer", "graded_reward", "is_success",
           "parse_prompt", "prompt_family", "rating", "reward", "split_prompts"]
