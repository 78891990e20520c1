"""The online loop's sampling memory, for `python -m bco_jax.plan --online`.

Each round of `bco_jax.online` samples all its prompts_per_round x num_generations rows in one call of
the KV-cache `generate`, between two training phases: the train state and the reference stay resident,
the step's batch and temporaries are gone. That call (`generate._generate` as the loop makes it:
sampled, one key per row) is compiled ahead of time on the simulated devices, for prompts as long as
the loop keeps them (max_length - max_completion_length). The KV cache is exact (shape x dtype x the
sharding `generate` pins it to); XLA's temporaries, which hold it, the prefill's [b, N, P, P + new]
float32 scores and the decode loop's buffers, are XLA CPU's estimate.
Jax is imported inside functions only: `bco_jax.plan` imports this module before it simulates devices.
"""
from __future__ import annotations

import math

from bco_jax.errors import ConfigError

ONLINE_KEYS = ("prompts_per_round", "num_generations", "max_completion_length")  # what sizes a round's sampling


def online_rows(args, data_parallel: int) -> int:
    """The rows one round samples (all processes together), once `args` pass the online loop's own
    checks (`bco_jax.online.fit`, `bco_jax.rounds.load_prompts`); ConfigError naming the key otherwise."""
    if args.precompute_ref_log_probs:
        raise ConfigError("precompute_ref_log_probs: not in the online loop (its answers are new every round)")
    rows = args.prompts_per_round * args.num_generations
    if rows % data_parallel:
        raise ConfigError(f"prompts_per_round: {args.prompts_per_round} x num_generations {args.num_generations} = "
                          f"{rows} answers do not split over {data_parallel} data-parallel devices")
    if args.max_completion_length >= args.max_length:
        raise ConfigError(f"max_completion_length: {args.max_completion_length} leaves no room for a prompt in "
                          f"max_length={args.max_length}")
    return rows


def _on(mesh, shape, logical_axes, dtype):
    """A ShapeDtypeStruct of `shape` on the mesh layout of its logical axes, as `decoder.constrain` pins it."""
    import jax
    from jax.sharding import NamedSharding

    from bco_jax.sharding import mesh_spec

    return jax.ShapeDtypeStruct(shape, jax.numpy.dtype(dtype),
                                sharding=NamedSharding(mesh, mesh_spec(logical_axes, mesh, shape=shape)))


def _device_bytes(struct) -> int:
    return math.prod(struct.sharding.shard_shape(struct.shape)) * struct.dtype.itemsize


def kv_cache_bytes(model_cfg, mesh, rows: int, length: int, dtype) -> int:
    """Bytes per device of `generate`'s cache, K and V: [layers, rows, length, kv_heads, head_dim] each,
    in the compute dtype, rows on the batch axes and heads on `tensor` (where they divide)."""
    from bco_jax.models.generate import CACHE_AXES

    shape = (model_cfg.num_layers, rows, length, model_cfg.num_kv_heads, model_cfg.head_dim)
    return 2 * _device_bytes(_on(mesh, shape, CACHE_AXES, dtype))


def prompt_args(mesh, rows: int, prompt_length: int):
    """The round's left-padded prompt ids and mask [rows, P] and row ids [rows, 3] (round, prompt,
    answer) as `generate` places them (`put_rows`: rows on the batch axes)."""
    return tuple(_on(mesh, shape, ("batch", None), "int32") for shape in ((rows, prompt_length),) * 2 + ((rows, 3),))


def sampling_per_device(sampled_policy, model_cfg, mesh, *, dtype: str, rows: int, prompt_length: int,
                        new_tokens: int, resident_bytes: int) -> dict:
    """Per-device bytes of one round's sampling: `sampled_policy` = (graphdef, abstract parameters on
    their shardings) as the loop samples from; `resident_bytes` what stays from training (parameters,
    optimizer state, reference). The prefill's scores of one layer are the analytic count."""
    import jax
    import jax.numpy as jnp

    from bco_jax.models.generate import _generate
    from bco_jax.step import memory_report

    graphdef, params = sampled_policy
    prompts = prompt_args(mesh, rows, prompt_length)
    with jax.set_mesh(mesh):
        xla = memory_report(_generate.lower(
            graphdef, params, prompts[0], prompts[1], jax.random.key(0), temperature=jnp.float32(1.0),
            top_p=jnp.float32(1.0), max_new_tokens=new_tokens, eos_ids=(0,), pad_id=0, greedy=False,
            row_ids=prompts[2]).compile())
    length = prompt_length + new_tokens
    scores = _on(mesh, (rows, model_cfg.num_heads, prompt_length, length), ("batch", "q_heads", None, None), "float32")
    parts = {"resident_bytes": resident_bytes, "prompts_bytes": sum(map(_device_bytes, prompts)),
             # XLA's temporaries (the cache among them) and the sampled tokens and masks it returns
             "temporaries_bytes": xla["temp_size_in_bytes"] + xla["output_size_in_bytes"]}
    return {"rows": rows, "rows_per_device": prompts[0].sharding.shard_shape(prompts[0].shape)[0],
            "prompt_length": prompt_length, "max_completion_length": new_tokens,
            "kv_cache_bytes": kv_cache_bytes(model_cfg, mesh, rows, length, dtype),
            "prefill_scores_bytes_per_layer": _device_bytes(scores), **parts, "total_bytes": sum(parts.values())}
