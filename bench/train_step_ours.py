"""Our side of `bench_train_step`: the jitted train step as `python -m bco_jax.train` builds it, timed
per step from the host batch to the finished step, with its compile time and memory analysis, the same
steps pipelined as the trainer runs them, and (with `--parts`) where a step's time goes."""

from __future__ import annotations

import dataclasses
import os
import statistics
import time

from bench.fixtures import lower_step, peak_rss_mib, step_summary


def setup_ours(args, work):
    """Our run as `python -m bco_jax.train` builds it (`bco_jax.build.build`), and its host batches."""
    import jax

    from bco_jax.build import build, initial_state, precompute
    from bco_jax.config import parse_args
    from bco_jax.precompute import attach_tables

    total = args.warmup + args.steps
    cfg = parse_args([
        "--model", work["model"], "--train_data", work["data"], "--batch_size", str(args.batch),
        "--max_steps", str(total), "--learning_rate", str(args.lr), "--warmup_ratio", "0",
        "--max_grad_norm", "1.0", "--loss_type", "bco", "--reward_shift", "ema", "--shuffle", "false",
        "--mesh", "1,1,1", "--dtype", "float32", "--ref_dtype", "float32", "--remat", args.remat,
        "--max_length", str(args.seq), "--length_buckets", str(args.seq),
        "--precompute_ref_log_probs", str(args.precompute).lower()])
    run = build(cfg, output_dir=os.path.join(work["dir"], "ours"))
    tables = precompute(run)  # with --precompute: one reference pass, outside the timed steps
    if tables.ref_table is not None:
        run = dataclasses.replace(run, reference=None)
    # Host batches made up front: the pipeline is not what is measured.
    batches = [attach_tables(next(run.iterator), tables.ref_table) for _ in range(total)]
    first = batches[0]
    assert first.main.input_ids.shape == (args.batch, args.seq), first.main.input_ids.shape
    assert int(first.main.attention_mask.sum()) == args.batch * args.seq, "rows must fill seq exactly"
    state = initial_state(run)
    jax.block_until_ready((state, run.reference))
    return run, state, batches


def run_ours(args, work, gate):
    import jax

    from bco_jax.sharding import put_batch
    from bco_jax.step import memory_report

    run, state, batches = setup_ours(args, work)
    reference = run.reference
    rss_setup = peak_rss_mib()

    example = put_batch(batches[0], run.mesh)
    t0 = time.perf_counter()
    lowered = lower_step(run, state, reference, example)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    memory = memory_report(compiled)
    rss_compiled = peak_rss_mib()

    times, losses = [], []
    gate.signal()  # ready
    for i, local in enumerate(batches):
        gate.wait()
        start = time.perf_counter()
        state, metrics = compiled(state, reference, put_batch(local, run.mesh))
        jax.block_until_ready((state, metrics))
        elapsed = time.perf_counter() - start
        gate.signal()
        losses.append(float(metrics["loss"]))
        if i >= args.warmup:
            times.append(elapsed)
    gate.wait()  # the rest alone: TRL has finished
    # The trainer does not block per step (it reads step N-1's metrics while step N runs): the same
    # steps again, pipelined, as a second number.
    start = time.perf_counter()
    pending = None
    for local in batches[args.warmup:]:
        state, metrics = compiled(state, reference, put_batch(local, run.mesh))
        if pending is not None:
            float(pending["loss"])
        pending = metrics
    jax.block_until_ready((state, pending))
    pipelined = (time.perf_counter() - start) / args.steps

    parts = measure_parts(args, run.graphdef, run.ref_graphdef, state.params, reference,
                          put_batch(batches[0], run.mesh)) if args.parts and reference is not None else {}
    return step_summary(times, args, {
        "compile_s": {"trace_lower": t1 - t0, "xla_compile": t2 - t1},
        "pipelined_step_s_mean": pipelined, "examples_per_s_pipelined": args.batch / pipelined,
        "xla_memory": memory, "peak_rss_mib": {"after_setup": rss_setup, "after_compile": rss_compiled,
                                               "end": peak_rss_mib()},
        "losses": losses, "threads": {"xla_cpu_devices": len(jax.devices()),
                                      "cpus_allowed": len(os.sched_getaffinity(0))},
        "parts": parts, "devices": [str(d) for d in jax.devices()]})


def measure_parts(args, graphdef, ref_graphdef, params, reference, batch, repeats=5):
    """Where a step's time goes: jitted pieces of it on the same batch, median of `repeats`."""
    import jax
    from flax import nnx

    from bco_jax.models import sequence_logps

    seqs = jax.tree.map(lambda v: v[0], batch.main)

    def logps(gd, p, chunk_tokens):
        out, _ = sequence_logps(nnx.merge(gd, p), seqs.input_ids, seqs.attention_mask, seqs.loss_mask,
                                chunk_tokens=chunk_tokens)
        return out.sum()

    whole = args.batch * args.seq  # one chunk: no rematerialised LM head
    fns = {
        "reference_forward": jax.jit(lambda p: logps(ref_graphdef, p, 512)),
        "policy_value_and_grad": jax.jit(jax.value_and_grad(lambda p: logps(graphdef, p, 512))),
        "policy_value_and_grad_one_chunk": jax.jit(jax.value_and_grad(lambda p: logps(graphdef, p, whole))),
    }
    inputs = {"reference_forward": reference}
    out = {}
    for name, fn in fns.items():
        x = inputs.get(name, params)
        jax.block_until_ready(fn(x))
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            jax.block_until_ready(fn(x))
            ts.append(time.perf_counter() - t)
        out[name + "_s"] = statistics.median(ts)
    return out
