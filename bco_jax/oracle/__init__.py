"""A controlled task with a known reward (two-digit arithmetic), its tokenizer and shipped assets.

The shipped assets are a tiny SFT model trained on noisy answers and feedback datasets labelled by
the oracle (made by experiments/oracle/make_sft.py and make_feedback.py); they are the trainer's
default demonstration and the starting point of the evidence experiments. `reward` is usable as
`--reward_fn bco_jax.oracle:reward`.

A second task, `bco_jax.oracle.interval` (name an integer strictly inside "(a b)": many right answers,
each unlikely under its SFT model), has the same functions and its own assets under INTERVAL_ASSETS
(`--reward_fn bco_jax.oracle.interval:reward`). `TASKS` maps the scripts' `--task` names to the modules.
"""
from __future__ import annotations

import os

from bco_jax.oracle import interval, task
from bco_jax.oracle.task import (
                                 FAMILIES,
                                 answer,
                                 graded_reward,
                                 is_success,
                                 parse_prompt,
                                 prompt_family,
                                 rating,
                                 reward,
                                 split_prompts,
)

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "oracle")
MODEL_DIR = os.path.join(ASSETS, "sft")  # HF folder: LlamaForCausalLM + tokenizer
TOKENIZER_DIR = os.path.join(ASSETS, "tokenizer")
FEEDBACK_DIR = os.path.join(ASSETS, "feedback")
TRAIN_FEEDBACK = os.path.join(FEEDBACK_DIR, "binary.jsonl")  # {prompt, completion, label}
TRAIN_PAIRED = os.path.join(FEEDBACK_DIR, "paired.jsonl")  # {prompt, chosen, rejected}
TRAIN_LIKERT = os.path.join(FEEDBACK_DIR, "likert.jsonl")  # {prompt, completion, rating}; 5 <=> right
TRAIN_MISMATCH = os.path.join(FEEDBACK_DIR, "mismatch_binary.jsonl")  # ups mostly "add", downs "sub"
EVAL_FEEDBACK = os.path.join(FEEDBACK_DIR, "eval_binary.jsonl")  # held-out prompts, labelled
EVAL_PAIRED = os.path.join(FEEDBACK_DIR, "eval_paired.jsonl")
EVAL_PROMPTS = os.path.join(FEEDBACK_DIR, "eval_prompts.jsonl")  # == split_prompts()["eval"]

# The interval task: the same tokenizer (TOKENIZER_DIR) and the same file names in its feedback folder
# (binary, likert, paired, eval_binary, eval_paired, eval_prompts .jsonl and manifest.json; no mismatch set).
INTERVAL_ASSETS = os.path.join(os.path.dirname(ASSETS), "interval")
INTERVAL_MODEL_DIR = os.path.join(INTERVAL_ASSETS, "sft")
INTERVAL_FEEDBACK_DIR = os.path.join(INTERVAL_ASSETS, "feedback")

TASKS = {"arithmetic": task, "interval": interval}  # the experiment scripts' --task choices
TASK_ASSETS = {"arithmetic": ASSETS, "interval": INTERVAL_ASSETS}  # each holds sft/ and feedback/

# Settings under which BCO on TRAIN_FEEDBACK clearly raises the success rate in a couple of CPU
# minutes (experiments/oracle/check_bco.py: 0.51 -> 0.67 with these). The paper's 5e-7 learning
# rate is for 3B-8B models; a 200k-parameter model trained from scratch moves only at ~1e-3.
DEMO_SETTINGS = dict(loss_type="bco", beta=0.1, learning_rate=1e-3, max_steps=200, batch_size=64,
                     warmup_ratio=0.1, lr_scheduler_type="linear")

__all__ = [
                                 "ASSETS",
                                 "DEMO_SETTINGS",
                                 "EVAL_FEEDBACK",
                                 "EVAL_PAIRED",
                                 "EVAL_PROMPTS",
                                 "FAMILIES",
                                 "FEEDBACK_DIR",
                                 "INTERVAL_ASSETS",
                                 "INTERVAL_FEEDBACK_DIR",
                                 "INTERVAL_MODEL_DIR",
                                 "MODEL_DIR",
                                 "TASKS",
                                 "TASK_ASSETS",
                                 "TOKENIZER_DIR",
                                 "TRAIN_FEEDBACK",
                                 "TRAIN_LIKERT",
                                 "TRAIN_MISMATCH",
                                 "TRAIN_PAIRED",
                                 "answer",
                                 "graded_reward",
                                 "interval",
                                 "is_success",
                                 "parse_prompt",
                                 "prompt_family",
                                 "rating",
                                 "reward",
                                 "split_prompts",
                                 "task",
]
