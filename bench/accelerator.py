"""BCO train-step throughput and MFU on one accelerator (H100 / H200 / a TPU host), self-contained.

    python -m bench.accelerator              # Llama-3.2-1B shape, seq 2048: about 4 minutes on an H200
    python -m bench.accelerator --smoke      # a tiny shape on CPU (the test suite runs this)

(from the repository root).

Random weights, no network, no data files: it imports only `bco_jax.models`, `bco_jax.step`,
`bco_jax.losses` and the config dataclasses (nothing of the data pipeline), so it runs on an image
with jax, flax and optax alone. It prints the device, measures the chip's bf16 matmul rate, then
times the real jitted BCO train step (bf16 compute, float32 master weights, AdamW) for each
configuration: live / precomputed reference x attention kernels (cudnn and xla on GPU, splash and
xla on TPU, xla on CPU), with the largest batch of a ladder that compiles and runs. A check compares
each fused kernel's log-probs with XLA's on the same batch. After each configuration it rewrites
bench/results/accelerator-<time>.json, so a cut-off run still reports.

MFU counts only what the algorithm needs (issue 11): policy 6 x N_body per token + 6 x D x V per
scored token, reference 2 x N_body per token + 2 x D x V per scored token, plus causal attention
(forward 2 x T^2 x N x H per layer and row; the policy's backward twice that). The conventional
6 x N_params per token over all positions is printed beside it, labelled as such.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
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


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shape, 1 timed step: checks the script runs")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batches", default="32,16,8,4", help="per-step batch sizes to try, largest first")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--remat", default="none", choices=["none", "full", "save_dots"])
    p.add_argument("--kernels", default="", help="attention kernels to time (default: by backend)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = p.parse_args(argv)
    if args.smoke:
        args.seq, args.batches, args.steps, args.warmup = 64, "4", 1, 1
    return args


# ------------------------------------------------------------------------------------------ counts


def body_params(c) -> int:
    """Parameters of the layers (no embedding, no LM head): what every token runs through."""
    D, F, N, K, H = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    return c.num_layers * (D * N * H + 2 * D * K * H + N * H * D + 3 * D * F + 2 * D)


def step_flops(c, batch: int, seq: int, scored: int, live_reference: bool) -> dict:
    """FLOPs of one step: what the algorithm needs, and the conventional 6 N per token."""
    tokens, scored_tokens = batch * seq, batch * scored
    head = c.hidden_size * c.vocab_size
    attention_fwd = c.num_layers * batch * 2 * seq * seq * c.num_heads * c.head_dim  # causal: half of 4 T^2 N H
    needed = 6 * body_params(c) * tokens + 6 * head * scored_tokens + 3 * attention_fwd
    if live_reference:
        needed += 2 * body_params(c) * tokens + 2 * head * scored_tokens + attention_fwd
    all_params = body_params(c) + c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return {"needed": float(needed), "conventional_6N": float(6 * all_params * tokens)}


# ------------------------------------------------------------------------------------------ pieces


def matmul_peak(jax, jnp, smoke: bool) -> float:
    """The chip's measured bf16 matmul rate in TFLOP/s (8192^3 products; 512^3 in smoke mode)."""
    n = 512 if smoke else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    reps = 2 if smoke else 20
    t = time.perf_counter()
    for _ in range(reps):
        out = f(a, b)
    out.block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def make_batch(np, batch: int, seq: int, vocab: int, precomputed: bool):
    """One micro-batch [1, B, T]: half prompt, half scored completion, both classes; the LM head on
    the completion's T/2 positions."""
    from bco_jax.data.batch import Batch, BatchShape, Sequences

    rng = np.random.default_rng(0)
    loss_mask = np.zeros((1, batch, seq), np.int32)
    loss_mask[..., seq // 2:] = 1
    main = Sequences(rng.integers(3, vocab, (1, batch, seq)).astype(np.int32), np.ones((1, batch, seq), np.int32),
                     loss_mask)
    reference_logps = rng.normal(-2.0 * seq, 1.0, (1, batch, 1)).astype(np.float32) if precomputed else None
    return Batch(example_mask=np.ones((1, batch), bool), main=main, labels=(np.arange(batch) % 2 == 0)[None],
                 reference_logps=reference_logps, shape=BatchShape(seq // 2))


def build_step(jax, jnp, model_cfg, kernel: str, remat: str, live: bool, steps: int):
    """(program, initial state, reference, graphdef): the trainer's own compiled step on one device."""
    from flax import nnx

    from bco_jax.config import LossOptions, OptimOptions
    from bco_jax.models import Decoder
    from bco_jax.sharding import make_mesh
    from bco_jax.step import compile_step

    cfg = dataclasses.replace(model_cfg, attn_implementation=kernel, remat=remat)
    graphdef, param_state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.float32))
    params = nnx.to_pure_dict(param_state)
    reference = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params) if live else None  # ref_dtype bfloat16
    ref_graphdef = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))[0]
    program = compile_step((graphdef, ref_graphdef), param_state, make_mesh((1, 1, 1), jax.devices()[:1]),
                           loss=LossOptions(), optim=OptimOptions(learning_rate=1e-6, warmup_ratio=0.0),
                           total_steps=steps)
    return program, program.init(params), reference, graphdef


