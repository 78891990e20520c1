"""Everything a training run is made of, built from its config: `build(cfg, mesh) -> Run`.

    run = build(cfg, mesh)                      # data, models on the mesh, optimizer, jitted step
    state, udm_state, start = restore(run, checkpointer)   # or the initial state, at step 0
    tables = precompute(run, udm_state)         # reference log-probs, UDM weights (optional)
    state, last = bco_jax.train.train_loop(run, state, tables, checkpointer, writer, start)

`Run` is frozen: what changes during training (the state, the data position inside `iterator`) is
passed along explicitly. Benchmarks and experiments build their runs here, as the CLI does.

A run keeps what it needs to resume under `output_dir`: the policy's config and tokenizer
(`model/`) and the reference weights (`reference/`, Orbax, saved once), so that re-running the same
command resumes when the original model folders are gone. The policy's weights are read from
`--model` only when there is no checkpoint to resume (with use_peft and a separate ref_model, the
frozen base is read from it on every start).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bco_jax import losses as L
from bco_jax import udm
from bco_jax.config import TrainConfig, mesh_shape
from bco_jax.data import BatchIterator, TokenizedDataset, load_dataset
from bco_jax.errors import ConfigError, log
from bco_jax.files import atomic_folder
from bco_jax.load import (
    abstract_model,
    base_options,
    check_finite_weights,
    load_base,
    load_reference,
    load_tokenizer,
    lora_options,
    model_folder,
    model_options,
    reading_weights,
)
from bco_jax.metrics import truncate_metrics
from bco_jax.models import compute_dtype, load_hf, lora, read_config, save_hf
from bco_jax.models.config import read_source
from bco_jax.models.decoder import layer_param_shapes
from bco_jax.models.hf import source_dtype, write_hf
from bco_jax.precompute import fit_udm, reference_table
from bco_jax.resume import RunIdentity, check_resume, run_identity
from bco_jax.run_dir import RunDir
from bco_jax.sharding import (
    LOGICAL_RULES,
    build_mesh,
    data_parallel_size,
    data_shard,
    host_gather,
    shard_devices,
)
from bco_jax.step import StepProgram, TrainState, compile_step


@dataclasses.dataclass(frozen=True)
class Run:
    """A built run: its config, mesh, data, models and jitted functions.

    `program` is the compiled step (`bco_jax.step.StepProgram`): `program.step(state, run.frozen,
    batch)` with `batch` from `sharding.put_batch`, `program.eval`, `program.init`,
    `program.abstract_state`. `reference` holds the reference's parameters, or None when its
    log-probs are precomputed into the batch. With use_peft, `base` is the frozen base the adapters
    sit on, in the compute dtype; without a separate ref_model it is also the reference (the same
    tree: no second copy).
    """
    cfg: TrainConfig
    mesh: jax.sharding.Mesh
    output_dir: str
    model_dir: str  # the policy's HF folder: --model, or the copy under output_dir once that is gone
    tokenizer: Any
    train_data: TokenizedDataset | None  # None in the online loop (it makes its data each round)
    eval_data: TokenizedDataset | None
    iterator: BatchIterator | None  # stateful: its position is saved in every checkpoint
    steps: int  # optimizer steps of the whole run
    graphdef: nnx.GraphDef
    ref_graphdef: nnx.GraphDef
    program: StepProgram
    reference: dict | None
    base: dict | None  # with use_peft only
    base_graphdef: nnx.GraphDef | None  # the base's, without adapters and not int8 (the export's)
    ref_path: str
    ref_fingerprint: str
    hidden_size: int
    adapters: dict | None = None  # with lora_adapter: the adapters to start from, read and checked

    @property
    def dir(self) -> RunDir:
        """Every path under output_dir."""
        return RunDir(self.output_dir)

    def identity(self) -> RunIdentity:
        """What this run's steps are computed from (`resume.RunIdentity`; hashes the policy's weights
        when they are not the reference's): computed once per start and handed to `restore`."""
        return run_identity(model_dir=self.model_dir, separate_reference=self.cfg.model.separate_reference,
                            ref_path=self.ref_path, ref_fingerprint=self.ref_fingerprint,
                            train_data_fingerprint=self.train_data.fingerprint())

    @property
    def main_process(self) -> bool:
        return jax.process_index() == 0

    @property
    def frozen(self):
        """The step's `reference` argument: the reference's parameters (None: precomputed), or with
        use_peft the pair (base, reference), reference None when it is the base with adapters off."""
        if not self.cfg.model.use_peft:
            return self.reference
        return self.base, (None if self.reference is self.base else self.reference)


