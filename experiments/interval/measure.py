"""Measure the interval task's SFT model: its exact answer distribution on the eval prompts, what its
samples and greedy answers are, and the shipped assets' sizes; optionally record them in the manifest.

    .venv/bin/python -m experiments.interval.measure --manifest bco_jax/assets/interval/feedback/manifest.json

The interval task's point is that each right answer is individually unlikely. Sampled success rates do
not show that; the model's probability of every complete answer does: for each eval prompt this scores
p(x <eos> | prompt) for x = 0..99 (every number an answer can be; the rest of the mass is on malformed or
3-digit answers) and compares it with the demonstrations' exact distribution
(`interval.answer_distribution`): mass inside / on a boundary / just outside, the most likely right and
wrong answers, and KL(demonstrations || model) in nats, the part of the SFT loss the model could still lose.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from transformers import AutoTokenizer

from bco_jax.models import load_hf, sequence_logps
from bco_jax.oracle import INTERVAL_ASSETS, interval
from bco_jax.oracle.sampling import sample_completions, success_rate
from bco_jax.oracle.tokenizer import VOCAB

SEQ_LEN = 12
NUMBERS = np.arange(100)


@nnx.jit
def _logps(model, ids, attn, loss_mask):
    return sequence_logps(model, ids, attn, loss_mask)[0]


def answer_logps(model, prompts: list[str], batch: int = 2000) -> np.ndarray:
    """log p(x <eos> | <bos> prompt) for every x in 0..99: [len(prompts), 100]."""
    rows = [(p, str(x)) for p in prompts for x in NUMBERS]
    rows += [rows[0]] * (-len(rows) % batch)  # whole batches: one compilation
    ids = np.full((len(rows), SEQ_LEN), VOCAB["<pad>"], np.int32)
    attn, loss = np.zeros_like(ids), np.zeros_like(ids)
    for r, (p, x) in enumerate(rows):
        toks = [VOCAB["<bos>"]] + [VOCAB[c] for c in p + x] + [VOCAB["<eos>"]]
        ids[r, :len(toks)], attn[r, :len(toks)] = toks, 1
        loss[r, 1 + len(p):len(toks)] = 1
    out = np.concatenate([np.asarray(_logps(model, *map(jnp.asarray, (ids[s:s + batch], attn[s:s + batch],
                                                                      loss[s:s + batch]))))
                          for s in range(0, len(rows), batch)])
    return out[:len(prompts) * len(NUMBERS)].reshape(len(prompts), len(NUMBERS))


def distribution_stats(prompts: list[str], q: np.ndarray, noise: float) -> dict:
    """Per-prompt quantities of the model's answer distribution q [n, 100], averaged overall and per
    family, beside the same for the demonstrations' distribution."""
    per = []
    for prompt, qp in zip(prompts, q):
        a, b, family = interval.parse_prompt(prompt)
        xs = np.arange(len(qp))  # the numbers 0..99
        inside = (xs > a) & (xs < b)
        boundary = (xs == a) | (xs == b)
        near = ~inside & ~boundary & (xs >= a - interval.NEAR_DISTANCE) & (xs <= b + interval.NEAR_DISTANCE)
        demo = np.zeros(len(NUMBERS))
        for x, px in interval.answer_distribution(prompt, noise).items():
            demo[x] = px
        support = demo > 0
        per.append(dict(
            family=family,
            inside=qp[inside].sum(), boundary=qp[boundary].sum(), near=qp[near].sum(),
            other_number=qp[~inside & ~boundary & ~near].sum(), not_a_2digit_number=1.0 - qp.sum(),
            max_right=qp[inside].max(), max_wrong=qp[~inside].max(),
            mode_is_right=float(inside[np.argmax(qp)]),
            demo_max_right=demo[inside].max(), demo_max_wrong=demo[~inside].max(),
            kl_demo_model=float(np.sum(demo[support] * np.log(demo[support] / np.maximum(qp[support], 1e-30)))),
        ))
    out = {}
    for family in (None,) + interval.FAMILIES:
        rows = [r for r in per if family is None or r["family"] == family]
        out[family or "all"] = {k: round(float(np.mean([r[k] for r in rows])), 4)
                                for k in per[0] if k != "family"}
    return out