def kernel_check(jax, jnp, np, graphdef, params, batch, kernel: str) -> float:
    """Max |log-prob difference| of `kernel` against XLA attention on the same rows (bf16 compute)."""
    from flax import nnx

    from bco_jax.models import sequence_logps

    seqs = jax.tree.map(lambda v: np.array(v[0]), batch.main)
    tail = seqs.attention_mask.shape[-1] // 8  # every other row right-padded: sequence lengths differ
    seqs.attention_mask[::2, -tail:] = 0
    seqs.loss_mask[::2, -tail:] = 0

    def logps(gd):
        fn = jax.jit(lambda p: sequence_logps(nnx.merge(gd, p), seqs.input_ids, seqs.attention_mask,
                                              seqs.loss_mask)[0])
        return np.asarray(fn(params), np.float64)

    model = nnx.merge(graphdef, params)
    model.config = dataclasses.replace(model.config, attn_implementation="xla")
    xla_graphdef = nnx.split(model)[0]
    return float(np.max(np.abs(logps(graphdef) - logps(xla_graphdef))))


def time_config(jax, jnp, np, model_cfg, kernel, live, args, batch_size) -> dict:
    from bco_jax.step import memory_report

    seq = args.seq
    program, state, reference, graphdef = build_step(jax, jnp, model_cfg, kernel, args.remat, live,
                                                     args.warmup + args.steps)
    host = make_batch(np, batch_size, seq, model_cfg.vocab_size, not live)
    batch = jax.tree.map(jnp.asarray, host)
    t0 = time.perf_counter()
    compiled = program.step.lower(state, reference, batch).compile()
    compile_s = time.perf_counter() - t0
    memory = memory_report(compiled)
    check = None
    if kernel != "xla":
        check = kernel_check(jax, jnp, np, graphdef, state.params, host, kernel)
    times = []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        state, metrics = compiled(state, reference, batch)
        jax.block_until_ready((state, metrics))
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    step_s = float(np.median(times))
    flops = step_flops(model_cfg, batch_size, seq, seq // 2, live)
    return {"kernel": kernel, "reference": "live" if live else "precomputed", "batch": batch_size, "seq": seq,
            "remat": args.remat, "step_s_median": step_s, "step_s_all": times, "compile_s": compile_s,
            "tokens_per_s": batch_size * seq / step_s, "tflops_needed": flops["needed"] / step_s / 1e12,
            "tflops_conventional_6N": flops["conventional_6N"] / step_s / 1e12, "xla_memory": memory,
            "loss": float(metrics["loss"]), "max_abs_logp_diff_vs_xla": check}


def fits(err: Exception) -> bool:
    text = str(err)
    return not any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM"))


def main(argv=None) -> int:
    args = parse(argv)
    if args.smoke:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bco_jax.models import ModelConfig

    device = jax.devices()[0]
    backend = jax.default_backend()
    name = getattr(device, "device_kind", str(device))
    model_cfg = ModelConfig(**(TINY if args.smoke else LLAMA_1B))
    kernels = args.kernels.split(",") if args.kernels else {"gpu": ["cudnn", "xla"], "tpu": ["splash", "xla"]}.get(
        backend, ["xla"])
    peak = matmul_peak(jax, jnp, args.smoke)
    datasheet = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k.lower() in name.lower()), None)
    print(f"device: {name} ({backend}), jax {jax.__version__}; measured bf16 matmul {peak:.0f} TFLOP/s"
          + (f", datasheet {datasheet:.0f}" if datasheet else ""))
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"accelerator-{'smoke-' if args.smoke else ''}{stamp}.json")
    record = {"time_utc": stamp, "device": name, "backend": backend, "jax": jax.__version__,
              "python": platform.python_version(), "command": " ".join(["python", "-m", "bench.accelerator",
                                                                         *(argv or sys.argv[1:])]),
              "model": "tiny" if args.smoke else "Llama-3.2-1B shape (random weights)",
              "body_params": body_params(model_cfg), "measured_bf16_tflops": peak, "datasheet_bf16_tflops": datasheet,
              "configs": []}
    ladder = [int(b) for b in args.batches.split(",")]
    for live in (True, False):
        for kernel in kernels:
            result = None
            for batch_size in ladder:
                try:
                    result = time_config(jax, jnp, np, model_cfg, kernel, live, args, batch_size)
                    break
                except Exception as err:  # a batch that does not fit: try the next; anything else: report
                    if fits(err):
                        result = {"kernel": kernel, "reference": "live" if live else "precomputed",
                                  "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
                        break
            if result is None:
                result = {"kernel": kernel, "reference": "live" if live else "precomputed",
                          "error": f"no batch of {ladder} fits"}
            if "tflops_needed" in result:
                result["mfu_measured_peak"] = result["tflops_needed"] / peak
                result["mfu_datasheet"] = result["tflops_needed"] / datasheet if datasheet else None
            record["configs"].append(result)
            with open(path, "w") as f:
                json.dump(record, f, indent=1)
            print(row(result))
    print(f"wrote {path}")
    return 0


def row(r: dict) -> str:
    if "error" in r:
        return f"{r['reference']:12s} {r['kernel']:7s} error: {r['error']}"
    mfu = f"MFU {r['mfu_measured_peak']:.1%} of measured"
    if r.get("mfu_datasheet"):
        mfu += f", {r['mfu_datasheet']:.1%} of datasheet"
    check = "" if r["max_abs_logp_diff_vs_xla"] is None else f"; |logp - xla| <= {r['max_abs_logp_diff_vs_xla']:.3g}"
    return (f"{r['reference']:12s} {r['kernel']:7s} batch {r['batch']:3d} x {r['seq']}: "
            f"{r['step_s_median'] * 1e3:8.1f} ms/step, "
            f"{r['tokens_per_s']:9.0f} tokens/s, {r['tflops_needed']:.1f} TFLOP/s needed ({mfu}); "
            f"conventional 6N: {r['tflops_conventional_6N']:.1f} TFLOP/s; temp "
            f"{r['xla_memory']['temp_size_in_bytes'] / 2**30:.2f} GiB; compile {r['compile_s']:.0f} s{check}")


if __name__ == "__main__":
    sys.exit(main())
