"""Sampling answers from a model for oracle-task prompts, and scoring them with the oracle.

Shared by the oracle tasks (`bco_jax.oracle.task`, arithmetic, the default; `bco_jax.oracle.interval`):
`success_rate` takes the task module whose `reward`, `prompt_family` and `FAMILIES` score the answers.

Prompts are tokenized as the trainer tokenizes them (BOS + characters), padded to one fixed width and
batched at one fixed batch size, so `generate` compiles once however many prompts there are.
"""
from __future__ import annotations

import jax
import numpy as np

from bco_jax.data.tokenize import decode_answer
from bco_jax.models import generate
from bco_jax.models.generate import left_padded
from bco_jax.oracle import task
from bco_jax.sharding import host_gather, put_rows, rounded_to_data, row_block

PROMPT_WIDTH = 8  # BOS + the longest prompt: a question ("99+99=") 6 characters, an interval ("(10 99)") 7
MAX_NEW_TOKENS = 5  # the longest answer is 3 digits + EOS; one more lets a runaway answer show


def encode_prompts(tokenizer, prompts: list[str], width: int = PROMPT_WIDTH):
    """(ids, mask) [n, width] int32, left-padded, BOS first as in training."""
    rows = [tokenizer(prompt).input_ids for prompt in prompts]  # the post-processor prepends BOS
    for prompt, row in zip(prompts, rows):
        if len(row) > width:
            raise ValueError(f"prompt {prompt!r} is longer than {width} tokens")
    return left_padded(rows, tokenizer.pad_token_id, width)


def sample_completions(model, tokenizer, prompts: list[str], rng, *, temperature: float = 1.0,
                       top_p: float = 1.0, max_new_tokens: int = MAX_NEW_TOKENS,
                       batch_size: int = 512, mesh=None) -> list[str]:
    """One sampled completion per prompt (text without EOS). `rng` is a jax key; the result depends
    only on it, the model and the prompts' order (batches get keys folded from it). With `mesh` (a
    multi-process run: every process calls it alike), each process samples its block of every batch
    and every process gets all the answers."""
    completions = []
    if mesh is not None:
        batch_size = rounded_to_data(batch_size, mesh)
        mine = row_block(batch_size, mesh)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids, mask = encode_prompts(tokenizer, chunk + [chunk[0]] * (batch_size - len(chunk)))
        if mesh is not None:
            ids, mask = ids[mine], mask[mine]
        tokens, out_mask = generate(model, ids, mask, max_new_tokens=max_new_tokens,
                                    temperature=temperature, top_p=top_p,
                                    rng=jax.random.fold_in(rng, start),
                                    eos_ids=(tokenizer.eos_token_id,), pad_id=tokenizer.pad_token_id, mesh=mesh)
        if mesh is not None:  # every process's rows, to every process
            tokens, out_mask = (host_gather(x) for x in put_rows((tokens, out_mask), mesh))
        tokens, out_mask = np.asarray(tokens), np.asarray(out_mask)
        for row in range(len(chunk)):  # a malformed answer stays malformed as text (`decode_answer`)
            completions.append(decode_answer(tokenizer, tokens[row][out_mask[row] > 0], (tokenizer.eos_token_id,)))
    return completions


def success_rate(model, tokenizer, prompts: list[str], rng, *, samples_per_prompt: int = 1,
                 task=task, **sampling) -> dict[str, float]:
    """Oracle success rate of sampled answers, overall and per prompt family, with the number of
    samples scored (`n`) so a reader can judge the noise. `task` is the oracle task's module (anything
    with `reward`, `prompt_family` and `FAMILIES`): the arithmetic task unless told otherwise."""
    repeated = [p for _ in range(samples_per_prompt) for p in prompts]
    completions = sample_completions(model, tokenizer, repeated, rng, **sampling)
    wins = np.array([task.reward(p, c) for p, c in zip(repeated, completions)])
    families = np.array([task.prompt_family(p) for p in repeated])
    result = {"success": float(wins.mean()), "n": len(repeated)}
    for family in task.FAMILIES:
        result[f"success_{family}"] = float(wins[families == family].mean())
    return result