def token_greedy(dist: dict[int, float]) -> int | None:
    """The answer greedy decoding gives under a distribution over numbers: the most probable next
    character (a digit or EOS) given the prefix, one at a time, as `generate` at temperature 0 does."""
    strings = {str(x): p for x, p in dist.items()}
    prefix = ""
    while True:
        ends = strings.get(prefix, 0.0)
        nxt = {c: sum(p for s, p in strings.items() if s.startswith(prefix + c)) for c in "0123456789"}
        c = max(nxt, key=nxt.get)
        if ends >= nxt[c]:
            return int(prefix) if prefix else None
        prefix += c


def rating_counts(prompts, completions) -> dict[str, int]:
    ratings = [interval.rating(p, c) for p, c in zip(prompts, completions)]
    return {str(v): ratings.count(v) for v in range(1, 6)}


def asset_bytes(root: str = INTERVAL_ASSETS) -> dict:
    """Sizes of the shipped files (manifest.json itself left out: it holds this table)."""
    sizes = {}
    for folder, _, names in sorted(os.walk(root)):
        for name in sorted(names):
            if name != "manifest.json":
                path = os.path.join(folder, name)
                sizes[os.path.relpath(path, root)] = os.path.getsize(path)
    return dict(files=sizes, total=sum(sizes.values()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(INTERVAL_ASSETS, "sft"))
    p.add_argument("--noise", type=float, default=0.5, help="the SFT demonstrations' noise")
    p.add_argument("--samples", type=int, default=8, help="T=1 answers per eval prompt")
    p.add_argument("--assets", default=INTERVAL_ASSETS, help="folder whose file sizes are recorded")
    p.add_argument("--manifest", default=None, help="manifest.json to add the measurements to")
    args = p.parse_args(argv)
    t0 = time.time()
    model, tokenizer = load_hf(args.model), AutoTokenizer.from_pretrained(args.model)
    prompts = interval.split_prompts()["eval"]
    q = np.exp(answer_logps(model, prompts))
    repeated = [x for _ in range(args.samples) for x in prompts]
    sampled = sample_completions(model, tokenizer, repeated, jax.random.key(3))
    greedy = sample_completions(model, tokenizer, prompts, jax.random.key(0), temperature=0.0)
    measured = dict(
        answer_distribution_eval_prompts=distribution_stats(prompts, q, args.noise),
        sampled_ratings_eval_prompts=rating_counts(repeated, sampled),
        greedy_ratings_eval_prompts=rating_counts(prompts, greedy),
        # Greedy decoding of the demonstrations' own distribution: what a model that learned them exactly
        # would answer at temperature 0.
        demo_greedy_success_eval_prompts=round(float(np.mean([
            interval.reward(x, str(token_greedy(interval.answer_distribution(x, args.noise)))) for x in prompts])), 4),
        greedy_success_eval_prompts=success_rate(model, tokenizer, prompts, jax.random.key(0),
                                                 temperature=0.0, task=interval),
        distinct_right_answers_sampled=len({(x, c) for x, c in zip(repeated, sampled) if interval.is_success(x, c)}),
        right_samples=int(sum(interval.is_success(x, c) for x, c in zip(repeated, sampled))),
        asset_bytes=asset_bytes(args.assets) if os.path.isdir(args.assets) else None,
        seconds=round(time.time() - t0, 1),
    )
    print(json.dumps(measured, indent=1))
    if args.manifest:
        with open(args.manifest) as f:
            manifest = json.load(f)
        manifest["measured"] = measured
        with open(args.manifest, "w") as f:
            json.dump(manifest, f, indent=1)


if __name__ == "__main__":
    main()
