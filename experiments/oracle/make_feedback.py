"""Sample answers from the oracle task's SFT model, label them with the oracle, write the feedback sets.

    .venv/bin/python -m experiments.oracle.make_feedback --model bco_jax/assets/oracle/sft \
        --out bco_jax/assets/oracle/feedback
    .venv/bin/python -m experiments.oracle.make_feedback --task interval   # bco_jax/assets/interval/...

Every training prompt gets `--samples` temperature-1 answers; each file takes what its format needs:
  binary.jsonl           {prompt, completion, label}     the first answer of each prompt
  likert.jsonl           {prompt, completion, rating}    the same answers, graded 1-5
  paired.jsonl           {prompt, chosen, rejected}      first right and first wrong answer, where both exist
  mismatch_binary.jsonl  {prompt, completion, label}     thumbs-up drawn mostly from additions, thumbs-down
                                                         mostly from subtractions (`--mismatch` of each)
  eval_binary.jsonl / eval_paired.jsonl                  the same on held-out prompts
  eval_prompts.jsonl     {prompt, family, answer}        held-out prompts for success rate and KL
  manifest.json          sizes, label balance, the SFT model's success rate, the settings used
An empty answer, or one holding a special token, is never used as a completion (see `usable`).

`--task interval` (bco_jax.oracle.interval) writes the same files but for the mismatch set (arithmetic
only), and its eval_prompts.jsonl rows are {prompt, family}: an interval has many right answers.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np
from transformers import AutoTokenizer

from bco_jax.models import load_hf
from bco_jax.oracle import TASK_ASSETS, TASKS, task
from bco_jax.oracle.sampling import sample_completions, success_rate


def sample_many(model, tokenizer, prompts, k, rng) -> list[list[str]]:
    """k answers per prompt, as answers[prompt_index][sample_index]."""
    flat = sample_completions(model, tokenizer, [p for p in prompts for _ in range(k)], rng)
    return [flat[i * k:(i + 1) * k] for i in range(len(prompts))]


def usable(answer: str) -> bool:
    """Empty answers are rejected by the trainer; an answer holding a special or out-of-vocabulary
    token (shown as "<unk>", "<bos>", ...; a few in 10^4 samples) would not tokenize back to what
    the model sampled. Neither is used as a completion."""
    return bool(answer) and "<" not in answer


# `task=` below: the oracle task's module (bco_jax.oracle.task or .interval); arithmetic by default.
def first(answers, prompt, success: bool | None = None, task=task):
    for a in answers:
        if usable(a) and (success is None or task.is_success(prompt, a) == success):
            return a
    return None


def binary_rows(prompts, answers, task=task):
    rows = []
    for p, a in zip(prompts, answers):
        c = first(a, p, task=task)
        if c is not None:
            rows.append(dict(prompt=p, completion=c, label=task.is_success(p, c)))
    return rows


def paired_rows(prompts, answers, task=task):
    rows = []
    for p, a in zip(prompts, answers):
        chosen, rejected = first(a, p, True, task), first(a, p, False, task)
        if chosen is not None and rejected is not None:
            rows.append(dict(prompt=p, chosen=chosen, rejected=rejected))
    return rows


def mismatch_rows(prompts, answers, mismatch: float, rng):
    """One example per prompt. Of the additions, a `mismatch` fraction get a right answer (thumbs-up)
    and the rest a wrong one; subtractions the other way round. So p(thumbs-up | prompt) depends on
    the prompt's family, which is what UDM corrects for."""
    rows = []
    for family, up_fraction in (("add", mismatch), ("sub", 1.0 - mismatch)):
        idx = [i for i, p in enumerate(prompts) if task.prompt_family(p) == family]
        n_up = round(up_fraction * len(idx))
        for rank, i in enumerate(idx):
            want = rank < n_up
            c = first(answers[i], prompts[i], want)
            if c is not None:
                rows.append(dict(prompt=prompts[i], completion=c, label=want))
    order = rng.permutation(len(rows))  # interleave the families
    return [rows[i] for i in order]


def eval_prompt_row(prompt, task=task) -> dict:
    """{prompt, family, answer}; {prompt, family} for a task without a single right answer (interval)."""
    row = dict(prompt=prompt, family=task.prompt_family(prompt))
    if hasattr(task, "answer"):
        row["answer"] = task.answer(prompt)
    return row


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def summary(rows, task=task) -> dict:
    s = {"rows": len(rows)}
    for key in ("label", "rating"):
        if rows and key in rows[0]:
            for family in (None,) + task.FAMILIES:
                vals = [r[key] for r in rows if family is None or task.prompt_family(r["prompt"]) == family]
                name = key if family is None else f"{key}_{family}"
                if key == "label":
                    s[f"thumbs_up_fraction_{family or 'all'}"] = round(float(np.mean(vals)), 4)
                else:
                    s[name + "_counts"] = {str(v): vals.count(v) for v in range(1, 6)}
    return s


