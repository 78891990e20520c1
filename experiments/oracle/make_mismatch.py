"""Prompt-mismatch feedback sets at several strengths, for the UDM experiment.

    .venv/bin/python -m experiments.oracle.make_mismatch --strengths 0.6,0.95

`make_feedback.py` writes one mismatch set (`mismatch_binary.jsonl`: 80% of thumbs-up on additions, 80%
of thumbs-down on subtractions). This script redraws exactly the same training answers (same seed, same
prompts, same sampling keys) and writes `mismatch_binary_<pct>.jsonl` for each strength; it first
rebuilds the 80% set and refuses to write anything unless that is byte-identical to the shipped file,
so every strength is cut from the same answers as the shipped sets.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import jax
import numpy as np
from transformers import AutoTokenizer

from bco_jax.models import load_hf
from bco_jax.oracle import task
from experiments.oracle.make_feedback import mismatch_rows, sample_many


def redraw(model_dir: str, train_prompts: int, samples: int, seed: int):
    """The training prompts, their answers and the numpy generator as make_feedback.py has them when it
    builds the mismatch set (the same calls in the same order)."""
    model, tokenizer = load_hf(model_dir), AutoTokenizer.from_pretrained(model_dir)
    splits = task.split_prompts()
    rng = np.random.default_rng(seed)
    train = []
    for family in task.FAMILIES:
        pool = [q for q in splits["train"] if task.prompt_family(q) == family]
        train += [pool[i] for i in rng.choice(len(pool), train_prompts // 2, replace=False)]
    train = [train[i] for i in rng.permutation(len(train))]
    answers = sample_many(model, tokenizer, train, samples, jax.random.fold_in(jax.random.key(seed), 1))
    return train, answers, rng


def as_jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bco_jax/assets/oracle/sft")
    p.add_argument("--feedback", default="bco_jax/assets/oracle/feedback")
    p.add_argument("--strengths", default="0.6,0.95", help="fractions of thumbs-up drawn from additions")
    p.add_argument("--train_prompts", type=int, default=3000)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    train, answers, rng = redraw(args.model, args.train_prompts, args.samples, args.seed)
    shipped = os.path.join(args.feedback, "mismatch_binary.jsonl")
    if as_jsonl(mismatch_rows(train, answers, 0.8, copy.deepcopy(rng))) != open(shipped, encoding="utf-8").read():
        print(f"error: the redrawn 80% set differs from {shipped}: the answers were not reproduced "
              "(another CPU type or JAX version?); nothing written", file=sys.stderr)
        return 1
    for strength in (float(s) for s in args.strengths.split(",")):
        rows = mismatch_rows(train, answers, strength, copy.deepcopy(rng))
        path = os.path.join(args.feedback, f"mismatch_binary_{round(100 * strength)}.jsonl")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(as_jsonl(rows))
        os.replace(path + ".tmp", path)
        up = [r for r in rows if r["label"]]
        print(f"{path}: {len(rows)} rows, thumbs-up {len(up) / len(rows):.3f}, "
              f"of them additions {np.mean([task.prompt_family(r['prompt']) == 'add' for r in up]):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
