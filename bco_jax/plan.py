"""Will a run fit? Per-device memory of the real train step, compiled ahead of time on simulated devices.

    python -m bco_jax.plan --model /models/Llama-3.1-8B-Instruct --mesh 1,8,1 --batch_size 64 \
        --max_length 1024 --device_memory 80GiB [--search] [--json]

Needs only the model's config.json (no weights, no accelerator). The policy, reference, AdamW state
and batch are built as `jax.ShapeDtypeStruct`s on their shardings as `bco_jax.build.build` builds
them, and `step.train_step` is compiled by XLA for N simulated CPU devices. Parameters, optimizer
state, reference and batch bytes are exact; the temporaries are XLA CPU's buffer assignment, an
estimate for the GPU / TPU compile. XLA attention holds [b, N, T, T] float32 scores that fused kernels
(cuDNN flash, Pallas splash) never hold: for those targets the model's attention is replaced, while
the step is traced, by a score-free stand-in with the same inputs and outputs. With --online (or any of
--prompts_per_round, --num_generations, --max_completion_length) one round's sampling of
`python -m bco_jax.online` is compiled too (`bco_jax.plan_sampling`): the verdict is on the larger peak.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import os
import re
import sys
import time

from bco_jax.argv import join_negative_values  # imports nothing of jax
from bco_jax.errors import USER_ERRORS, ConfigError
from bco_jax.plan_devices import OneLineParser, device_count, simulate_devices
from bco_jax.plan_sampling import ONLINE_KEYS, online_rows, sampling_per_device  # jax imported inside its functions

HEADROOM = 0.10  # of device memory kept free for the runtime, fragmentation and XLA's own buffers
FUSED_KERNELS = ("cudnn", "splash")  # targets whose attention never holds the [b, N, T, S] scores
ESTIMATED = ("Exact: parameters, optimizer state, reference and batch (shapes x dtypes x shardings). Estimated: "
             "temporaries, from XLA CPU's buffer assignment of the compiled step (the GPU / TPU compiler fuses and "
             "schedules differently).")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """"16GiB", "80 GB", "512MiB", "1e9" -> bytes, a finite size of at least one byte; ConfigError otherwise."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", str(text))
    try:
        size = float(match.group(1)) * _UNITS[match.group(2).lower()]
    except (AttributeError, KeyError, ValueError):  # no match, an unknown unit, "1e" or "."
        raise ConfigError(f"cannot read a memory size from {text!r} (e.g. 16GiB, 80GB, 512MiB)") from None
    if not 1 <= size < math.inf:
        raise ConfigError(f"must be a finite size of at least one byte (got {text!r})")
    return int(size)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def analytic_parameter_count(cfg) -> int:
    """Parameters of a decoder from its `ModelConfig` fields alone (arithmetic, not the model code).
    A layer's norms: 2 of [hidden] (before attention and MLP), 2 more with `sandwich_norms` (Gemma 3:
    after them), and with `qk_norm` (Qwen3, Gemma 3) one [head_dim] each over the query and key heads."""
    D, V, F, L = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size, cfg.num_layers
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    norms = (2 + 2 * cfg.sandwich_norms) * D + 2 * cfg.head_dim * cfg.qk_norm
    per_layer = norms + D * q + 2 * D * kv + q * D + 3 * D * F  # norms, q k v o, gate up down
    per_layer += (q + 2 * kv) * cfg.qkv_bias + D * cfg.o_bias + (2 * F + D) * cfg.mlp_bias
    return V * D * (1 if cfg.tie_word_embeddings else 2) + D + L * per_layer


# ----------------------------------------------------------------------------------------- arguments


# The trainer's keys the planner reads, with its defaults for an accelerator.
TRAINER_KEYS = {"model": None, "ref_model": "", "mesh": "1,-1,1", "batch_size": 64, "gradient_accumulation_steps": 1,
                "max_length": 1024, "remat": "full", "precompute_ref_log_probs": False, "dtype": "bfloat16",
                "ref_dtype": "bfloat16", "attn_implementation": "auto", "use_peft": False, "lora_r": 16,
                "lora_target_modules": "", "load_in_8bit": False}