# Per task: the likert note of the manifest.
LIKERT_NOTES = {"arithmetic": "rating 5 (right) <=> label true; 4 = one digit wrong",
                "interval": "rating 5 (inside) <=> label true; 4 = on a boundary; 3 = within 5 of the interval"}


def recorded_args(args) -> dict:
    """The settings for the manifest; `task` only when not arithmetic, so the arithmetic manifest reads
    as it did before --task existed."""
    return {k: v for k, v in vars(args).items() if not (k == "task" and v == "arithmetic")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS), default="arithmetic",
                   help="the oracle task; it also sets the default --model and --out")
    p.add_argument("--model", default=None, help="default: bco_jax/assets/<oracle|interval>/sft")
    p.add_argument("--out", default=None, help="default: bco_jax/assets/<oracle|interval>/feedback")
    p.add_argument("--train_prompts", type=int, default=3000, help="half of each prompt family")
    p.add_argument("--samples", type=int, default=8, help="answers sampled per prompt")
    p.add_argument("--mismatch", type=float, default=0.8)
    p.add_argument("--eval_samples", type=int, default=8, help="answers per eval prompt for the SFT rate")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    task = TASKS[args.task]
    args.model = args.model or os.path.relpath(os.path.join(TASK_ASSETS[args.task], "sft"))
    args.out = args.out or os.path.relpath(os.path.join(TASK_ASSETS[args.task], "feedback"))
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    model = load_hf(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    splits = task.split_prompts()
    rng = np.random.default_rng(args.seed)
    key = jax.random.key(args.seed)

    train = []
    for family in task.FAMILIES:
        pool = [q for q in splits["train"] if task.prompt_family(q) == family]
        train += [pool[i] for i in rng.choice(len(pool), args.train_prompts // 2, replace=False)]
    train = [train[i] for i in rng.permutation(len(train))]
    heldout = splits["heldout_feedback"]
    answers = sample_many(model, tokenizer, train, args.samples, jax.random.fold_in(key, 1))
    heldout_answers = sample_many(model, tokenizer, heldout, args.samples, jax.random.fold_in(key, 2))

    binary = binary_rows(train, answers, task)
    files = {
        "binary.jsonl": binary,
        "likert.jsonl": [dict(prompt=r["prompt"], completion=r["completion"],
                              rating=task.rating(r["prompt"], r["completion"])) for r in binary],
        "paired.jsonl": paired_rows(train, answers, task),
        # Arithmetic only (its two families, and make_mismatch.py's redraw, are built around it).
        "mismatch_binary.jsonl": (mismatch_rows(train, answers, args.mismatch, rng)
                                  if args.task == "arithmetic" else None),
        "eval_binary.jsonl": binary_rows(heldout, heldout_answers, task),
        "eval_paired.jsonl": paired_rows(heldout, heldout_answers, task),
        "eval_prompts.jsonl": [eval_prompt_row(q, task) for q in splits["eval"]],
    }
    files = {name: rows for name, rows in files.items() if rows is not None}
    for name, rows in files.items():
        write_jsonl(os.path.join(args.out, name), rows)
    sft = success_rate(model, tokenizer, splits["eval"], jax.random.fold_in(key, 3),
                       samples_per_prompt=args.eval_samples, task=task)
    greedy = success_rate(model, tokenizer, splits["eval"], key, temperature=0.0, task=task)
    all_train = [task.reward(q, a) for q, s in zip(train, answers) for a in s]
    manifest = dict(
        sft_success_eval_prompts=sft, sft_greedy_success_eval_prompts=greedy["success"],
        sampled_success_train_prompts=round(float(np.mean(all_train)), 4),
        sampling=dict(temperature=1.0, top_p=1.0, max_new_tokens=5, samples_per_prompt=args.samples),
        files={name: summary(rows, task) for name, rows in files.items() if name != "eval_prompts.jsonl"},
        eval_prompts=len(files["eval_prompts.jsonl"]), args=recorded_args(args),
        seconds=round(time.time() - t0, 1))
    manifest["files"]["likert.jsonl"]["note"] = LIKERT_NOTES[args.task]
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main()
