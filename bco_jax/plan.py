"""Will a run fit? Per-device memory of the real train step, compiled ahead of time on simulated devices.

    python -m bco_jax.plan --model /models/Llama-3.1-8B-Instruct --mesh 1,8,1 --batch_size 64 \
        --max_length 1024 --remat full --device_memory 80GiB [--search] [--json]

Needs only the model's config.json (no weights, no accelerator): the policy, reference, optimizer
and state are built as `jax.ShapeDtypeStruct`s on their shardings exactly as `bco_jax.build.build`
builds them, and `step.train_step` is lowered and compiled by XLA for N simulated CPU devices.
Parameters, optimizer state, reference and batch are exact (shapes x dtypes x shardings); the
temporaries are XLA CPU's buffer assignment, an estimate for a GPU / TPU compile. One difference is
corrected: XLA attention materialises [b, N, T, T] float32 scores that the fused kernels (cuDNN flash,
Pallas splash) never hold; for those targets the step is also compiled with a score-free stand-in of
the same inputs and outputs, and its temporaries are reported (the difference is shown).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time

HEADROOM = 0.10  # of device memory kept free for the runtime, fragmentation and XLA's own buffers
FUSED_KERNELS = ("cudnn", "splash")  # targets whose attention never holds the [b, N, T, S] scores
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """"16GiB", "80 GB", "512MiB", "1e9" -> bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read a memory size from {text!r} (e.g. 16GiB, 80GB, 512MiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def analytic_parameter_count(cfg) -> int:
    """Parameters of a decoder from its `ModelConfig` fields alone (arithmetic, not the model code)."""
    D, V, F, L = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size, cfg.num_layers
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = 2 * D + D * q + 2 * D * kv + q * D + 3 * D * F  # 2 norms, q k v o, gate up down
    per_layer += (q + 2 * kv) * cfg.qkv_bias + D * cfg.o_bias + (2 * F + D) * cfg.mlp_bias
    return V * D * (1 if cfg.tie_word_embeddings else 2) + D + L * per_layer


# ----------------------------------------------------------------------------------------- arguments


def _join_negative(argv: list[str]) -> list[str]:
    """`--mesh -1,8,1` -> `--mesh=-1,8,1` (argparse would read the value as a flag)."""
    out = []
    for token in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and re.match(r"-\d", token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def _mesh(text: str) -> tuple[int, int, int]:
    shape = tuple(int(x) for x in text.split(","))
    if len(shape) != 3 or shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise argparse.ArgumentTypeError(f"expected data,fsdp,tensor (one may be -1), got {text!r}")
    return shape


def device_count(argv: list[str]) -> int:
    """--devices, else the product of a fully given --mesh; read before jax is imported."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--mesh", type=_mesh, default=(1, -1, 1))
    pre.add_argument("--devices", type=int, default=None)
    known, _ = pre.parse_known_args(argv)
    if known.devices:
        return known.devices
    if -1 in known.mesh:
        raise SystemExit("error: --mesh has a -1: give --devices N (how many devices to plan for)")
    return math.prod(known.mesh)


def simulate_devices(n: int) -> None:
    """N host CPU devices for the compile. Only effective before jax is imported."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"


def parser() -> argparse.ArgumentParser:
    """The trainer's keys (its help text and choices), with the planner's defaults for an accelerator."""
    import typing

    from bco_jax.config import SECTIONS, key_table

    p = argparse.ArgumentParser(prog="python -m bco_jax.plan", description=__doc__.split("\n\n")[0])

    def key(name, default, type=str, extra_choices=()):
        section, field = key_table()[name]
        hint = typing.get_type_hints(SECTIONS[section])[name]
        choices = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None
        choices = tuple(dict.fromkeys((*choices, *extra_choices))) if choices else None
        p.add_argument(f"--{name}", type=type, default=default, choices=choices,
                       help=f"{field.metadata['help']} (here: {default})")

    key("model", None)
    key("mesh", (1, -1, 1), type=_mesh)
    key("batch_size", 64, type=int)
    key("gradient_accumulation_steps", 1, type=int)
    key("max_length", 1024, type=int)
    key("remat", "full")
    key("precompute_ref_log_probs", False, type=lambda s: {"true": True, "false": False}[s.lower()])
    key("dtype", "bfloat16")
    key("ref_dtype", "bfloat16")
    key("attn_implementation", "auto", extra_choices=FUSED_KERNELS)
    p.add_argument("--devices", type=int, help="simulated devices (default: the product of --mesh)")
    p.add_argument("--device_memory", type=parse_bytes, default=parse_bytes("80GiB"),
                   help="memory of one device: 16GiB (TPU v5e), 95GiB (v5p), 80GiB (H100), 141GiB (H200)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    p.add_argument("--search", action="store_true", help="also find the largest micro-batch per device that fits")
    return p


# ------------------------------------------------------------------------------------------- compile


def abstract_models(model_cfg, dtype, ref_dtype):
    """((graphdef, state) of the float32 policy, of the reference in `ref_dtype`), shapes only."""
    import jax.numpy as jnp
    from flax import nnx

    from bco_jax.models import Decoder

    def split(param_dtype):
        return nnx.split(nnx.eval_shape(lambda: Decoder(model_cfg, rngs=nnx.Rngs(0), dtype=jnp.dtype(dtype),
                                                        param_dtype=jnp.dtype(param_dtype))))
    return split(jnp.float32), split(ref_dtype)


def bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (replicated leaves in full)."""
    import jax

    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def score_free_attention(cfg, q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask, is_causal):
    """Stand-in for a fused kernel: the same inputs, output and gradients' shapes, O(B T N H) memory."""
    import jax
    import jax.numpy as jnp

    groups = q_BxTxNxH.shape[2] // k_BxSxKxH.shape[2]
    k_BxTxNxH, v_BxTxNxH = (jnp.repeat(x, groups, axis=2) for x in (k_BxSxKxH, v_BxSxKxH))
    gate_BxTxNx1 = jax.nn.sigmoid(jnp.sum(q_BxTxNxH * k_BxTxNxH, axis=-1, keepdims=True, dtype=jnp.float32))
    return (gate_BxTxNx1 * v_BxTxNxH).astype(q_BxTxNxH.dtype)


class Planner:
    """Everything of a plan but the batch: the abstract state, reference and jitted step on `mesh`."""

    def __init__(self, model_cfg, mesh, *, dtype, ref_dtype, precompute_ref_log_probs):
        import functools

        import jax
        from flax import nnx

        from bco_jax import losses as L
        from bco_jax.config import LossOptions, OptimOptions
        from bco_jax.models import weight_decay_mask
        from bco_jax.sharding import model_shardings
        from bco_jax.step import init_state, make_optimizer, state_shardings, train_step

        self.mesh, self.model_cfg = mesh, model_cfg
        (graphdef, param_state), (ref_graphdef, ref_state) = abstract_models(model_cfg, dtype, ref_dtype)
        params = nnx.to_pure_dict(param_state)
        self.parameters = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
        # As build(): the same optimizer (the schedule's length does not change memory), state and shardings.
        loss, optim = LossOptions(), OptimOptions()
        optimizer, schedule = make_optimizer(optim, 1000, weight_decay_mask(param_state))
        shift = L.reward_shift_init(loss.reward_shift, loss.reward_shift_decay)
        make_state = functools.partial(init_state, optimizer=optimizer, reward_shift=shift, seed=0)
        abstract = jax.eval_shape(make_state, params)
        shardings = state_shardings(abstract, nnx.to_pure_dict(model_shardings(param_state, mesh)), mesh, optimizer)
        self.state = _placed(abstract, shardings)
        self.reference = None if precompute_ref_log_probs else _placed(
            nnx.to_pure_dict(ref_state), nnx.to_pure_dict(model_shardings(ref_state, mesh)))
        self.step_fn = jax.jit(functools.partial(train_step, graphdefs=(graphdef, ref_graphdef), cfg=loss,
                                                 optimizer=optimizer, schedule=schedule),
                               out_shardings=(shardings, None), donate_argnums=0)

    def batch(self, accumulation: int, rows: int, length: int) -> dict:
        """The unpaired BCO batch the step reads: [A, rows, T] tokens, [A, rows] labels and masks."""
        import jax
        import jax.numpy as jnp

        from bco_jax.sharding import batch_sharding

        def spec(shape, dtype):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(self.mesh, len(shape)))

        tokens, rows_ = (accumulation, rows, length), (accumulation, rows)
        batch = {k: spec(tokens, jnp.int32) for k in ("input_ids", "attention_mask", "loss_mask")}
        batch.update(labels=spec(rows_, jnp.bool_), example_mask=spec(rows_, jnp.bool_))
        if self.reference is None:
            batch["reference_logps"] = spec(rows_, jnp.float32)
        return batch

    def memory(self, batch: dict, fused_attention: bool) -> dict:
        """XLA's memory analysis of the compiled step (per device), with a score-free attention
        stand-in when the target's kernel is fused."""
        from unittest import mock

        import jax

        from bco_jax.models import decoder

        patch = mock.patch.object(decoder, "attend", score_free_attention) if fused_attention else mock.MagicMock()
        with jax.set_mesh(self.mesh), patch:
            analysis = self.step_fn.lower(self.state, self.reference, batch).compile().memory_analysis()
        return {k: int(getattr(analysis, k, 0) or 0) for k in
                ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")}


def _placed(tree, shardings):
    import jax

    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