class Tables(NamedTuple):
    """What `precompute` produced; None where nothing was precomputed."""
    ref_table: np.ndarray | None = None  # reference log-probs of train_data, by example
    eval_ref_table: np.ndarray | None = None
    udm: dict | None = None  # {"classifier": params, "weights": [n] per example}: checkpointed
    udm_log: dict | None = None


# ------------------------------------------------------------------------------------------ pieces


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


def check_layout(cfg: TrainConfig, mesh) -> None:
    accumulation = cfg.run.gradient_accumulation_steps
    data_devices = data_parallel_size(mesh)
    if cfg.run.batch_size % (accumulation * data_devices):
        raise ConfigError(f"batch_size: {cfg.run.batch_size} is not divisible by gradient_accumulation_steps "
                          f"({accumulation}) x data-parallel devices ({data_devices})")
    if cfg.run.eval_batch % data_devices:
        raise ConfigError(f"eval_batch_size: {cfg.run.eval_batch} is not divisible by the {data_devices} "
                          "data-parallel devices")
    if cfg.data.packing and cfg.model.attn_implementation == "auto" and jax.default_backend() == "gpu":
        log.warning("packing: cuDNN attention takes no segment ids; packed rows run on XLA attention")
    if cfg.run.precompute_ref_log_probs and cfg.loss.loss_type == "kto":
        raise ConfigError("precompute_ref_log_probs: not supported with loss_type=kto (its KL pairs change "
                          "with every batch)")


# ------------------------------------------------------------------------------------------- build


def build(cfg: TrainConfig, mesh=None, output_dir: str | None = None, *, steps: int | None = None) -> Run:
    """Load and place everything the run needs and jit the step; the initial state is made by
    `initial_state(run)` (when there is no checkpoint to resume). `steps` given (the online loop, which
    makes its data as it goes): no data is read, and `train_data`, `eval_data` and `iterator` are None."""
    mesh = build_mesh(mesh_shape(cfg)) if mesh is None else mesh  # ConfigError when the devices do not fit
    check_layout(cfg, mesh)
    output_dir = output_dir or RunDir.for_config(cfg).root
    model_dir = model_folder(cfg.model.model, RunDir(output_dir).model_copy, "model")
    tokenizer = load_tokenizer(model_dir)
    train_data = eval_data = iterator = None
    if steps is None:
        train_data, eval_data = load_data(cfg, tokenizer)
        shard, shards = data_shard(mesh)
        iterator = BatchIterator(train_data, cfg.data, seed=cfg.run.seed, global_batch_size=cfg.run.batch_size,
                                 process_index=shard, process_count=shards,
                                 accumulation=cfg.run.gradient_accumulation_steps, shard_devices=shard_devices(mesh))
        steps = total_steps(cfg, iterator.steps_per_epoch)

    graphdef, abstract_params = abstract_model(model_dir, jnp.float32, cfg, **lora_options(cfg))
    adapters = start_adapters(cfg, model_dir)
    ref_graphdef, reference, ref_path, fingerprint = load_reference(cfg, mesh, output_dir)
    base_graphdef, base = None, None  # with use_peft: the frozen base the adapters sit on
    if cfg.model.use_peft and cfg.model.separate_reference:
        base_graphdef, base = load_base(cfg, mesh, model_dir)
    elif cfg.model.use_peft:  # the reference is the base with adapters off: one tree serves both
        base_graphdef, base = ref_graphdef, reference
    if base_options(cfg):  # the export merges into dequantized weights: a plain (float) graphdef
        base_graphdef = abstract_model(model_dir, compute_dtype(cfg.model.dtype), cfg)[0]
    program = compile_step((graphdef, ref_graphdef), abstract_params, mesh, loss=cfg.loss, optim=cfg.optim,
                           total_steps=steps, seed=cfg.run.seed, lora=cfg.model.use_peft)
    return Run(cfg=cfg, mesh=mesh, output_dir=output_dir, model_dir=model_dir, tokenizer=tokenizer,
               train_data=train_data, eval_data=eval_data, iterator=iterator, steps=steps, graphdef=graphdef,
               ref_graphdef=ref_graphdef, program=program, reference=reference,
               base=base, base_graphdef=base_graphdef, ref_path=ref_path, ref_fingerprint=fingerprint,
               hidden_size=int(nnx.to_pure_dict(abstract_params)["embed"].shape[-1]), adapters=adapters)


