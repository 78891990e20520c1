"""Sequence packing: training throughput packed vs padded (with length buckets) on ragged lengths.

One random LlamaForCausalLM folder (`bench.fixtures.build_model_dir`: 4 layers, hidden 256, 8 heads /
4 kv, vocab 32000, word-level tokenizer) and unpaired feedback whose prompt and completion lengths (in
tokens, BOS and EOS included) are drawn from log-normals with medians 200 and 60 and sigma 0.8, each
capped at 1024; an example longer than `--max_length` has its prompt cut by the data pipeline, as
training does. Two runs are built with `bco_jax.build.build` as the CLI builds them (BCO, float32, live
reference, mesh 1,1,1 on one CPU device, `--batch` examples per step), one with `packing false`
(rows padded to the pipeline's length buckets, powers of 2 from 64) and one with `packing true`.
Both read the same examples in the same order.

Every batch shape the timed steps will see is compiled first (reported, not timed). Then the steps
alternate, padded step i then packed step i, each timed from the host batch to the finished step
(`put_batch` + step + `block_until_ready`), so load from other processes hits both alike. The two
runs take the same updates: their losses are printed side by side as a check. Throughput is
examples / total timed seconds; the ratio packed / padded is the number to read.

    .venv/bin/python -m bench.bench_packing                  # ~4 min on 2 cores
    .venv/bin/python -m bench.bench_packing --steps 3 --no-save

Writes bench/results/packing_cpu.json (and prints a summary).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

from bench.fixtures import (
    RESULTS,
    SPECIAL,
    add_model_args,
    build_model_dir,
    git_commit,
    lower_step,
    machine_info,
    step_shape,
    versions,
)


def ragged_lengths(n: int, args, seed: int = 0):
    """(prompt, completion) token counts, BOS / EOS included: log-normal, capped at `--cap`."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def draw(median):
        return np.clip(np.round(rng.lognormal(np.log(median), args.sigma, n)), 2, args.cap).astype(int)

    return draw(args.prompt_median), draw(args.completion_median)


def write_rows(path, args, n: int):
    import numpy as np

    prompts, completions = ragged_lengths(n, args)
    rng = np.random.default_rng(1)

    def words(k):
        return " ".join(f"w{i}" for i in rng.integers(0, args.vocab - len(SPECIAL), k))

    with open(path, "w", encoding="utf-8") as f:
        for i, (p, c) in enumerate(zip(prompts, completions)):  # BOS and EOS are added by tokenization
            f.write(json.dumps({"prompt": words(p - 1), "completion": " " + words(c - 1),
                                "label": bool(i % 2 == 0)}) + "\n")


def build_run(args, work, packing: bool):
    from bco_jax.build import build, initial_state
    from bco_jax.config import parse_args

    cfg = parse_args([
        "--model", work["model"], "--train_data", work["data"], "--batch_size", str(args.batch),
        "--max_steps", str(args.steps), "--learning_rate", "1e-5", "--warmup_ratio", "0", "--loss_type", "bco",
        "--mesh", "1,1,1", "--dtype", "float32", "--ref_dtype", "float32", "--max_length", str(args.max_length),
        "--packing", str(packing).lower(), "--seed", "0"])
    run = build(cfg, output_dir=os.path.join(work["dir"], "packed" if packing else "padded"))
    batches = [next(run.iterator) for _ in range(args.steps)]
    return run, initial_state(run), batches


def compile_all(run, state, batches):
    """{shape: compiled step} for every shape of `batches`, and the seconds it took."""
    from bco_jax.sharding import put_batch

    compiled, start = {}, time.perf_counter()
    for local in batches:
        key = step_shape(local)
        if key not in compiled:
            compiled[key] = lower_step(run, state, run.reference, put_batch(local, run.mesh)).compile()
    return compiled, time.perf_counter() - start


