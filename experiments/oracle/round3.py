"""Evidence round 3 (issue 22): is round 2's "the reward shift does not help" a matter of KL, regime,
estimator or sign? Six parts, each one resumable command per task, all on round 2's tasks, data and
scoring (`protocol.py`, `run_all.py`):

    .venv/bin/python -m experiments.oracle.round3 --task arithmetic --part curves   # or: --part all
    .venv/bin/python -m experiments.oracle.round3 --report    # tables, figure (round3_report.py)
    .venv/bin/python -m experiments.oracle.round3 --check     # the pinned verdicts still hold

Parts (the rates are round 2's selected ones unless said; 200 steps of 64 sequences unless said):
  curves  BCO and BCE, seeds 0-4, the policy scored (success, KL to SFT on the test prompts) every
          CURVE_EVERY steps: the best success within a KL budget, not only at the end (part 1).
  regime  the paper's regime: 1 epoch of binary.jsonl (47 steps) at one small rate shared by every
          method (BCO, BCE, DPO, KTO), at each of REGIME_RATES, seeds 0-2 (part 2).
  shift   delta's estimators: the paper's Eq. 7 per step (reward_shift_decay 0) and the bias-corrected
          EMA (reward_shift=ema_corrected), seeds 0-4; part 1's ema and round 2's trl runs beside them (part 3).
  sweep   the causal test: delta held fixed at each of DELTAS (reward_shift=fixed) at BCO's rate,
          seeds 0-4; delta = 0 is BCE (part 4).
  redraw  seeds that redraw the feedback: seed s > 0 trains BCO and BCE on binary.jsonl sampled anew
          from the same SFT model with make_feedback --seed s (new train prompts, new answers, new
          labels); seeds 1-5 (part 5). The SFT model is not redrawn (8.5 min each).
  likert  BCO on likert.jsonl at the paper's threshold (top grade: rating_threshold 5), seeds 0-4 (part 7).
A seed fixes the data order and the scoring samples, so runs of one seed in one part are paired.
Every run is a line of results/round3_<task>.json; a rerun skips the finished ones.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time

from experiments.oracle import protocol as P

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
PARTS = ("curves", "regime", "shift", "sweep", "redraw", "likert")
STEPS = 200
CURVE_EVERY = 20
SEEDS = (0, 1, 2, 3, 4)
REGIME_SEEDS = (0, 1, 2)
REGIME_RATES = (3e-5, 1e-4, 3e-4)
REGIME_METHODS = ("bco", "bce", "dpo", "kto")
DELTAS = (0.5, 0.25, 0.0, -0.25, -0.5, -1.0)
REDRAW_SEEDS = (1, 2, 3, 4, 5)


def fixed(delta: float) -> str:
    return f"bco_fixed{delta:+g}"


def methods() -> dict:
    """Every method round 3 runs, by name (round 2's bco, bce, dpo, kto among them)."""
    bco = {"loss_type": "bco"}
    table = {name: spec for name, spec in P.method_table(mismatch=False).items()
             if name in ("bco", "bce", "dpo", "kto", "bco_trl_shift")}
    table.update({
        "bco_eq7": P.Method("binary.jsonl", {**bco, "reward_shift_decay": 0.0},
                            "BCO, delta = the batch's class-mean midpoint each step (the paper's Eq. 7, decay 0)"),
        "bco_ema_corrected": P.Method("binary.jsonl", {**bco, "reward_shift": "ema_corrected"},
                                      "BCO, class-mean EMAs bias-corrected as Adam's"),
        "bco_likert5": P.Method("likert.jsonl", {**bco, "rating_threshold": 5},
                                "BCO on likert.jsonl, thumbs-up iff rating = 5 (the paper's top grade)"),
    })
    for d in DELTAS:
        table[fixed(d)] = P.Method("binary.jsonl", {**bco, "reward_shift": "fixed", "reward_shift_value": d},
                                   f"BCO with delta fixed at {d:+g}")
    return table


def task_of(name: str, feedback_dir: str | None = None) -> P.Task:
    base = P.TASKS[name]()
    return P.Task(base.name, base.module, base.model_dir, feedback_dir or base.feedback_dir, methods())


def round2_rates(name: str) -> dict:
    """method -> the learning rate round 2 selected (its test phase at beta 0.1)."""
    from experiments.oracle.report import RESULTS as ROUND2

    with open(ROUND2[name], encoding="utf-8") as f:
        runs = json.load(f)["runs"]
    return {r["method"]: r["lr"] for r in runs if r.get("phase") == "test" and r["beta"] == P.BETA}


def plan(part: str, rates: dict) -> list[tuple[dict, int]]:
    """The runs of a part as (run, steps), in the order they run."""
    run = P.make_run
    epoch = -(-3000 // P.SEQUENCES_PER_STEP)  # binary.jsonl has 3,000 answers: 47 steps
    if part == "curves":
        return [(run(part, m, rates[m], P.BETA, s), STEPS) for s in SEEDS for m in ("bco", "bce")]
    if part == "regime":
        return [(run(part, m, lr, P.BETA, s), epoch) for lr in REGIME_RATES for s in REGIME_SEEDS
                for m in REGIME_METHODS]
    if part == "shift":
        return [(run(part, m, rates["bco"], P.BETA, s), STEPS) for s in SEEDS for m in ("bco_eq7", "bco_ema_corrected")]
    if part == "sweep":
        return [(run(part, fixed(d), rates["bco"], P.BETA, s), STEPS) for s in SEEDS for d in DELTAS]
    if part == "redraw":
        return [(run(part, m, rates[m], P.BETA, s), STEPS) for s in REDRAW_SEEDS for m in ("bco", "bce")]
    if part == "likert":
        return [(run(part, "bco_likert5", rates["bco"], P.BETA, s), STEPS) for s in SEEDS]
    raise ValueError(part)


def settings(name: str) -> dict:
    return {"task": name, "round2_rates": round2_rates(name), "steps": STEPS, "curve_every": CURVE_EVERY,
            "regime_rates": list(REGIME_RATES), "deltas": list(DELTAS), "beta": P.BETA,
            "sequences_per_step": P.SEQUENCES_PER_STEP, "max_length": P.MAX_LENGTH,
            "test_samples_per_prompt": P.TEST_SAMPLES}


# ------------------------------------------------------------------------------------- running


@contextlib.contextmanager
def snapshots(store: dict):
    """While training in this process: every evaluation (each eval_steps, and the end) keeps a host
    copy of the policy in `store[step]` as (graphdef, params). No eval_data is given, so the trainer's
    own evaluation is a no-op and the run trains exactly as without it."""
    import jax

    from bco_jax import train

    original = train.evaluate

    def capture(run, state, tables, writer=None, step=0):
        store[step] = (run.graphdef, jax.device_get(state.params))
        return original(run, state, tables, writer, step)

    train.evaluate = capture
    try:
        yield store
    finally:
        train.evaluate = original


def redraw_feedback(name: str, seed: int, work: str) -> str:
    """binary.jsonl and friends sampled anew from the task's SFT model with seed `seed` (cached)."""
    out = os.path.join(work, f"{name}_feedback_seed{seed}")
    if not os.path.exists(os.path.join(out, "manifest.json")):
        subprocess.run([sys.executable, "-m", "experiments.oracle.make_feedback", "--task", name, "--seed", str(seed),
                        "--out", out], check=True, stdout=subprocess.DEVNULL)
    return out


def run_part(name: str, part: str, results, scorer, work: str) -> None:
    from experiments.oracle.run_all import one_run

    for r, steps in plan(part, results.data["settings"]["round2_rates"]):
        if P.run_key(r) in results.done:
            continue
        task = task_of(name, redraw_feedback(name, r["seed"], work) if part == "redraw" else None)
        t0, store = time.perf_counter(), {}
        if part == "curves":
            task.methods[r["method"]] = P.Method(task.methods[r["method"]].data,
                                                 {**task.methods[r["method"]].keys, "eval_steps": CURVE_EVERY},
                                                 task.methods[r["method"]].what)
            with snapshots(store):
                rec = one_run(task, r, steps, scorer, work)
        else:
            rec = one_run(task, r, steps, scorer, work)
        if store and rec["status"] == "ok":
            rec["kl_curve"] = curve(store, scorer, r["seed"])
        print(f"[{time.strftime('%H:%M:%S')}] {name} {P.run_key(r)}: {rec['status']}"
              + (f" success {rec['success']:.3f} kl {rec['kl']:.2f} delta {rec['delta']:+.3f}"
                 if rec["status"] == "ok" else f" {rec['error']}") + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
        results.add(rec)


def curve(store: dict, scorer, seed: int) -> list[dict]:
    """Success and KL of each kept policy, scored as the final one is (same prompts, same samples)."""
    from flax import nnx

    points = [{"step": 0, **{k: scorer.sft[seed][k] for k in ("success", "kl")}}]
    for step in sorted(store):
        graphdef, params = store[step]
        out = scorer.test_model(nnx.merge(graphdef, params), seed, P.BETA, 0.0, heldout=False)
        points.append({"step": step, "success": out["success"], "kl": out["kl"]})
    return points


def run(name: str, parts: list[str], work: str) -> None:
    from experiments.oracle.run_all import Results, Scorer

    os.makedirs(work, exist_ok=True)
    results = Results(os.path.join(RESULTS, f"round3_{name}.json"), settings(name), fresh=False)
    scorer = Scorer(task_of(name), work)
    scorer.sft = {s: scorer.test(scorer.task.model_dir, s, P.BETA, 0.0) for s in SEEDS} if "curves" in parts else {}
    for part in parts:
        run_part(name, part, results, scorer, work)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=sorted(P.TASKS), nargs="+", default=sorted(P.TASKS))
    p.add_argument("--part", choices=(*PARTS, "all"), nargs="+", default=["all"])
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "bco_round3"))
    p.add_argument("--report", action="store_true", help="only the tables and the figure, from the saved runs")
    p.add_argument("--check", action="store_true", help="only assert the pinned verdicts on the saved runs")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("absl", "orbax", "jax._src", "bco_jax"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from experiments.oracle import round3_report

    if args.check:
        return round3_report.check()
    if not args.report:
        parts = list(PARTS) if "all" in args.part else args.part
        for name in args.task:
            run(name, parts, args.work)
    return round3_report.write()


if __name__ == "__main__":
    sys.exit(main())