def start_adapters(cfg: TrainConfig, model_dir: str) -> dict | None:
    """The adapters of `lora_adapter` (None without one), read and checked against the model's
    shapes when the run is built: before anything is written."""
    if not (cfg.model.use_peft and cfg.model.lora_adapter):
        return None
    model_cfg = read_config(model_dir, **lora_options(cfg))
    shapes = {k: v[0] for k, v in layer_param_shapes(model_cfg).items()}
    return lora.load_peft(cfg.model.lora_adapter, model_cfg.num_layers, shapes, model_cfg.lora_targets,
                          cfg.model.lora_r)


def initial_state(run: Run) -> TrainState:
    """The state at step 0: the policy's weights from its HF folder (with use_peft: fresh adapters,
    or those of `lora_adapter`), on the state's shardings."""
    m = run.cfg.model
    if m.use_peft:
        model_cfg = read_config(run.model_dir, **lora_options(run.cfg))
        shapes = {k: v[0] for k, v in layer_param_shapes(model_cfg).items()}
        targets = model_cfg.lora_targets
        adapters = run.adapters or lora.init_adapters(shapes, model_cfg.num_layers, targets, m.lora_r,
                                                      jax.random.key(run.cfg.run.seed))
        return run.program.init({"layers": {f"{name}_lora_{ab}": jnp.asarray(adapters[name][ab])
                                       for name in targets for ab in "ab"}})
    policy = load_hf(run.model_dir, param_dtype=jnp.float32, mesh=run.mesh, rules=LOGICAL_RULES,
                     **model_options(run.cfg))
    return run.program.init(nnx.to_pure_dict(nnx.split(policy)[1]))


def policy_params(run: Run, state: TrainState) -> dict:
    """The whole policy's parameters (with use_peft: the frozen base joined with the adapters)."""
    return lora.join_adapters(run.base, state.params) if run.cfg.model.use_peft else state.params


def export_policy(run: Run, state: TrainState) -> None:
    """output_dir/hf: the policy as an HF folder, and with use_peft output_dir/adapter, a PEFT folder.
    Streamed, one tensor at a time: a full fine-tune is written in the dtype its source config.json
    declares (cast before it is gathered; float32 when it declares none); with use_peft, each
    adapted layer is merged into the base (`lora.merged_layer`, in the base's dtype) as it is
    written. Every process calls it (they gather the sharded parameters together); process 0 writes."""
    m = run.cfg.model
    with atomic_folder(run.dir.hf, write=run.main_process) as path:  # all of hf/ or none of it
        if not m.use_peft:
            dtype = source_dtype(read_source(run.model_dir)[0])
            save_hf(nnx.merge(run.graphdef, state.params), path, tokenizer=run.tokenizer, dtype=dtype)
            return
        scale = m.lora_alpha / m.lora_r
        shapes = jax.eval_shape(lora.merged_weights, run.base, state.params, scale)  # nothing computed
        merged = nnx.merge(run.base_graphdef, shapes)  # the merged model, abstract: its config and dtype
        write_hf(merged.config, run.base, path, dtype=merged.param_dtype, tokenizer=run.tokenizer,
                 layer=lambda name, i: lora.merged_layer(run.base, state.params, scale, name, i))
    adapters = lora.by_projection(jax.tree.map(host_gather, state.params))
    with atomic_folder(run.dir.adapter, write=run.main_process) as path:
        if run.main_process:
            lora.save_peft(adapters, path, rank=m.lora_r, alpha=m.lora_alpha, dropout=m.lora_dropout,
                           targets=lora.resolve_targets(m.lora_target_modules), base_model=os.path.abspath(m.model))


