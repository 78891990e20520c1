"""Online BCO against offline BCO and the on-policy baselines, every method tuned on equal terms, at an
equal budget of judged answers (issue 21's evidence).

    .venv/bin/python -m experiments.online.protocol --task arithmetic   # resumable; then --task interval
    .venv/bin/python -m experiments.online.protocol --report            # tables, verdicts, figure
    .venv/bin/python -m experiments.online.protocol --task arithmetic --quick   # smoke, under /tmp

Every method sees ROUNDS x PROMPTS x K = 8,192 answers sampled from a policy and judged by the task's
oracle, and takes the same number of optimizer steps over them (`METHODS` below). The protocol is the
oracle protocol's (experiments/oracle): each method's learning rate is chosen on a grid of three rates
centred on round 2's selection for BCO on that task (one more beyond an edge if the best sits there),
by oracle success on the validation prompts (seed 100); then every method runs at its rate on the test
seeds and is scored on the test prompts (success and KL to the starting model). A seed fixes sampling,
judging order and the scoring samples, so the runs of one seed are paired.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from experiments.oracle import protocol as P

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(REPO, "experiments", "online", "results")

ROUNDS, PROMPTS, K, STEPS, BATCH = 32, 64, 4, 2, 128  # 8,192 judged answers, 64 steps of 128 (GRPO: 32 of 256)
LOOP = ["--num_generations", str(K), "--max_completion_length", str(P.MAX_NEW_TOKENS), "--max_length",
        str(P.MAX_LENGTH), "--warmup_ratio", str(P.WARMUP_RATIO), "--lr_scheduler_type", P.SCHEDULE,
        "--beta", str(P.BETA), "--tensorboard", "false", "--logging_steps", "1"]
ONLINE = ["--rounds", str(ROUNDS), "--prompts_per_round", str(PROMPTS), "--steps_per_round", str(STEPS),
          "--batch_size", str(BATCH)]
METHODS = {
    "online_bco": ["--loss_type", "bco", *ONLINE],
    "offline_bco": ["--loss_type", "bco", "--rounds", "1", "--prompts_per_round", str(ROUNDS * PROMPTS),
                    "--steps_per_round", str(ROUNDS * STEPS), "--batch_size", str(BATCH)],
    "offline_bco_4ep": ["--loss_type", "bco", "--rounds", "1", "--prompts_per_round", str(ROUNDS * PROMPTS),
                        "--steps_per_round", str(4 * ROUNDS * STEPS), "--batch_size", str(BATCH)],
    "online_bce": ["--loss_type", "bce", *ONLINE],
    "online_kto": ["--loss_type", "kto", *ONLINE],
    "online_dpo": ["--loss_type", "dpo", *ONLINE],
    "grpo": ["--loss_type", "dapo", "--beta", "0.0", "--rounds", str(ROUNDS), "--prompts_per_round", str(PROMPTS),
             "--steps_per_round", "1", "--batch_size", str(PROMPTS * K)],
}
WHAT = {
    "online_bco": "BCO, each round's answers sampled from the current policy; delta carried across rounds",
    "offline_bco": "BCO on the same number of answers sampled once from the starting model (one round)",
    "offline_bco_4ep": "offline BCO's answers, 4 passes over them (4x the steps: equal data, not equal compute)",
    "online_bce": "BCE (delta = 0), online",
    "online_kto": "KTO, online (its KL reference point from mismatched pairs of the batch)",
    "online_dpo": "DPO on each prompt's first thumbs-up and first thumbs-down answer (prompts where all K "
                  "agree are skipped)",
    "grpo": "GRPO, TRL's dapo aggregation, beta 0: one step per round over its 256 answers",
}
TASK_METHODS = {"arithmetic": list(METHODS), "interval": ["online_bco", "offline_bco", "grpo"]}
CENTRE = {"arithmetic": 1e-3, "interval": 3e-3}  # round 2's selected rate for BCO (experiments/oracle, interval)


def config(task: str, quick: bool) -> dict:
    i = P.LADDER.index(CENTRE[task])
    if quick:
        return {"grid": [CENTRE[task]], "max_extensions": 0, "grid_seeds": [100], "seeds": [0],
                "methods": ["online_bco", "grpo"], "rounds": 2}
    return {"grid": list(P.LADDER[i - 1:i + 2]), "max_extensions": 1, "grid_seeds": [100],
            "seeds": [0, 1, 2, 3, 4] if task == "arithmetic" else [0, 1, 2], "methods": TASK_METHODS[task],
            "rounds": ROUNDS}


def settings(task: str, cfg: dict) -> dict:
    return {"task": task, "protocol": cfg, "methods": {m: METHODS[m] for m in cfg["methods"]}, "loop": LOOP,
            "test_samples_per_prompt": P.TEST_SAMPLES, "val_samples_per_prompt": P.VAL_SAMPLES}


def argv_of(task: P.Task, run: dict, cfg: dict, prompts: str, out: str) -> list[str]:
    argv = ["--model", task.model_dir, "--prompts", prompts, "--judge", task.name, *LOOP, *METHODS[run["method"]],
            "--learning_rate", str(run["lr"]), "--seed", str(run["seed"]), "--output_dir", out]
    if cfg["rounds"] != ROUNDS and run["method"] != "offline_bco":  # --quick: fewer rounds of the same shape
        argv += ["--rounds", str(cfg["rounds"])]
    return argv


def one_run(task: P.Task, run: dict, cfg: dict, scorer, prompts: str, work: str) -> dict:
    import shutil

    from bco_jax import online
    from bco_jax.run_dir import RunDir

    out = os.path.join(work, f"{task.name}_{P.run_key(run)}".replace("/", "_"))
    shutil.rmtree(out, ignore_errors=True)
    record = dict(run, what=WHAT[run["method"]], argv=argv_of(task, run, cfg, prompts, out))
    t0 = time.perf_counter()
    code = online.main(record["argv"])
    if code != 0:
        return dict(record, status="failed", error=f"exit {code}")
    record["train_seconds"] = time.perf_counter() - t0
    with open(RunDir(out).metrics, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    rounds = [r for r in rows if "thumbs_up_rate" in r]
    delta = next((r["delta"] for r in reversed(rows) if "delta" in r), 0.0)
    record.update(judged_answers=sum(r["thumbs_up"] + r["thumbs_down"] for r in rounds), steps=rows[-1]["step"],
                  delta=delta, thumbs_up_rate=[r["thumbs_up_rate"] for r in rounds],
                  train_kl=[r.get("kl") for r in rounds])
    t0 = time.perf_counter()
    if run["phase"] == "grid":
        record.update(scorer.validation(RunDir(out).hf, run["seed"]))
    else:
        record.update(scorer.test(RunDir(out).hf, run["seed"], P.BETA, delta))
    record.update(score_seconds=time.perf_counter() - t0, status="ok")
    shutil.rmtree(out, ignore_errors=True)
    return record


def train_prompts(task: P.Task, work: str) -> str:
    """The task's training prompts (disjoint from validation and test) as a prompt file."""
    path = os.path.join(work, f"{task.name}_train_prompts.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in task.module.split_prompts()["train"])
    return path


def run_protocol(name: str, cfg: dict, out: str, work: str, fresh: bool) -> dict:
    from experiments.oracle.run_all import Results, Scorer

    task = P.TASKS[name]()
    os.makedirs(work, exist_ok=True)
    results = Results(out, settings(name, cfg), fresh)
    scorer, prompts = Scorer(task, work), train_prompts(task, work)

    failed = set()

    def do(run: dict) -> None:
        if P.run_key(run) in results.done | failed:
            return
        t0 = time.perf_counter()
        if run["method"] == "sft":
            rec = dict(run, what="the starting model (the reference)", status="ok",
                       **scorer.test(task.model_dir, run["seed"], P.BETA, 0.0))
        else:
            rec = one_run(task, run, cfg, scorer, prompts, work)
        score = rec.get("val_success", rec.get("success"))
        print(f"[{time.strftime('%H:%M:%S')}] {name} {P.run_key(run)}: {rec['status']}"
              + (f" success {score:.3f}" if score is not None else f" {rec.get('error')}")
              + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
        results.add(rec)
        if rec["status"] != "ok":
            failed.add(P.run_key(run))

    for method in cfg["methods"]:
        while True:
            todo = [P.make_run("grid", method, lr, P.BETA, s) for lr in P.grid_rates(results.data["runs"], method, cfg)
                    for s in cfg["grid_seeds"]]
            todo = [run for run in todo if P.run_key(run) not in results.done | failed]
            if not todo:
                break
            for run in todo:
                do(run)
    rates = selected(results.data["runs"], cfg)
    print("selected learning rates:", rates, flush=True)
    for seed in cfg["seeds"]:
        do(P.make_run("test", "sft", 0.0, P.BETA, seed))
        for method in cfg["methods"]:
            do(P.make_run("test", method, rates[method], P.BETA, seed))
    return results.data


def selected(runs: list[dict], cfg: dict) -> dict:
    out = {}
    for method in cfg["methods"]:
        scores = P.grid_scores(runs, method, P.grid_rates(runs, method, cfg), cfg)
        done = {lr: s for lr, s in scores.items() if s is not None}
        if done:
            out[method] = P.best_rate(done)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="arithmetic", choices=sorted(TASK_METHODS))
    p.add_argument("--quick", action="store_true", help="smoke test: 2 methods, 1 rate, 1 seed, 2 rounds, under /tmp")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "bco_online_runs"))
    p.add_argument("--fresh", action="store_true", help="ignore the results file instead of resuming it")
    p.add_argument("--report", action="store_true", help="only rebuild the tables and the figure")
    p.add_argument("--check", action="store_true", help="only assert the pinned verdicts")
    args = p.parse_args(argv)
    if args.report or args.check:
        from experiments.online import report

        return report.main(RESULTS, os.path.join(REPO, "docs"), check_only=args.check)
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.join(args.work, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    out = os.path.join(tempfile.gettempdir(), f"bco_online_{args.task}_quick.json") if args.quick else \
        os.path.join(RESULTS, f"protocol_{args.task}.json")
    results = run_protocol(args.task, config(args.task, args.quick), out, args.work, args.fresh)
    wall = sum(e.get("wall_seconds", 0) for e in results["environments"])
    print(f"{args.task}: {len(results['runs'])} runs, {wall / 60:.1f} min wall; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