def token_stats(batches):
    """Real tokens, and token slots the step computes (rows x length), over `batches`."""
    real = sum(int(b.main.attention_mask.sum()) for b in batches)
    slots = sum(int(b.main.input_ids.size) for b in batches)
    return {"real_tokens": real, "token_slots": slots, "fill": real / slots,
            "shapes": sorted({f"{b.main.input_ids.shape[0]}x{b.main.input_ids.shape[1]}/C{b.shape.capacity}"
                              for b in batches})}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p, vocab=32000)
    p.add_argument("--batch", type=int, default=16, help="examples per optimizer step")
    p.add_argument("--steps", type=int, default=6, help="timed steps per mode")
    p.add_argument("--max_length", type=int, default=1024)
    p.add_argument("--prompt_median", type=float, default=200)
    p.add_argument("--completion_median", type=float, default=60)
    p.add_argument("--sigma", type=float, default=0.8)
    p.add_argument("--cap", type=int, default=1024, help="cap on each drawn length")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--output", default=os.path.join(RESULTS, "packing_cpu.json"))
    args = p.parse_args(argv)
    args.intermediate = args.intermediate or round(args.hidden * 2.6875)
    args.seq = args.max_length  # build_model_dir sizes max_position_embeddings from it
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    import jax

    from bco_jax.sharding import put_batch

    start, load_before = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_packing-") as tmp:
        work = {"dir": tmp, "model": os.path.join(tmp, "model"), "data": os.path.join(tmp, "train.jsonl")}
        build_model_dir(work["model"], args)
        write_rows(work["data"], args, args.batch * args.steps)
        modes = {}
        for name, packing in (("padded", False), ("packed", True)):
            run, state, batches = build_run(args, work, packing)
            compiled, compile_s = compile_all(run, state, batches)
            modes[name] = {"run": run, "state": state, "batches": batches, "compiled": compiled,
                           "compile_s": compile_s, "times": [], "losses": []}
            print(f"{name}: {len(compiled)} shapes compiled in {compile_s:.1f} s", flush=True)
        for i in range(args.steps):
            for m in modes.values():
                local = m["batches"][i]
                t = time.perf_counter()
                m["state"], metrics = m["compiled"][step_shape(local)](m["state"], m["run"].reference,
                                                                      put_batch(local, m["run"].mesh))
                jax.block_until_ready((m["state"], metrics))
                m["times"].append(time.perf_counter() - t)
                m["losses"].append(float(metrics["loss"]))
            print(f"step {i + 1}: " + ", ".join(f"{k} {m['times'][-1]:.2f} s loss {m['losses'][-1]:.6f}"
                                                for k, m in modes.items()), flush=True)
        report = {}
        for name, m in modes.items():
            total = sum(m["times"])
            report[name] = {"examples_per_s": args.batch * args.steps / total, "step_s": m["times"],
                            "compile_s": m["compile_s"], "compiled_shapes": len(m["compiled"]),
                            "losses": m["losses"], **token_stats(m["batches"])}
        lengths = ragged_lengths(args.batch * args.steps, args)
    ratio = report["packed"]["examples_per_s"] / report["padded"]["examples_per_s"]
    rec = {"time_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "command": " ".join(["python", "-m", "bench.bench_packing", *(argv if argv is not None else sys.argv[1:])]),
           "args": {k: v for k, v in vars(args).items() if k not in ("output", "no_save")},
           "drawn_lengths_mean": {"prompt": float(lengths[0].mean()), "completion": float(lengths[1].mean())},
           **report, "ratio_examples_per_s": ratio,
           "max_loss_difference": max(abs(a - b) for a, b in zip(report["packed"]["losses"],
                                                                  report["padded"]["losses"])),
           "machine": machine_info(), "versions": versions(), "git_commit": git_commit(),
           "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
           "wall_s": time.perf_counter() - start}
    for name in ("padded", "packed"):
        r = report[name]
        print(f"{name}: {r['examples_per_s']:.2f} examples/s, fill {r['fill']:.0%} of {r['token_slots']} token "
              f"slots, shapes {r['shapes']}, compile {r['compile_s']:.0f} s")
    print(f"packed / padded examples/s: {ratio:.2f}x (losses differ by at most {rec['max_loss_difference']:.1e})")
    if not args.no_save:
        os.makedirs(os.path.dirname(args.output), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(rec, f, indent=1)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
