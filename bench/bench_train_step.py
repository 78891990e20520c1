"""Steady-state training throughput: our BCO train step against TRL 1.13.0's BCOTrainer, one CPU run.

Both sides start from one random LlamaForCausalLM folder written by transformers (with a word-level
tokenizer whose vocabulary is exactly the model's), read the same unpaired feedback rows in file order
(every row exactly `--seq` tokens: BOS + prompt, completion + EOS, no padding), and take the same AdamW
steps in float32 with a live reference model and no activation checkpointing:

  ours  the jitted `bco_jax.step.train_step` as `bco_jax.build.build` makes it (mesh 1,1,1, one CPU device,
        reward_shift=ema, state donated), timed per step from the host batch to the finished step:
        `put_batch` (host -> device) + the step + block_until_ready. Compilation (trace + XLA
        compile, done ahead of time) is timed separately and XLA's memory analysis is reported.
  trl   BCOTrainer (torch CPU float32, bf16 off, activation_checkpointing off, optim adamw_torch),
        timed by a TrainerCallback from on_step_begin to on_step_end: forward of policy and
        reference, backward, clipping, optimizer and scheduler step. The Trainer fetches and collates
        the step's batch before on_step_begin, so data loading is outside the timed window.

Each side runs in its own subprocess (clean peak RSS, no shared thread pools), one after the other;
both get the same number of intra-op threads (`--threads`, default: the CPUs this process may use).
Throughput is the median over `--steps` timed steps after `--warmup` untimed ones. Because the CPUs
may be shared, the meaningful number is the ratio ours / TRL measured in the same run.

    .venv/bin/python -m bench.bench_train_step                 # defaults: 4 layers, hidden 256, batch 8, seq 128
    .venv/bin/python -m bench.bench_train_step --layers 2 --steps 10 --no-save

Writes bench/results/train_step-<UTC time>.json and .md (and prints the table). The sides are in
`train_step_ours.py` and `train_step_trl.py`, the lock-step harness in `lockstep.py`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

from bench.fixtures import RESULTS, add_model_args, build_model_dir, git_commit, machine_info, versions, write_rows
from bench.lockstep import Gate, run_sides
from bench.train_step_ours import run_ours
from bench.train_step_trl import run_trl

MODULE = "bench.bench_train_step"  # what the driver runs each side's child process as


def markdown(rec):
    o, t, a = rec["ours"], rec["trl"], rec["args"]
    def mib(b):
        return f"{b / 2**20:.1f} MiB"
    lines = [
        f"# train step: bco-jax vs TRL {rec['versions']['trl']} BCOTrainer ({rec['time_utc']})", "",
        f"Llama {a['layers']} layers, hidden {a['hidden']}, {a['heads']} heads / {a['kv_heads']} kv, "
        f"intermediate {a['intermediate']}, vocab {a['vocab']}; batch {a['batch']} x {a['seq']} tokens; "
        f"float32, {'precomputed reference log-probs' if a.get('precompute') else 'live reference'}, "
        f"ours remat={a['remat']}, TRL activation checkpointing off; "
        f"median of {a['steps']} steps after {a['warmup']} warm-up; "
        + ("sides in lock-step (TRL's step i, then ours; each in its own process). " if a["lockstep"]
           else "sides one after the other. ")
        + f"Threads: {a['threads']} torch intra-op (OMP_WAIT_POLICY={a['omp_wait_policy']}); "
        f"XLA's CPU pool uses the {rec['machine']['cpus_allowed']} CPUs.",
        "",
        "| | step (median) | examples/s | tokens/s | min / max step | compile |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| ours (jax {rec['versions']['jax']}) | {o['step_s_median'] * 1e3:.1f} ms | {o['examples_per_s']:.2f} | "
        f"{o['tokens_per_s']:.0f} | {o['step_s_min'] * 1e3:.0f} / {o['step_s_max'] * 1e3:.0f} ms | "
        f"{o['compile_s']['trace_lower']:.2f} s trace + {o['compile_s']['xla_compile']:.2f} s XLA |",
        f"| TRL (torch {rec['versions']['torch']}) | {t['step_s_median'] * 1e3:.1f} ms | {t['examples_per_s']:.2f} | "
        f"{t['tokens_per_s']:.0f} | {t['step_s_min'] * 1e3:.0f} / {t['step_s_max'] * 1e3:.0f} ms | "
        f"none (first step {t['first_step_s'] * 1e3:.0f} ms) |",
        "",
        f"**ours / TRL, examples/s: {rec['ratio_examples_per_s']:.2f}x**"
        + (f" (median of {len(rec['ratio_by_round'])} rounds: " + ", ".join(f"{x:.2f}" for x in rec["ratio_by_round"])
           + "; the table shows round 1)" if len(rec["ratio_by_round"]) > 1 else "") + " "
        f"(ours pipelined as the trainer runs it, no per-step block: "
        f"{o['examples_per_s_pipelined']:.2f} examples/s, "
        f"{o['examples_per_s_pipelined'] / t['examples_per_s']:.2f}x).",
        "",
        f"Memory. Ours, XLA memory analysis of the compiled step: arguments "
        f"{mib(o['xla_memory']['argument_size_in_bytes'])}, temporaries {mib(o['xla_memory']['temp_size_in_bytes'])}, "
        f"outputs {mib(o['xla_memory']['output_size_in_bytes'])} "
        f"(aliased {mib(o['xla_memory']['alias_size_in_bytes'])}); "
        f"peak RSS {o['peak_rss_mib']['after_setup']:.0f} MiB after setup, {o['peak_rss_mib']['after_compile']:.0f} "
        f"after compile, {o['peak_rss_mib']['end']:.0f} at the end. "
        f"TRL: peak RSS {t['peak_rss_mib']['after_setup']:.0f} MiB after setup, {t['peak_rss_mib']['end']:.0f} "
        "at the end "
        f"(+{t['peak_rss_mib']['end'] - t['peak_rss_mib']['after_setup']:.0f} MiB while training).",
        "",
        f"Losses, first / last step: ours {o['losses'][0]:.4f} / {o['losses'][-1]:.4f}, "
        f"TRL {t['losses'][0]:.4f} / {t['losses'][-1]:.4f}.",
    ]
    if o.get("parts"):
        p = o["parts"]
        lines += ["", "Parts of our step on the same batch (separately jitted, median of 5): "
                  + ", ".join(f"{k[:-2]} {v * 1e3:.1f} ms" for k, v in p.items()) + "."]
    m = rec["machine"]
    lines += ["", f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['platform']}, Python {m['python']}. "
              f"Load average (1/5/15 min) before {rec['load_before']}, after {rec['load_after']}. "
              f"Commit {rec['git_commit']}. Command: `{rec['command']}`. Wall time {rec['wall_s']:.0f} s.", ""]
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p, vocab=4096)
    p.add_argument("--seq", type=int, default=128, help="tokens per row: prompt seq/2 (BOS incl.) + completion")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch intra-op threads (XLA's CPU pool uses every allowed CPU)")
    p.add_argument("--remat", default="none", choices=["none", "full", "save_dots"],
                   help="our rematerialisation (TRL's activation checkpointing stays off; none is the like-for-like)")
    p.add_argument("--omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE"],
                   help="OpenMP wait policy of torch's threads; ACTIVE (spinning) collapses on a shared machine")
    p.add_argument("--parts", action=argparse.BooleanOptionalAction, default=True,
                   help="also time pieces of our step (reference forward, policy value_and_grad)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the whole comparison this many times; the ratio is the median over rounds")
    p.add_argument("--lockstep", action=argparse.BooleanOptionalAction, default=True,
                   help="alternate the sides step by step (TRL's step i, then ours) instead of one after the other")
    p.add_argument("--side", choices=["both", "ours", "trl"], default="both")
    p.add_argument("--precompute", action=argparse.BooleanOptionalAction, default=False,
                   help="both sides precompute reference log-probs before training (no reference in the step)")
    p.add_argument("--no-save", action="store_true", help="print only, write nothing to the results folder")
    p.add_argument("--results", default=RESULTS, help="folder for the JSON and Markdown results")
    p.add_argument("--_side", help=argparse.SUPPRESS)
    p.add_argument("--_work", help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    p.add_argument("--_gate", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.intermediate is None:
        args.intermediate = round(args.hidden * 2.6875)
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args._side:  # a child: one side, result to a file
        work = json.loads(args._work)
        result = {"ours": run_ours, "trl": run_trl}[args._side](args, work, Gate(args._gate))
        with open(args._out, "w") as f:
            json.dump(result, f)
        return 0

    args.passthrough = argv  # the children read the model options; they save nothing
    start = time.perf_counter()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_train_step-") as tmp:
        work = {"dir": tmp, "model": os.path.join(tmp, "model"), "data": os.path.join(tmp, "train.jsonl")}
        build_model_dir(work["model"], args)
        write_rows(work["data"], args, args.batch * (args.warmup + args.steps))
        rounds = [run_sides(MODULE, args, work) for _ in range(args.rounds)]
    results = rounds[0]
    load_after = os.getloadavg()
    now = datetime.datetime.now(datetime.timezone.utc)
    rec = {
        "time_utc": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(["python", "-m", MODULE, *argv]),
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("passthrough", "results")},
        "machine": machine_info(), "versions": versions(), "git_commit": git_commit(),
        "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in load_after],
        **results, "wall_s": time.perf_counter() - start,
    }
    if "ours" in results and "trl" in results:
        ratios = [r["ours"]["examples_per_s"] / r["trl"]["examples_per_s"] for r in rounds]
        rec["ratio_examples_per_s"] = statistics.median(ratios)
        rec["ratio_by_round"] = ratios
        rec["later_rounds"] = [{side: {k: r[side][k] for k in ("step_s_median", "examples_per_s", "tokens_per_s")}
                                for side in r} for r in rounds[1:]]
        print(markdown(rec))
    else:
        print(json.dumps(rec, indent=1))
    if not args.no_save:
        os.makedirs(args.results, exist_ok=True)
        stem = os.path.join(args.results, "train_step-" + now.strftime("%Y%m%dT%H%M%SZ"))
        with open(stem + ".json", "w") as f:
            json.dump(rec, f, indent=1)
        if "ratio_examples_per_s" in rec:
            with open(stem + ".md", "w") as f:
                f.write(markdown(rec))
        print(f"wrote {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
