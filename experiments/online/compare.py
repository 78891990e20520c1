"""Online vs offline at an equal budget of judged answers, on the arithmetic task (issue 21's protocol,
first cut: one learning rate per method, `--seeds` seeds; the grid and the intervals are still to come).

    python -m experiments.online.compare [--seeds 0 1 2] [--out experiments/online/results/compare.json]

Every method sees ROUNDS x PROMPTS x K judged answers sampled from a policy and trains the same number
of optimizer steps of BATCH answers:
  online_bco   BCO, each round's answers sampled from the current policy;
  offline_bco  BCO, all answers sampled once from the starting model (one round holding them all,
               trained for every step: the online loop with rounds = 1);
  online_dpo   DPO on each prompt's first thumbs-up and first thumbs-down answer;
  grpo         GRPO (TRL's dapo aggregation, beta 0): one step per round over all its 256 answers,
               the same answers in 32 steps of 256 (GRPO here takes one step per round).
Scored by the oracle on the 300 held-out prompts (1,200 answers at T=1), before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

ROUNDS, PROMPTS, K, STEPS, BATCH = 32, 64, 4, 2, 128
COMMON = ["--max_completion_length", "5", "--max_length", "16", "--warmup_ratio", "0.1", "--lr_scheduler_type",
          "linear", "--tensorboard", "false", "--logging_steps", "1"]
METHODS = {
    "online_bco": ["--loss_type", "bco", "--learning_rate", "3e-4", "--rounds", str(ROUNDS),
                   "--prompts_per_round", str(PROMPTS), "--steps_per_round", str(STEPS), "--batch_size", str(BATCH)],
    "offline_bco": ["--loss_type", "bco", "--learning_rate", "3e-4", "--rounds", "1",
                    "--prompts_per_round", str(ROUNDS * PROMPTS), "--steps_per_round", str(ROUNDS * STEPS),
                    "--batch_size", str(BATCH)],
    "online_dpo": ["--loss_type", "dpo", "--learning_rate", "3e-4", "--rounds", str(ROUNDS),
                   "--prompts_per_round", str(PROMPTS), "--steps_per_round", str(STEPS), "--batch_size", str(BATCH)],
    "grpo": ["--loss_type", "dapo", "--learning_rate", "3e-4", "--rounds", str(ROUNDS),
             "--prompts_per_round", str(PROMPTS), "--steps_per_round", "1", "--batch_size", str(PROMPTS * K)],
}


def success(model_dir: str, seed: int) -> float:
    from flax import nnx

    from bco_jax.load import load_tokenizer
    from bco_jax.models import load_hf
    from bco_jax.oracle import demo

    graphdef, params = nnx.split(load_hf(model_dir))
    return demo.success(graphdef, params, load_tokenizer(model_dir), seed=seed, samples=1200)["oracle_success"]


def summary(runs: list[dict]) -> dict:
    """Per method: mean held-out success over seeds; against online BCO, the mean paired difference
    (same seed) with a t-based 95% interval over seeds (not corrected for multiplicity)."""
    import numpy as np
    from scipy import stats

    by = {}
    for run in runs:
        by.setdefault(run["method"], {})[run["seed"]] = run["success"]
    out = {}
    for method, seeds in by.items():
        entry = {"mean_success": float(np.mean(list(seeds.values()))), "seeds": len(seeds)}
        if method != "online_bco" and "online_bco" in by:
            common = sorted(set(seeds) & set(by["online_bco"]))
            d = np.array([by["online_bco"][s] - seeds[s] for s in common])
            if len(d) > 1:
                half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
                entry["online_bco_minus_this"] = [float(d.mean() - half), float(d.mean()), float(d.mean() + half)]
        out[method] = entry
    return out


def main(argv=None) -> int:
    from bco_jax import online, oracle
    from bco_jax.run_dir import RunDir

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--out", default="experiments/online/results/compare.json")
    args = p.parse_args(argv)
    base = ["--model", oracle.MODEL_DIR, "--prompts", os.path.join(oracle.FEEDBACK_DIR, "train_prompts.jsonl"),
            "--judge", "arithmetic", "--num_generations", str(K), *COMMON]
    results = {"settings": {"rounds": ROUNDS, "prompts_per_round": PROMPTS, "num_generations": K,
                            "steps_per_round": STEPS, "batch_size": BATCH, "methods": METHODS}, "runs": []}
    with tempfile.TemporaryDirectory() as work:
        for seed in args.seeds:
            sft = success(oracle.MODEL_DIR, seed)
            for method in args.methods:
                out, t0 = os.path.join(work, f"{method}-{seed}"), time.perf_counter()
                code = online.main(base + METHODS[method] + ["--seed", str(seed), "--output_dir", out])
                if code != 0:
                    raise SystemExit(f"{method} seed {seed}: exit {code}")
                with open(RunDir(out).metrics, encoding="utf-8") as f:
                    rows = [json.loads(line) for line in f]
                after = success(RunDir(out).hf, seed)
                run = {"method": method, "seed": seed, "sft_success": sft, "success": after,
                       "judged_answers": sum(r["thumbs_up"] + r["thumbs_down"] for r in rows),
                       "steps": rows[-1]["step"], "final_kl": rows[-1].get("kl"),
                       "wall_s": round(time.perf_counter() - t0, 1)}
                print(json.dumps(run), flush=True)
                results["runs"].append(run)
    results["summary"] = summary(results["runs"])
    print(json.dumps(results["summary"], indent=1))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
