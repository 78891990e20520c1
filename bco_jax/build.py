"""Everything a training run is made of, built from its config: `build(cfg, mesh) -> Run`.

    run = build(cfg, mesh)                      # models on the mesh, data, optimizer, jitted step
    state, udm_params, start = restore(run, checkpointer)
    tables = precompute(run, udm_params)        # reference log-probs, UDM weights (optional)
    if tables.ref_table is not None:
        run = dataclasses.replace(run, reference=None)   # log-probs come with the batch: free the weights
    state = bco_jax.train.train_loop(run, state, tables, checkpointer, writer, start)

`Run` is frozen: what changes during training (the state, the data position inside `iterator`) is
passed along explicitly. Benchmarks and experiments build their runs here, as the CLI does.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bco_jax import checkpoint as ckpt_lib
from bco_jax import losses as L
from bco_jax import udm
from bco_jax.config import TrainConfig, mesh_shape
from bco_jax.data import BatchIterator, TokenizedDataset, load_dataset
from bco_jax.errors import ConfigError, log
from bco_jax.metrics import truncate_metrics
from bco_jax.models import compute_dtype, load_hf, weight_decay_mask
from bco_jax.precompute import fit_udm, reference_table
from bco_jax.sharding import LOGICAL_RULES, build_mesh, data_parallel_size, model_shardings
from bco_jax.step import TrainState, eval_step, init_state, make_optimizer, state_shardings, train_step


@dataclasses.dataclass(frozen=True)
class Run:
    """A built run: its config, mesh, data, models and jitted functions.

    `step_fn(state, reference, batch) -> (state, metrics)` with `batch` from `sharding.put_batch`
    ([A, b, ...] arrays); `eval_fn(params, reference, batch, reward_shift) -> per-row outputs` on
    [1, b, ...] batches. `reference` is the reference's parameters, or None when its log-probs are
    precomputed into the batch.
    """
    cfg: TrainConfig
    mesh: jax.sharding.Mesh
    output_dir: str
    tokenizer: Any
    train_data: TokenizedDataset
    eval_data: TokenizedDataset | None
    iterator: BatchIterator  # stateful: its position is saved in every checkpoint
    steps: int  # optimizer steps of the whole run
    graphdef: nnx.GraphDef
    ref_graphdef: nnx.GraphDef
    state: TrainState  # the initial state, on its shardings
    shardings: TrainState
    reference: dict
    step_fn: Any
    eval_fn: Any
    ref_path: str
    ref_fingerprint: str
    hidden_size: int

    @property
    def main_process(self) -> bool:
        return jax.process_index() == 0


class Tables(NamedTuple):
    """What `precompute` produced; all None when nothing was precomputed."""
    ref_table: np.ndarray | None = None  # reference log-probs of train_data, by example
    eval_ref_table: np.ndarray | None = None
    weights: np.ndarray | None = None  # UDM weights of train_data, by example
    udm_params: dict | None = None  # the classifier, checkpointed
    udm_log: dict | None = None


# ------------------------------------------------------------------------------------------ pieces


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise ConfigError(f"model: {path} is not a folder (a local HF model folder is expected; nothing is "
                          "downloaded)")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model: cannot load a tokenizer from {path} ({err})") from None


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    if cfg.run.max_steps > 0:
        return cfg.run.max_steps
    return max(1, math.ceil(cfg.run.num_train_epochs * steps_per_epoch))


def load_data(cfg: TrainConfig, tokenizer):
    train_data = load_dataset(cfg.data.train_data, tokenizer, cfg.data)
    eval_data = (load_dataset(cfg.data.eval_data, tokenizer, cfg.data, split=cfg.data.eval_split,
                              require_both_classes=False) if cfg.data.eval_data else None)
    paired_loss = cfg.loss.loss_type in L.PAIRED_LOSSES
    if paired_loss != train_data.paired:
        kind = "paired" if train_data.paired else "unpaired"
        raise ConfigError(f"loss_type: {cfg.loss.loss_type} needs {'paired' if paired_loss else 'unpaired'} data "
                          f"(prompt/chosen/rejected), but train_data is {kind}")
    return train_data, eval_data


def load_models(cfg: TrainConfig, mesh):
    """(policy, reference) as `nnx.split` pairs of (graphdef, state), placed on the mesh."""
    options = dict(dtype=compute_dtype(cfg.model.dtype), mesh=mesh, rules=LOGICAL_RULES, remat=cfg.model.remat,
                   attn_implementation=cfg.model.attn_implementation)
    policy = nnx.split(load_hf(cfg.model.model, param_dtype=jnp.float32, **options))
    reference = nnx.split(load_hf(cfg.model.ref_model or cfg.model.model,
                                  param_dtype=jnp.dtype(cfg.model.ref_dtype), **options))
    return policy, reference


def check_layout(cfg: TrainConfig, mesh) -> None:
    accumulation = cfg.run.gradient_accumulation_steps
    data_devices = data_parallel_size(mesh)
    if cfg.run.batch_size % (accumulation * data_devices):
        raise ConfigError(f"batch_size: {cfg.run.batch_size} is not divisible by gradient_accumulation_steps "
                          f"({accumulation}) x data-parallel devices ({data_devices})")
    if cfg.run.eval_batch % data_devices:
        raise ConfigError(f"eval_batch_size: {cfg.run.eval_batch} is not divisible by the {data_devices} "
                          "data-parallel devices")
    if cfg.run.precompute_ref_log_probs and cfg.loss.loss_type == "kto":
        raise ConfigError("precompute_ref_log_probs: not supported with loss_type=kto (its KL pairs change "
                          "with every batch)")


def mesh_for(cfg: TrainConfig):
    try:
        return build_mesh(mesh_shape(cfg))
    except ValueError as err:
        raise ConfigError(f"mesh: {err}") from None


# ------------------------------------------------------------------------------------------- build


def build(cfg: TrainConfig, mesh=None, output_dir: str | None = None) -> Run:
    """Load and place everything the run needs, build the initial state and jit the step."""
    from bco_jax.config import run_name

    mesh = mesh_for(cfg) if mesh is None else mesh
    check_layout(cfg, mesh)
    output_dir = output_dir or cfg.run.output_dir or os.path.join("outputs", run_name(cfg))
    tokenizer = load_tokenizer(cfg.model.model)
    train_data, eval_data = load_data(cfg, tokenizer)
    iterator = BatchIterator(train_data, cfg.data, seed=cfg.run.seed, global_batch_size=cfg.run.batch_size,
                             process_index=jax.process_index(), process_count=jax.process_count())
    steps = total_steps(cfg, iterator.steps_per_epoch)
    (graphdef, param_state), (ref_graphdef, ref_state) = load_models(cfg, mesh)
    params = nnx.to_pure_dict(param_state)
    optimizer, schedule = make_optimizer(cfg.optim, steps, weight_decay_mask(param_state))
    shift = L.reward_shift_init(cfg.loss.reward_shift, cfg.loss.reward_shift_decay)
    make_state = functools.partial(init_state, optimizer=optimizer, reward_shift=shift, seed=cfg.run.seed)
    shardings = state_shardings(jax.eval_shape(make_state, params),
                                nnx.to_pure_dict(model_shardings(param_state, mesh)), mesh, optimizer)
    # Built under jit straight onto its shardings: on several hosts no process holds all of it.
    state = jax.jit(make_state, out_shardings=shardings)(params)
    graphdefs = (graphdef, ref_graphdef)
    step_fn = jax.jit(functools.partial(train_step, graphdefs=graphdefs, cfg=cfg.loss, optimizer=optimizer,
                                        schedule=schedule),
                      out_shardings=(shardings, None), donate_argnums=0)
    eval_fn = jax.jit(lambda p, r, b, s: eval_step(p, r, {k: v[0] for k, v in b.items()}, s,
                                                   graphdefs=graphdefs, cfg=cfg.loss))
    ref_path = cfg.model.ref_model or cfg.model.model
    return Run(cfg=cfg, mesh=mesh, output_dir=output_dir, tokenizer=tokenizer, train_data=train_data,
               eval_data=eval_data, iterator=iterator, steps=steps, graphdef=graphdef, ref_graphdef=ref_graphdef,
               state=state, shardings=shardings, reference=nnx.to_pure_dict(ref_state), step_fn=step_fn,
               eval_fn=eval_fn, ref_path=ref_path, ref_fingerprint=ckpt_lib.params_fingerprint(ref_path),
               hidden_size=int(params["embed"].shape[-1]))


# ------------------------------------------------------------------------------- resume, precompute


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def restore(run: Run, checkpointer) -> tuple[TrainState, dict | None, int]:
    """(state, UDM classifier or None, step) of the newest complete checkpoint, onto this run's mesh;
    the initial state at step 0 when there is none. `run.state` is consumed either way (its buffers
    are freed before the checkpoint is read, so two states never sit in memory together)."""
    start = checkpointer.latest_step()
    if start is None:
        return run.state, None, 0
    target = {"train": _abstract(run.state, run.shardings)}
    if run.cfg.loss.udm:
        target["udm"] = udm.abstract_params(run.hidden_size)
    jax.tree.map(lambda x: x.delete() if hasattr(x, "delete") else None, run.state)
    restored, saved = checkpointer.restore(start, target)
    ckpt_lib.check_reference(saved, run.ref_fingerprint)
    run.iterator.restore(saved["data"])
    if run.main_process:
        truncate_metrics(run.output_dir, start, finished=start == run.steps)
    log.info("resumed %s at step %d", run.output_dir, start)
    return restored["train"], restored.get("udm"), start


def precompute(run: Run, udm_params=None) -> Tables:
    """UDM weights (fit, or from the restored classifier) and reference log-probs, as configured."""
    cfg = run.cfg
    tables = Tables(udm_log={})
    if cfg.loss.udm:
        params, weights, udm_log = fit_udm(run.train_data, cfg.data, cfg.loss, cfg.run.eval_batch, cfg.run.seed,
                                           run.ref_graphdef, run.reference, restored=udm_params)
        tables = tables._replace(weights=weights, udm_params=params, udm_log=udm_log)
    if cfg.run.precompute_ref_log_probs:
        os.makedirs(run.output_dir, exist_ok=True)
        ref_id = run.ref_fingerprint.split(":")[-1][:16]

        def table(data):
            path = os.path.join(run.output_dir, f"reference_logps-{ref_id}-{data.fingerprint()[:16]}.npy")
            return reference_table(data, cfg.data, cfg.run.eval_batch, run.ref_graphdef, run.reference, run.mesh,
                                   path)

        tables = tables._replace(ref_table=table(run.train_data),
                                 eval_ref_table=table(run.eval_data) if run.eval_data is not None else None)
    return tables