# ------------------------------------------------------------------------------- resume, precompute


def restore(run: Run, checkpointer, identity: RunIdentity | None = None) -> tuple[TrainState, dict | None, int]:
    """(state, UDM state or None, step) of the newest complete checkpoint that reads, onto this run's
    mesh; the initial state at step 0 when there is none. Before any array is read, a checkpoint of
    other reference weights, of another model's shapes, or of a config whose meaning differs
    (`resume.check_resume`; `identity`: this run's `RunIdentity`) is refused."""
    target = {"train": run.program.abstract_state}
    if run.cfg.loss.udm:
        target["udm"] = {"classifier": udm.abstract_params(run.hidden_size),
                         "weights": jax.ShapeDtypeStruct((len(run.train_data),), jnp.float32)}
    identity = identity or run.identity()

    def check(step, extras):
        check_resume(identity, step, extras, config=run.cfg.flat(), allow_config_change=run.cfg.run.allow_config_change,
                     steps=run.steps, output_dir=run.output_dir)

    found = checkpointer.restore_latest(target, check)
    if found is None:
        if run.main_process:  # a run that died before its first checkpoint: its rows are stale
            truncate_metrics(run.output_dir, 0, finished=False, keep_start=False)
        with reading_weights(run.model_dir, "model"):
            state = initial_state(run)
        check_finite_weights(state.params, run.model_dir, "model")
        return state, None, 0
    start, restored, saved = found
    run.iterator.restore(saved["data"])
    if run.main_process:
        truncate_metrics(run.output_dir, start, finished=start == run.steps)
    log.info("resumed %s at step %d", run.output_dir, start)
    return restored["train"], restored.get("udm"), start


def precompute(run: Run, udm_state=None) -> Tables:
    """UDM weights (fit, or from the checkpoint) and reference log-probs, as configured."""
    cfg = run.cfg
    tables = Tables(udm_log={})
    if cfg.loss.udm:
        if udm_state is None:
            udm_state, udm_log = fit_udm(run.train_data, cfg.data, cfg.loss, cfg.run.eval_batch, cfg.run.seed,
                                         run.ref_graphdef, _needs_reference(run), run.mesh)
            tables = tables._replace(udm_log=udm_log)
        tables = tables._replace(udm=jax.tree.map(np.asarray, udm_state))
    if cfg.run.precompute_ref_log_probs:
        ref_id = run.ref_fingerprint.split(":")[-1][:16]

        def table(data):
            dtypes = f"{jnp.dtype(compute_dtype(cfg.model.dtype)).name}-{cfg.model.ref_dtype}"
            cache = run.dir.reference_logps(ref_id, dtypes, data.fingerprint()[:16])
            return reference_table(data, cfg.data, cfg.run.eval_batch, run.ref_graphdef, run.reference, run.mesh,
                                   cache)

        tables = tables._replace(ref_table=table(run.train_data),
                                 eval_ref_table=table(run.eval_data) if run.eval_data is not None else None)
    return tables


def _needs_reference(run: Run):
    if run.reference is None:
        raise ConfigError("udm: fitting the classifier needs the reference model, which is not available")
    return run.reference
