"""BCO train-step throughput and MFU on the accelerators of one host (H100 / H200 / a TPU host), self-contained.

    python -m bench.accelerator              # Llama-3.2-1B shape, seq 2048, within --budget 300 seconds
    python -m bench.accelerator --smoke      # a tiny shape on CPU (the test suite runs this)

(from the repository root). Random weights, no network, nothing of the data pipeline: it runs on an
image with jax, flax and optax. All devices on one mesh, the batch on "data", placed by `put_batch`.
Configurations: live / precomputed reference x kernel (cudnn, xla on GPU; splash, xla on TPU; xla on CPU).

1. Plan, before anything runs: each configuration's program (`bco_jax.plan.Planner` on this mesh) is
   compiled for this device at 2 and 4 rows per device (all at once, in threads), its memory counted
   as the planner counts it and fitted as fixed + rows x per_row. The batch is the largest that fits
   the device's memory less the planner's headroom (--max_rows at most); its own compile is checked
   against that before a step runs (one correction at most). No ladder of failing runs.
2. Fused kernels' per-row log-probs against XLA attention's on right-padded rows of different real
   lengths (--smoke: splash in interpret mode): pass when max |lp - lp_xla| / max(1, |lp_xla|) <=
   --tolerance (2e-2, bf16). A failed check or an error: exit status 1, after the JSON is written.
3. Timed steps on right-padded rows (real lengths between T/2 and T); tokens/s counts real tokens.
4. bench/results/accelerator-<time>.json is rewritten after each configuration (a cut-off run still
   reports). --budget: once a configuration's estimate would end past it, it and the rest are skipped.

MFU counts what the algorithm needs on real tokens (issue 11): policy 6 N_body per token + 6 D V per
scored token, reference 2 N_body + 2 D V, causal attention (forward 2 L^2 N H per layer and row of
real length L, the policy's backward twice that), over all devices' peak; the conventional 6 N_params
per real token beside it, labelled.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import json
import math
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DATASHEET_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v5e": 197.0, "TPU v5p": 459.0,
                         "TPU v4": 275.0, "TPU v6": 918.0}  # dense bf16, no sparsity
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                num_kv_heads=8, head_dim=64, rope_theta=500000.0, rope_type="llama3", rope_factor=32.0,
                rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_positions=8192,
                max_position_embeddings=131072, tie_word_embeddings=True, rms_norm_eps=1e-5)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=16, tie_word_embeddings=True)
PROBE_ROWS = (2, 4)  # rows per device the plan compiles at: two points of memory = fixed + rows x per_row
CHECK_ROWS = 8  # right-padded rows of the kernel check
ASSUMED_MFU = 0.25  # of the measured peak: the budget's step estimate until a configuration has run


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shape on CPU, 1 timed step: checks the script runs")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--max_rows", type=int, default=64, help="rows per device at most, whatever fits")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--remat", default="none", choices=["none", "full", "save_dots"])
    p.add_argument("--kernels", default="", help="attention kernels to time (default: by backend)")
    p.add_argument("--budget", type=float, default=300.0, help="seconds for the whole run; later configs skipped")
    p.add_argument("--tolerance", type=float, default=2e-2, help="fused vs XLA log-probs, relative (bf16)")
    p.add_argument("--device_memory", default="", help="per device, e.g. 80GiB (default: the allocator's limit)")
    p.add_argument("--compile_threads", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = p.parse_args(argv)
    if args.smoke:  # a pretend 12 MiB device: memory, not --max_rows, sets the batch (about 5 rows)
        args.seq, args.steps, args.warmup, args.device_memory = 64, 1, 1, args.device_memory or "12MiB"
    return args


# ------------------------------------------------------------------------------------------ counts


def body_params(c) -> int:
    """Parameters of the layers (no embedding, no LM head): what every token runs through."""
    D, F, N, K, H = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    return c.num_layers * (D * N * H + 2 * D * K * H + N * H * D + 3 * D * F + 2 * D)


def step_flops(c, lengths, scored, live_reference: bool) -> dict:
    """FLOPs of one step over rows of real `lengths` with `scored` completion tokens: what the
    algorithm needs, and the conventional 6 N per (real) token."""
    tokens, scored_tokens, squares = sum(lengths), sum(scored), sum(n * n for n in lengths)
    head = c.hidden_size * c.vocab_size
    attention_fwd = c.num_layers * 2 * squares * c.num_heads * c.head_dim  # causal: half of 4 L^2 N H
    needed = 6 * body_params(c) * tokens + 6 * head * scored_tokens + 3 * attention_fwd
    if live_reference:
        needed += 2 * body_params(c) * tokens + 2 * head * scored_tokens + attention_fwd
    all_params = body_params(c) + c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return {"needed": float(needed), "conventional_6N": float(6 * all_params * tokens)}


def choose_rows(probe_rows, probe_bytes, usable: int, max_rows: int) -> dict:
    """The most rows per device whose memory, fitted as fixed + rows x per_row through the two probes,
    is within `usable` (at most `max_rows`; 0 when one row does not fit)."""
    (r1, r2), (m1, m2) = probe_rows, probe_bytes
    per_row = max((m2 - m1) / (r2 - r1), 1.0)
    fixed = m1 - per_row * r1
    fit = max(0, math.floor((usable - fixed) / per_row))
    rows = min(fit, max_rows)
    return {"fixed_bytes": int(fixed), "per_row_bytes": int(per_row), "rows_fit": fit, "rows_per_device": rows,
            "limited_by": "memory" if fit < max_rows else "max_rows",
            "predicted_total_bytes": int(fixed + per_row * rows)}


# ------------------------------------------------------------------------------------------ pieces


def versions(jax) -> dict:
    """What the run ran with: packages, device, and CUDA / cuDNN where the backend says."""
    import flax
    import jaxlib
    import numpy
    import optax

    device = jax.devices()[0]
    out = {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
           "flax": flax.__version__, "optax": optax.__version__, "numpy": numpy.__version__,
           "platform": platform.platform(), "backend": jax.default_backend(), "device_count": jax.device_count(),
           "device_kind": device.device_kind,
           "platform_version": getattr(getattr(device, "client", None), "platform_version", None)}  # e.g. CUDA
    for plugin in ("jax_cuda13_plugin", "jax_cuda12_plugin"):  # the CUDA plugin's version table, as jax reads it
        with contextlib.suppress(ImportError):
            table = importlib.import_module(f"{plugin}._versions")
            for name in ("cuda_runtime", "cuda_driver", "cudnn", "cublas"):
                with contextlib.suppress(Exception):  # not in this plugin: not recorded
                    out[name] = getattr(table, f"{name}_get_version")()
            break
    return out


def matmul_peak(jax, jnp, smoke: bool) -> float:
    """One chip's measured bf16 matmul rate in TFLOP/s (8192^3 products; 512^3 in smoke mode)."""
    n, reps = (512, 2) if smoke else (8192, 20)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        out = f(a, b)
    out.block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def host_batch(np, rows: int, seq: int, vocab: int, precomputed: bool):
    """(host Batch [rows, T], real lengths, scored tokens): right-padded rows as the trainer lays them
    out, real lengths between T/2 and T (row 0 full, row 1 the shortest), the second half of each its
    scored completion, both classes; the LM head on T/2 positions per row."""
    from bco_jax.data.batch import Batch, BatchShape, Sequences

    rng = np.random.default_rng(0)
    lengths = rng.integers(seq // 2, seq + 1, rows)
    lengths[:2] = [seq, seq // 2][:rows]
    index = np.arange(seq)[None]
    attention = (index < lengths[:, None]).astype(np.int32)
    loss = attention * (index >= (lengths - lengths // 2)[:, None])
    ids = rng.integers(3, vocab, (rows, seq)).astype(np.int32) * attention
    reference = rng.normal(-2.0 * seq, 1.0, (rows, 1)).astype(np.float32) if precomputed else None
    batch = Batch(example_mask=np.ones(rows, bool), main=Sequences(ids, attention, loss),
                  labels=np.arange(rows) % 2 == 0, reference_logps=reference, shape=BatchShape(seq // 2))
    return batch, [int(n) for n in lengths], [int(n) for n in loss[:, 1:].sum(1)]


def abstract_batch(mesh, rows: int, seq: int, precomputed: bool):
    """The [1, rows, seq] batch the step is compiled for, placed as `put_batch` places it."""
    import functools

    from bco_jax.data.batch import Batch
    from bco_jax.sharding import batch_sharding

    return Batch.abstract(1, rows, seq, precomputed=precomputed, capacity=seq // 2,
                          sharding=functools.partial(batch_sharding, mesh))


def lower_step(jax, planner, mesh, rows: int, seq: int):
    """The planner's step lowered for a [1, rows, seq] batch on `mesh`."""
    with jax.set_mesh(mesh):
        return planner.program.step.lower(planner.state, planner.reference,
                                          abstract_batch(mesh, rows, seq, planner.precompute))


def quick_compile(jax) -> dict | None:
    """XLA CPU's quick compile (4x faster) for --smoke; None where this XLA lacks the options."""
    options = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
    try:
        jax.jit(lambda: 0).lower().compile(compiler_options=options)
    except Exception:  # an option this XLA lacks: the default compile
        return None
    return options


def compile_all(lowered: list, args) -> list:
    """(compiled, seconds), or the exception, for each `jax.stages.Lowered` (an exception passes), in threads."""
    from concurrent.futures import ThreadPoolExecutor

    def one(low):
        t = time.perf_counter()
        try:
            return low if isinstance(low, Exception) else (
                low.compile(compiler_options=args.compiler_options), time.perf_counter() - t)
        except Exception as err:  # reported against its configuration
            return err

    with ThreadPoolExecutor(max(1, args.compile_threads)) as pool:
        return list(pool.map(one, lowered))


def total_bytes(planner, mesh, rows: int, seq: int, compiled) -> tuple[int, dict]:
    """Per-device bytes of the step for `rows`, counted as `bco_jax.plan` counts them, and XLA's analysis."""
    from bco_jax.plan import bytes_per_device
    from bco_jax.step import memory_report

    xla, batch = memory_report(compiled), abstract_batch(mesh, rows, seq, planner.precompute)
    total = bytes_per_device(planner.state) + bytes_per_device(planner.reference) + bytes_per_device(batch)
    return total + xla["temp_size_in_bytes"] + xla["output_size_in_bytes"] - xla["alias_size_in_bytes"], xla


def error_text(err: Exception) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}"


def plan_all(jax, mesh, model_cfg, configs, args, usable: int) -> list[dict]:
    """Per configuration: the planner's program on `mesh`, compiled at PROBE_ROWS rows per device (all
    configurations at once), and the rows chosen (`choose_rows`). Nothing is allocated or run."""
    from bco_jax.plan import Planner

    entries, lowered = [], []
    for live, kernel in configs:
        entry, t = {"kernel": kernel, "reference": "live" if live else "precomputed", "live": live}, time.perf_counter()
        try:
            cfg = dataclasses.replace(model_cfg, attn_implementation=kernel, remat=args.remat)
            entry["planner"] = Planner(cfg, mesh, dtype="bfloat16", ref_dtype="bfloat16",
                                       precompute_ref_log_probs=not live, fused_attention=False)
            lowered += [lower_step(jax, entry["planner"], mesh, r * mesh.size, args.seq) for r in PROBE_ROWS]
        except Exception as err:  # e.g. a kernel this backend lacks: reported against the configuration
            lowered += [err] * len(PROBE_ROWS)
        entry["lower_s"] = (time.perf_counter() - t) / len(PROBE_ROWS)  # one lowering (the planner's build too)
        entries.append(entry)
    results = compile_all(lowered, args)
    for i, entry in enumerate(entries):
        mine = results[i * len(PROBE_ROWS):(i + 1) * len(PROBE_ROWS)]
        failed = next((r for r in mine if isinstance(r, Exception)), None)
        if failed is not None:
            entry["error"] = error_text(failed)
            continue
        probe_bytes = [total_bytes(entry["planner"], mesh, r * mesh.size, args.seq, c)[0]
                       for r, (c, _) in zip(PROBE_ROWS, mine)]
        entry.update(choose_rows(PROBE_ROWS, probe_bytes, usable, args.max_rows), probe_rows=list(PROBE_ROWS),
                     probe_total_bytes=probe_bytes, probe_compile_s=max(s for _, s in mine),
                     compiled={r: c for r, (c, _) in zip(PROBE_ROWS, mine)})
        entry["batch"] = entry["rows_per_device"] * mesh.size
    return entries


def kernel_checks(jax, np, mesh, model_cfg, params, seqs, kernels, args) -> list[dict]:
    """Each of `kernels`' per-row log-probs against XLA attention's on the first CHECK_ROWS right-padded
    rows (bf16 compute), relative to their magnitude: pass when max |d| / max(1, |lp_xla|) <= tolerance."""
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from bco_jax.models import sequence_logps
    from bco_jax.plan import abstract_models

    start, seq = time.perf_counter(), seqs.input_ids.shape[-1]
    rows = [jax.device_put(x[:CHECK_ROWS], NamedSharding(mesh, PartitionSpec()))
            for x in (seqs.input_ids, seqs.attention_mask, seqs.loss_mask)]

    def lowered(k):
        graphdef = abstract_models(dataclasses.replace(model_cfg, attn_implementation=k), "bfloat16", "bfloat16")[0][0]
        fn = jax.jit(lambda p, ids, att, loss: sequence_logps(nnx.merge(graphdef, p), ids, att, loss,
                                                              completion_capacity=seq // 2)[0])
        with jax.set_mesh(mesh):
            return fn.lower(params, *rows)

    *fused, xla = compiled = compile_all([lowered(k) for k in [*kernels, "xla"]], args)
    for c in compiled:
        if isinstance(c, Exception):
            raise c
    xla = np.asarray(xla[0](params, *rows), np.float64)
    return [{"kernel": kernel, "against": "xla", **compare(np, np.asarray(logps(params, *rows), np.float64), xla,
                                                           args.tolerance),
             "interpret_mode": kernel == "splash" and jax.default_backend() != "tpu", "rows": len(xla),
             "real_lengths": np.asarray(rows[1]).sum(1).tolist(), "logps_xla": xla.tolist(),
             "seconds": time.perf_counter() - start} for kernel, (logps, _) in zip(kernels, fused)]


def compare(np, logps, logps_xla, tolerance: float) -> dict:
    """Pass when max |lp - lp_xla| / max(1, |lp_xla|) <= tolerance; a NaN or an inf fails."""
    diff = np.abs(logps - logps_xla)
    worst = float(np.max(diff / np.maximum(1.0, np.abs(logps_xla))))
    worst = worst if math.isfinite(worst) else float("inf")
    return {"status": "pass" if worst <= tolerance else "fail", "max_relative_diff": worst,
            "max_abs_diff": float(np.max(diff)), "tolerance": tolerance}


def run_config(jax, jnp, np, mesh, model_cfg, entry, args, usable: int, checks) -> dict:
    """Compile the planned batch (checked against `usable`), build the state, run the pending kernel
    `checks` on its rows, time the steps."""
    from flax import nnx

    from bco_jax.models import Decoder
    from bco_jax.sharding import put_batch

    planner, live, seq, dp = entry["planner"], entry["live"], args.seq, mesh.size  # the mesh is all data
    rows, out, t0 = entry["rows_per_device"], {"status": "ran"}, time.perf_counter()
    compiled = entry.pop("compiled").get(rows)  # a probe's executable when the plan chose its rows
    while True:  # the planned rows; once fewer when their own compile says they do not fit
        if compiled is None:
            compiled = lower_step(jax, planner, mesh, rows * dp, seq).compile(compiler_options=args.compiler_options)
        total, memory = total_bytes(planner, mesh, rows * dp, seq, compiled)
        if total <= usable or "recompiled" in out or rows == 1:
            break
        out["recompiled"], compiled = True, None
        rows = max(1, rows - math.ceil((total - usable) / entry["per_row_bytes"]))
    out.update(rows_per_device=rows, batch=rows * dp, devices=dp, seq=seq, remat=args.remat,
               predicted_total_bytes=entry["predicted_total_bytes"], compiled_total_bytes=total, xla_memory=memory,
               xla_peak_estimate_bytes=memory["peak_estimate_bytes"], compile_s=time.perf_counter() - t0)
    if total > usable:
        return {**out, "status": "does not fit", "error": f"{rows} rows need {total} bytes per device > {usable}"}
    host, lengths, scored = host_batch(np, rows * dp, seq, model_cfg.vocab_size, not live)
    cfg = dataclasses.replace(model_cfg, attn_implementation=entry["kernel"], remat=args.remat)
    params = nnx.to_pure_dict(nnx.split(Decoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
                                                param_dtype=jnp.float32))[1])
    reference = jax.device_put(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params),
                               jax.tree.map(lambda a: a.sharding, planner.reference)) if live else None
    with jax.set_mesh(mesh):  # as the trainer runs the step
        state, batch, times = planner.program.init(params), put_batch(host, mesh), []
    if checks:
        try:
            out["kernel_checks"] = kernel_checks(jax, np, mesh, cfg, state.params, host.main, checks, args)
        except Exception as err:  # the run is marked; the steps are still timed
            out["kernel_checks"] = [{"kernel": k, "status": "error", "error": error_text(err)} for k in checks]
    with jax.set_mesh(mesh):
        for i in range(args.warmup + args.steps):
            t = time.perf_counter()
            state, metrics = compiled(state, reference, batch)
            jax.block_until_ready((state, metrics))
            if i >= args.warmup:
                times.append(time.perf_counter() - t)
    step_s, flops = float(np.median(times)), step_flops(model_cfg, lengths, scored, live)
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in mesh.devices.flat]
    return {**out, "real_tokens_per_step": sum(lengths), "token_slots_per_step": rows * dp * seq,
            "padding_fraction": 1 - sum(lengths) / (rows * dp * seq), "step_s_median": step_s, "step_s_all": times,
            "tokens_per_s": sum(lengths) / step_s, "tokens_per_s_per_device": sum(lengths) / step_s / dp,
            "tflops_needed": flops["needed"] / step_s / 1e12,
            "tflops_conventional_6N": flops["conventional_6N"] / step_s / 1e12,
            "allocator_peak_bytes_so_far": max(peaks) or None, "loss": float(metrics["loss"])}


def budget_stop(entry, args, model_cfg, rate: float, checks: bool, elapsed: float) -> str | None:
    """Why `entry` is not started (None: it is): its estimate (compile, checks, steps) ends past the budget."""
    if entry.get("rows_per_device", 0) < 1:  # before the plan, or nothing to run
        return None if elapsed < args.budget else f"budget: {args.budget:.0f} s spent"
    compile_s = 0.0 if entry["rows_per_device"] in entry["compiled"] else entry["lower_s"] + entry["probe_compile_s"]
    needed = step_flops(model_cfg, [args.seq] * entry["batch"], [args.seq // 2] * entry["batch"], entry["live"])
    estimate = compile_s + checks * entry["probe_compile_s"] + (args.warmup + args.steps) * needed["needed"] / rate
    if elapsed + estimate > args.budget:
        return f"budget: {elapsed:.0f} s elapsed + {estimate:.0f} s estimated > {args.budget:.0f} s"
    return None


def main(argv=None) -> int:
    start = time.perf_counter()
    args = parse(argv)
    if args.smoke:  # CPU; LLVM's quick mode (a long-standing flag) for the eager ops too
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bco_jax.models import ModelConfig
    from bco_jax.plan import HEADROOM, gib, parse_bytes
    from bco_jax.sharding import make_mesh

    mesh = make_mesh((-1, 1, 1), jax.devices())  # every device, the batch on data
    args.compiler_options = quick_compile(jax) if args.smoke else None  # smoke checks the script, not the speed
    info = versions(jax)
    backend, name = info["backend"], info["device_kind"]
    model_cfg = ModelConfig(**(TINY if args.smoke else LLAMA_1B))
    kernels = args.kernels.split(",") if args.kernels else {"gpu": ["cudnn", "xla"], "tpu": ["splash", "xla"]}.get(
        backend, ["xla"])
    # fused kernels, compared with XLA; in smoke mode on CPU splash in Pallas interpret mode (about a second)
    checks = [k for k in kernels if k != "xla"] or (["splash"] if args.smoke and backend == "cpu" else [])
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    limit = parse_bytes(args.device_memory) if args.device_memory or not limit else int(limit)
    usable = int(limit * (1 - HEADROOM))
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"accelerator-{'smoke-' if args.smoke else ''}{stamp}.json")
    record = {"time_utc": stamp, "device": name, "backend": backend, "devices": mesh.size, "mesh": dict(mesh.shape),
              "versions": info, "command": " ".join(["python", "-m", "bench.accelerator", *(argv or sys.argv[1:])]),
              "model": "tiny" if args.smoke else "Llama-3.2-1B shape (random weights)",
              "body_params": body_params(model_cfg), "seq": args.seq, "budget_s": args.budget,
              "device_memory_bytes": limit, "headroom": HEADROOM, "usable_bytes": usable, "plan": None,
              "kernel_checks": [] if checks else [{"kernel": None, "status": "not applicable",
                                                   "reason": f"no fused attention kernel on {backend}"}],
              "configs": []}

    def write():
        record["elapsed_s"] = time.perf_counter() - start
        with open(path, "w") as f:
            json.dump(record, f, indent=1)

    write()
    peak = matmul_peak(jax, jnp, args.smoke)
    datasheet = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k.lower() in name.lower()), None)
    record.update(measured_bf16_tflops=peak, datasheet_bf16_tflops=datasheet)
    print(f"{mesh.size} x {name} ({backend}), jax {jax.__version__}; measured bf16 matmul {peak:.3g} TFLOP/s"
          + (f", datasheet {datasheet:.0f}" if datasheet else "") + f"; {gib(usable)} usable per device")
    configs = [(live, kernel) for live in (True, False) for kernel in kernels]
    entries = [{"kernel": k, "reference": "live" if live else "precomputed"} for live, k in configs]
    stop = budget_stop({}, args, model_cfg, 1.0, False, time.perf_counter() - start)
    if stop is None:
        entries = plan_all(jax, mesh, model_cfg, configs, args, usable)
        record["plan"] = [{k: v for k, v in e.items() if k not in ("planner", "compiled", "live")} for e in entries]
        write()
        print(f"plan ({time.perf_counter() - start:.0f} s): " + "; ".join(f"{e['reference']} {e['kernel']} " + (
            f"{e['rows_per_device']} rows/device ({e['limited_by']})" if "rows_per_device" in e else "error")
            for e in entries))
    rate = peak * 1e12 * mesh.size * ASSUMED_MFU  # needed FLOP/s for the budget: assumed, then the slowest seen
    for entry in entries:
        result = {"kernel": entry["kernel"], "reference": entry["reference"]}
        pending = [k for k in checks if not any(c["kernel"] == k for c in record["kernel_checks"])]
        stop = stop or budget_stop(entry, args, model_cfg, rate, bool(pending), time.perf_counter() - start)
        if stop:
            result.update(status="skipped", reason=stop)
        elif "error" in entry:
            result.update(status="error", error=entry["error"])
        elif entry["rows_per_device"] < 1:
            result.update(status="does not fit", error=f"fixed {entry['fixed_bytes']} + 1 row "
                          f"{entry['per_row_bytes']} bytes per device > {usable}")
        else:
            try:
                result.update(run_config(jax, jnp, np, mesh, model_cfg, entry, args, usable, pending))
            except Exception as err:  # reported, and the run marked
                result.update(status="error", error=error_text(err))
        if "tflops_needed" in result:
            result["mfu_measured_peak"] = result["tflops_needed"] / (peak * mesh.size)
            result["mfu_datasheet"] = result["tflops_needed"] / (datasheet * mesh.size) if datasheet else None
            rate = min(rate, result["tflops_needed"] * 1e12)
        record["kernel_checks"] += result.pop("kernel_checks", [])
        record["configs"].append(result)
        write()
        print(row(result))
    record["kernel_checks"] += [{"kernel": k, "status": "skipped"} for k in checks
                                if not any(c["kernel"] == k for c in record["kernel_checks"])]
    failures = [f"kernel check {c['kernel']}: {c['status']}" for c in record["kernel_checks"]
                if c["status"] in ("fail", "error")]
    failures += [f"{c['reference']} {c['kernel']}: {c['error']}" for c in record["configs"] if c["status"] == "error"]
    record.update(status="fail" if failures else "pass", failures=failures)
    write()
    print("".join(f"kernel check {c['kernel']} vs xla: {c['status']}" + (
        f", max relative difference {c['max_relative_diff']:.2g} (tolerance {c['tolerance']:g})"
        if "max_relative_diff" in c else "") + "\n" for c in record["kernel_checks"] if c["kernel"])
        + f"wrote {path} ({record['elapsed_s']:.0f} s)" + "".join(f"\nFAILED {f}" for f in failures))
    return 1 if failures else 0


def row(r: dict) -> str:
    from bco_jax.plan import gib

    head = f"{r['reference']:12s} {r['kernel']:7s}"
    if r["status"] != "ran":
        return f"{head} {r['status']}: {r.get('error') or r.get('reason')}"
    mfu = f"MFU {r['mfu_measured_peak']:.1%} of measured" + (
        f", {r['mfu_datasheet']:.1%} of datasheet" if r.get("mfu_datasheet") else "")
    return (f"{head} batch {r['batch']:3d} x {r['seq']} ({r['padding_fraction']:.0%} padding): "
            f"{r['step_s_median'] * 1e3:8.1f} ms/step, {r['tokens_per_s']:9.0f} real tokens/s, "
            f"{r['tflops_needed']:.3g} TFLOP/s needed ({mfu}); conventional 6N: "
            f"{r['tflops_conventional_6N']:.3g} TFLOP/s; {gib(r['compiled_total_bytes'])} per device "
            f"(planned {gib(r['predicted_total_bytes'])}); compile {r['compile_s']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