def parser() -> argparse.ArgumentParser:
    """The trainer's keys (typed, documented and checked as the trainer reads them), with the planner's
    defaults for an accelerator; then the planner's own options. Usage errors are ConfigErrors."""
    from bco_jax.config import OnlineOptions, add_keys, key_table

    p = OneLineParser(prog="python -m bco_jax.plan", description=__doc__.split("\n\n")[0])
    add_keys(p, TRAINER_KEYS, required=("model",), helps={
        "model": "HF folder of the policy, its config.json or a GGUF file (no weights are read)",
        "ref_model": "a separate reference (folder or config.json); with use_peft, beside the base",
        "dtype": "compute dtype (auto: bfloat16, the target being a GPU / TPU)",
        "attn_implementation": "the target's attention kernel: xla holds [b, N, T, T] scores; auto, cudnn and "
                               "splash do not",
        "lora_target_modules": "comma-separated PEFT module names, or all-linear (empty: all of them)",
        "load_in_8bit": "with use_peft: the frozen base's projections in int8"})
    add_keys(p, dict.fromkeys(ONLINE_KEYS), helps={k: f"{key_table()[k][1].metadata['help']} (implies --online; "
                                                   f"default {getattr(OnlineOptions(), k)})" for k in ONLINE_KEYS})
    p.add_argument("--online", action="store_true", help="also plan each round's sampling (python -m bco_jax.online)")
    p.add_argument("--devices", type=int, help="simulated devices (default: the product of --mesh)")
    p.add_argument("--device_memory", default="80GiB",
                   help="memory of one device: 16GiB (TPU v5e), 95GiB (v5p), 80GiB (H100), 141GiB (H200)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    p.add_argument("--search", action="store_true", help="also find the largest micro-batch per device that fits")
    return p


def checked(args: argparse.Namespace) -> argparse.Namespace:
    """`args` with device_memory in bytes and the online keys read from the config (`online` true when
    one is given), once the trainer's keys pass the trainer's own checks (`bco_jax.config.build_config`:
    batch_size > 0, max_length >= 2, lora_r > 0, num_generations > 0, ...) and device_memory reads as a
    finite size; ConfigError naming the key otherwise."""
    from bco_jax.config import build_config

    online = {key: getattr(args, key) for key in ONLINE_KEYS if getattr(args, key) is not None}
    cfg = build_config({**{key: getattr(args, key) for key in TRAINER_KEYS}, **online,
                        "mesh": ",".join(map(str, args.mesh))})
    try:
        device_memory = parse_bytes(args.device_memory)
    except ConfigError as err:
        raise ConfigError(f"device_memory: {err}") from None
    return argparse.Namespace(**{**vars(args), "device_memory": device_memory, "online": args.online or bool(online),
                                 **{key: getattr(cfg.online, key) for key in ONLINE_KEYS}})


# ------------------------------------------------------------------------------------------- compile


def abstract_models(model_cfg, dtype, ref_dtype, policy_dtype="float32"):
    """((graphdef, state) of the policy in `policy_dtype`, of the reference in `ref_dtype`), shapes only
    (LoRA adapters are float32 whatever `policy_dtype`)."""
    import jax.numpy as jnp
    from flax import nnx

    from bco_jax.models import Decoder

    def split(param_dtype):
        return nnx.split(nnx.eval_shape(lambda: Decoder(model_cfg, rngs=nnx.Rngs(0), dtype=jnp.dtype(dtype),
                                                        param_dtype=jnp.dtype(param_dtype))))
    return split(policy_dtype), split(ref_dtype)


def bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (replicated leaves in full)."""
    import jax

    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


class Planner:
    """Everything of a plan but the batch: the abstract state and reference on `mesh`, the jitted step.
    `fused_attention`: compile with attention's planning-only "score_free" kernel (a fused kernel's memory).
    `ref_cfg`: a separate reference's config (None: the model's; with LoRA, the base is the reference)."""

    def __init__(self, model_cfg, mesh, *, dtype, ref_dtype, precompute_ref_log_probs, fused_attention,
                 lora_rank: int = 0, lora_targets: tuple = (), ref_cfg=None, quantize_base: bool = False):
        import jax
        from flax import nnx

        from bco_jax.config import LossOptions, OptimOptions
        from bco_jax.models import lora
        from bco_jax.sharding import model_shardings
        from bco_jax.step import compile_step, trained_part

        self.mesh = mesh
        if fused_attention:  # the target's kernel holds no [T, S] scores: compile a stand-in that holds none either
            model_cfg = dataclasses.replace(model_cfg, attn_implementation="score_free")
            ref_cfg = ref_cfg and dataclasses.replace(ref_cfg, attn_implementation="score_free")
        lora_cfg = dataclasses.replace(model_cfg, lora_rank=lora_rank, lora_alpha=2.0 * lora_rank,
                                       lora_targets=tuple(lora_targets),
                                       quantize_base=quantize_base) if lora_rank else model_cfg
        # With LoRA (as build()): the adapters are trained, the base (in the compute dtype) is frozen and
        # is the reference unless a separate one is given; else the float32 policy is trained beside a
        # reference in ref_dtype.
        policy_dtype = dtype if lora_rank else "float32"
        graphdef, param_state = abstract_models(lora_cfg, dtype, dtype, policy_dtype=policy_dtype)[0]
        base_is_reference = bool(lora_rank) and ref_cfg is None
        # The base as reference is int8 with load_in_8bit, as it sits under the adapters.
        base_cfg = dataclasses.replace(model_cfg, quantize_base=quantize_base) if base_is_reference else model_cfg
        ref_graphdef, ref_state = abstract_models(ref_cfg or base_cfg, dtype,
                                                  dtype if base_is_reference else ref_dtype)[1]
        params = trained_part(nnx.to_pure_dict(param_state), bool(lora_rank))
        full = nnx.to_pure_dict(param_state)
        self.parameters = sum(math.prod(x.shape) for path, x in jax.tree_util.tree_leaves_with_path(
            lora.split_adapters(full)[0]) if not str(path[-1].key).endswith("_scale"))  # int8 scales: not weights
        self.trainable_parameters = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
        # The program build() compiles (the schedule's length changes no memory).
        self.program = compile_step((graphdef, ref_graphdef), param_state, mesh, loss=LossOptions(),
                                    optim=OptimOptions(), total_steps=1000, lora=bool(lora_rank))
        self.state = self.program.abstract_state
        reference = None if precompute_ref_log_probs or base_is_reference else _placed(
            nnx.to_pure_dict(ref_state), nnx.to_pure_dict(model_shardings(ref_state, mesh)))
        if lora_rank:  # the base is needed by the policy even when reference log-probs are precomputed
            base = lora.split_adapters(full)[0]
            base = _placed(base, lora.split_adapters(nnx.to_pure_dict(model_shardings(param_state, mesh)))[0])
            self.reference = (base, reference)  # the step's pair; None: the base with adapters off
        else:
            self.reference = reference
        self.precompute = precompute_ref_log_probs
        # What the online loop samples from (`build.policy_params`): with LoRA, the base joined with the adapters.
        self.sampled_policy = (graphdef, lora.join_adapters(self.reference[0], self.state.params) if lora_rank
                               else self.state.params)

    def batch(self, accumulation: int, rows: int, length: int):
        """The unpaired BCO batch the step reads: [A, rows, T] tokens, [A, rows] labels and masks;
        capacity T: the LM head on every position, the most the data pipeline asks for."""
        from bco_jax.data.batch import Batch
        from bco_jax.sharding import batch_sharding

        return Batch.abstract(accumulation, rows, length, precomputed=self.precompute, capacity=length,
                              sharding=functools.partial(batch_sharding, self.mesh))

    def per_device(self, accumulation: int, rows: int, length: int) -> tuple[dict, int]:
        """(bytes per device by part and their total, XLA's argument bytes) of the step compiled for
        [accumulation, rows, length] batches."""
        import jax

        from bco_jax.step import memory_report

        batch = self.batch(accumulation, rows, length)
        with jax.set_mesh(self.mesh):
            xla = memory_report(self.program.step.lower(self.state, self.reference, batch).compile())
        params = bytes_per_device(self.state.params)
        parts = {"params_bytes": params,
                 "optimizer_bytes": bytes_per_device(self.state) - params,  # AdamW moments, the state's scalars
                 "reference_bytes": bytes_per_device(self.reference),
                 "batch_bytes": bytes_per_device(batch),
                 # XLA's temporaries, and the outputs not aliased to the donated state (the metrics)
                 "temporaries_bytes": xla["temp_size_in_bytes"] + xla["output_size_in_bytes"]
                 - xla["alias_size_in_bytes"]}
        return {**parts, "total_bytes": sum(parts.values())}, xla["argument_size_in_bytes"]


def _placed(tree, shardings):
    from bco_jax.sharding import abstract_on

    return abstract_on(tree, shardings)


# ---------------------------------------------------------------------------------------------- plan


def fused_target(attn_implementation: str, dtype: str = "bfloat16") -> bool:
    """Whether the target's kernel never holds the scores: cudnn, splash, and auto (the planner's
    target is a GPU or TPU, where auto picks one of them) unless float32, where auto runs XLA."""
    return attn_implementation in FUSED_KERNELS or (attn_implementation == "auto" and dtype != "float32")


def model_config(path: str, remat: str, key: str = "model"):
    """`ModelConfig` from an HF folder, a config.json under any name or a GGUF file; XLA attention, what
    compiles on CPU. ConfigError naming `key` (and the file) when there is none or it does not read."""
    from bco_jax.models import read_config
    from bco_jax.models.config import config_file

    try:
        if not os.path.isfile(config_file(path)):
            raise ConfigError(f"{path} is neither a config.json, a GGUF file nor a folder holding one")
        return read_config(path, remat=remat, attn_implementation="xla")
    except (ConfigError, OSError) as err:
        raise ConfigError(f"{key}: {err}") from None


def plan(args, mesh) -> dict:
    """Per-device memory of the configured run on `mesh`, the verdict, and (with --search) the largest
    micro-batch per device that fits."""
    from bco_jax.sharding import data_parallel_size

    model_cfg = model_config(args.model, args.remat)
    accumulation, data_parallel = args.gradient_accumulation_steps, data_parallel_size(mesh)
    if args.batch_size % (accumulation * data_parallel):
        raise ConfigError(f"batch_size: {args.batch_size} is not divisible by gradient_accumulation_steps "
                          f"({accumulation}) x data-parallel devices ({data_parallel})")
    rows = args.batch_size // (accumulation * data_parallel)  # per device, per micro-batch
    sampled_rows = online_rows(args, data_parallel) if args.online else 0
    fused, usable = fused_target(args.attn_implementation, args.dtype), int(args.device_memory * (1 - HEADROOM))
    from bco_jax.config import separate_reference
    from bco_jax.models import lora

    separate = separate_reference(args.model, args.ref_model)
    targets = lora.resolve_targets(args.lora_target_modules) if args.use_peft else ()
    dtype = "bfloat16" if args.dtype == "auto" else args.dtype
    planner = Planner(model_cfg, mesh, dtype=dtype, ref_dtype=args.ref_dtype,
                      precompute_ref_log_probs=args.precompute_ref_log_probs,
                      fused_attention=fused, lora_rank=args.lora_r if args.use_peft else 0, lora_targets=targets,
                      ref_cfg=model_config(args.ref_model, args.remat, "ref_model") if separate else None,
                      quantize_base=args.use_peft and args.load_in_8bit)
    start = time.perf_counter()
    per_device, xla_argument_bytes = planner.per_device(accumulation, rows * data_parallel, args.max_length)
    sampling = sampling_per_device(
        planner.sampled_policy, model_cfg, mesh, dtype=dtype, rows=sampled_rows,
        prompt_length=args.max_length - args.max_completion_length, new_tokens=args.max_completion_length,
        resident_bytes=sum(per_device[k] for k in ("params_bytes", "optimizer_bytes", "reference_bytes")),
    ) if args.online else None
    sampling_total = sampling["total_bytes"] if sampling else 0  # sampling and training never overlap in time
    peak = max(per_device["total_bytes"], sampling_total)
    fits = peak <= usable
    tensor = mesh.shape["tensor"] if model_cfg.num_heads % mesh.shape["tensor"] == 0 else 1
    out = {"model": args.model, "ref_model": args.ref_model or None, "parameters": planner.parameters,
           "trainable_parameters": planner.trainable_parameters,
           "use_peft": args.use_peft, "lora_r": args.lora_r if args.use_peft else None,
           "load_in_8bit": bool(args.use_peft and args.load_in_8bit),
           "parameters_analytic": analytic_parameter_count(model_cfg), "mesh": dict(mesh.shape),
           "devices": mesh.size, "data_parallel": data_parallel, "batch_per_device": rows,
           **{k: getattr(args, k) for k in ("batch_size", "gradient_accumulation_steps", "max_length", "remat",
                                            "dtype", "ref_dtype", "precompute_ref_log_probs", "attn_implementation")},
           "per_device": per_device, "xla_argument_bytes": xla_argument_bytes, "sampling": sampling,
           "peak_bytes": peak, "peak": "sampling" if sampling_total > per_device["total_bytes"] else "training",
           "compile_seconds": round(time.perf_counter() - start, 1), "device_memory_bytes": args.device_memory,
           "headroom": HEADROOM, "usable_bytes": usable, "fits": fits, "max_batch_per_device": None,
           # one layer's float32 scores [b, N, T, T] on one device: what XLA attention holds, fused kernels not
           "attention_scores_bytes_per_layer": rows * model_cfg.num_heads // tensor * args.max_length ** 2 * 4,
           "estimated": ESTIMATED + (f" Attention: a score-free stand-in for the fused {args.attn_implementation} "
                                     "kernel, no [b, N, T, T] scores counted." if fused else
                                     " Attention: XLA's, its [b, N, T, T] float32 scores counted.")
           + (" Sampling: the round's generate compiled alike; its KV cache exact, its temporaries estimated."
              if sampling else "")}
    if args.search:
        def fits_rows(r):
            training = planner.per_device(accumulation, r * data_parallel, args.max_length)[0]["total_bytes"]
            return max(training, sampling_total) <= usable
        out["max_batch_per_device"] = search(fits_rows, known_fit=rows if fits else 0,
                                             known_fail=None if fits else rows)
    return out


def search(fits, known_fit: int = 0, known_fail: int | None = None, limit: int = 4096) -> int:
    """Largest r in [0, limit] with fits(r), memory growing with r: doubling, then bisection."""
    lo, hi = known_fit, known_fail
    while hi is None:
        candidate = max(1, 2 * lo)
        if candidate > limit:
            return lo
        lo, hi = (candidate, None) if fits(candidate) else (lo, candidate)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# -------------------------------------------------------------------------------------------- report


def table(out: dict) -> str:
    d, mesh = out["per_device"], ", ".join(f"{k}={v}" for k, v in out["mesh"].items())
    reference = "precomputed (not in memory)" if out["precompute_ref_log_probs"] else out["ref_dtype"]
    lines = [f"model {out['model']}: {out['parameters']:,} parameters (analytic {out['parameters_analytic']:,})",
             f"mesh {mesh} on {out['devices']} simulated devices; batch {out['batch_size']} = "
             f"{out['gradient_accumulation_steps']} micro-batch(es) x {out['batch_per_device']} rows per device x "
             f"{out['data_parallel']} data-parallel devices; max_length {out['max_length']}, remat {out['remat']}, "
             f"compute {out['dtype']}, reference {reference}, attention {out['attn_implementation']}",
             "per device:"]
    for name, key in [("parameters (float32 master)", "params_bytes"), ("optimizer state (AdamW)", "optimizer_bytes"),
                      ("reference", "reference_bytes"), ("batch", "batch_bytes"),
                      ("temporaries (estimated)", "temporaries_bytes"), ("total", "total_bytes")]:
        lines.append(f"  {name:30s} {gib(d[key]):>12s}")
    if s := out["sampling"]:
        lines += [f"sampling: kv cache {gib(s['kv_cache_bytes'])}, temporaries (estimated, the cache included) "
                  f"{gib(s['temporaries_bytes'])}, total {gib(s['total_bytes'])} per device",
                  f"  ({s['rows']} rows, {s['rows_per_device']} per device, of {s['prompt_length']} prompt + "
                  f"{s['max_completion_length']} new tokens; prefill scores {gib(s['prefill_scores_bytes_per_layer'])} "
                  f"a layer)", f"peak per device: {out['peak']}, {gib(out['peak_bytes'])}"]
    lines.append(f"verdict: {'fits' if out['fits'] else 'does NOT fit'} in {gib(out['device_memory_bytes'])} per "
                 f"device, keeping {out['headroom']:.0%} free for the runtime and fragmentation (usable "
                 f"{gib(out['usable_bytes'])})")
    if out["max_batch_per_device"] is not None:
        most = out["max_batch_per_device"]
        lines.append(f"largest micro-batch that fits: {most} rows per device (batch_size "
                     f"{most * out['data_parallel'] * out['gradient_accumulation_steps']} with this accumulation)")
    lines.append(f"{out['estimated']} Compiled in {out['compile_seconds']:.0f} s.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, force=True)  # onto this call's stderr, as train does
    argv = join_negative_values(list(sys.argv[1:] if argv is None else argv))
    try:
        simulate_devices(device_count(argv))  # before jax is imported, which happens from here on
        args = checked(parser().parse_args(argv))
        import jax

        from bco_jax.sharding import make_mesh

        n = args.devices or math.prod(args.mesh)
        if len(jax.devices()) < n:
            raise ConfigError(f"devices: {n} wanted, jax has {len(jax.devices())} (was jax imported before main?)")
        out = plan(args, make_mesh(args.mesh, jax.devices()[:n]))
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(out) if args.json else table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
