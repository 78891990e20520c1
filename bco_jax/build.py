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
import functools
import json
import math
import os
import shutil
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from bco_jax import checkpoint as ckpt_lib
from bco_jax import losses as L
from bco_jax import udm
from bco_jax.config import TrainConfig, mesh_shape
from bco_jax.data import BatchIterator, TokenizedDataset, load_dataset
from bco_jax.errors import ConfigError, log
from bco_jax.files import atomic_write_json
from bco_jax.guards import (
    MODEL_COPY,
    check_finite_weights,
    check_model_files,
    check_pairing,
    check_resume,
    fingerprint_once,
    reading_weights,
    run_identity,
)
from bco_jax.metrics import truncate_metrics
from bco_jax.models import Decoder, compute_dtype, load_hf, lora, read_config, save_hf, weight_decay_mask
from bco_jax.models.decoder import layer_param_shapes
from bco_jax.precompute import fit_udm, reference_table
from bco_jax.sharding import (
    LOGICAL_RULES,
    abstract_on,
    build_mesh,
    data_parallel_size,
    data_shard,
    host_gather,
    model_shardings,
    shard_devices,
)
from bco_jax.step import TrainState, eval_step, init_state, make_optimizer, state_shardings, train_step

REFERENCE_COPY = "reference"  # under output_dir, beside MODEL_COPY


@dataclasses.dataclass(frozen=True)
class Run:
    """A built run: its config, mesh, data, models and jitted functions.

    `step_fn(state, reference, batch, capacity) -> (state, metrics)` with `batch` from
    `sharding.put_batch` ([A, b, ...] arrays) and `capacity` = `completion_capacity(batch)` (static);
    `eval_fn(params, reference, batch, reward_shift, capacity) -> per-row outputs` on [1, b, ...]
    batches; both take `run.frozen` as `reference`. `reference` holds the reference's parameters, or
    None when its log-probs are precomputed into the batch. With use_peft, `base` is the frozen base
    the adapters sit on, in the compute dtype; without a separate ref_model it is also the reference
    (the same tree: no second copy). `abstract_state` is the state's shapes, dtypes and shardings.
    """
    cfg: TrainConfig
    mesh: jax.sharding.Mesh
    output_dir: str
    model_dir: str  # the policy's HF folder: --model, or the copy under output_dir once that is gone
    tokenizer: Any
    train_data: TokenizedDataset
    eval_data: TokenizedDataset | None
    iterator: BatchIterator  # stateful: its position is saved in every checkpoint
    steps: int  # optimizer steps of the whole run
    graphdef: nnx.GraphDef
    ref_graphdef: nnx.GraphDef
    abstract_state: TrainState
    init_fn: Any  # policy params -> initial TrainState on its shardings
    reference: dict | None
    base: dict | None  # with use_peft only
    base_graphdef: nnx.GraphDef | None  # the base's, without adapters and not int8 (the export's)
    ref_path: str
    ref_fingerprint: str
    step_fn: Any
    eval_fn: Any
    hidden_size: int

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


def completion_capacity(batch: dict) -> int | tuple[int, int] | None:
    """The host batch's scored tokens per row at most (the data pipeline's `completion_capacity`),
    a static argument of the step: the LM head runs on that many positions per row. With packing and
    KTO, a pair (packed rows, KL rows: `kl_completion_capacity`)."""
    value = batch.get("completion_capacity")
    main = None if value is None or len(value) == 0 else int(value[0])
    kl = batch.get("kl_completion_capacity")
    return main if kl is None or len(kl) == 0 else (main, int(kl[0]))


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

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


def mesh_for(cfg: TrainConfig):
    try:
        return build_mesh(mesh_shape(cfg))
    except ValueError as err:
        raise ConfigError(f"mesh: {err}") from None


def model_folder(path: str, saved: str, key: str) -> str:
    """`path` when it is a folder, else the copy a previous start saved under output_dir."""
    if os.path.isdir(path):
        return check_model_files(path, key)
    if os.path.exists(os.path.join(saved, "config.json")):
        log.warning("%s: %s is gone; using the copy saved in %s", key, path, saved)
        return check_model_files(saved, key)
    raise ConfigError(f"{key}: {path} is not a folder (a local HF model folder is expected; nothing is "
                      "downloaded)")


def model_options(cfg: TrainConfig) -> dict:
    return dict(dtype=compute_dtype(cfg.model.dtype), remat=cfg.model.remat,
                attn_implementation=cfg.model.attn_implementation)


def lora_options(cfg: TrainConfig) -> dict:
    """ModelConfig fields of the policy's LoRA adapters (none without use_peft), and of its int8 base."""
    m = cfg.model
    if not m.use_peft:
        return {}
    return dict(lora_rank=m.lora_r, lora_alpha=float(m.lora_alpha), lora_dropout=float(m.lora_dropout),
                lora_targets=lora.resolve_targets(m.lora_target_modules), **base_options(cfg))


def base_options(cfg: TrainConfig) -> dict:
    """ModelConfig fields of the frozen base the adapters sit on: int8 projections with load_in_8bit."""
    return {"quantize_base": True} if cfg.model.use_peft and cfg.model.load_in_8bit else {}


def int8_reference(cfg: TrainConfig) -> bool:
    """Whether the reference is int8: it is the base with adapters off, and the base is int8."""
    return bool(base_options(cfg)) and not cfg.model.separate_reference


def abstract_model(path: str, param_dtype, cfg: TrainConfig, **extra):
    """(graphdef, abstract nnx.State) of the model in HF folder `path`, without reading weights."""
    options = model_options(cfg)
    dtype = options.pop("dtype")
    model_cfg = read_config(path, **options, **extra)
    model = nnx.eval_shape(lambda: Decoder(model_cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
    return nnx.split(model)


# ------------------------------------------------------------------------------------------- build


def build(cfg: TrainConfig, mesh=None, output_dir: str | None = None) -> Run:
    """Load and place everything the run needs and jit the step; the initial state is made by
    `initial_state(run)` (when there is no checkpoint to resume)."""
    from bco_jax.config import run_name

    mesh = mesh_for(cfg) if mesh is None else mesh
    check_layout(cfg, mesh)
    output_dir = output_dir or cfg.run.output_dir or os.path.join("outputs", run_name(cfg))
    model_dir = model_folder(cfg.model.model, os.path.join(output_dir, MODEL_COPY), "model")
    tokenizer = load_tokenizer(model_dir)
    train_data, eval_data = load_data(cfg, tokenizer)
    shard, shards = data_shard(mesh)
    iterator = BatchIterator(train_data, cfg.data, seed=cfg.run.seed, global_batch_size=cfg.run.batch_size,
                             process_index=shard, process_count=shards,
                             accumulation=cfg.run.gradient_accumulation_steps, shard_devices=shard_devices(mesh))
    steps = total_steps(cfg, iterator.steps_per_epoch)

    graphdef, abstract_params = abstract_model(model_dir, jnp.float32, cfg, **lora_options(cfg))
    # What the optimizer trains: the whole policy, or with use_peft its adapters alone.
    trained = (lambda tree: lora.split_adapters(tree)[1]) if cfg.model.use_peft else (lambda tree: tree)
    optimizer, schedule = make_optimizer(cfg.optim, steps, trained(weight_decay_mask(abstract_params)))
    shift = L.reward_shift_init(cfg.loss.reward_shift, cfg.loss.reward_shift_decay)
    make_state = functools.partial(init_state, optimizer=optimizer, reward_shift=shift, seed=cfg.run.seed)
    params_shape = trained(nnx.to_pure_dict(abstract_params))
    shardings = state_shardings(jax.eval_shape(make_state, params_shape),
                                trained(nnx.to_pure_dict(model_shardings(abstract_params, mesh))), mesh, optimizer)
    abstract_state = abstract_on(jax.eval_shape(make_state, params_shape), shardings)
    # Built under jit straight onto its shardings: on several hosts no process holds all of it.
    init_fn = jax.jit(make_state, out_shardings=shardings)

    ref_graphdef, reference, ref_path, fingerprint = load_reference(cfg, mesh, output_dir)
    base_graphdef, base = None, None  # with use_peft: the frozen base the adapters sit on
    if cfg.model.use_peft and cfg.model.separate_reference:
        base_graphdef, base = load_base(cfg, mesh, model_dir)
    elif cfg.model.use_peft:  # the reference is the base with adapters off: one tree serves both
        base_graphdef, base = ref_graphdef, reference
    if base_options(cfg):  # the export merges into dequantized weights: a plain (float) graphdef
        base_graphdef = abstract_model(model_dir, compute_dtype(cfg.model.dtype), cfg)[0]
    graphdefs, peft = (graphdef, ref_graphdef), cfg.model.use_peft
    step_fn = jax.jit(functools.partial(train_step, graphdefs=graphdefs, cfg=cfg.loss, optimizer=optimizer,
                                        schedule=schedule, lora=peft),
                      out_shardings=(shardings, None), donate_argnums=0, static_argnums=3)
    eval_fn = jax.jit(lambda p, r, b, s, c: eval_step(p, r, {k: v[0] for k, v in b.items()}, s, c,
                                                      graphdefs=graphdefs, cfg=cfg.loss, lora=peft),
                      static_argnums=4)
    return Run(cfg=cfg, mesh=mesh, output_dir=output_dir, model_dir=model_dir, tokenizer=tokenizer,
               train_data=train_data, eval_data=eval_data, iterator=iterator, steps=steps, graphdef=graphdef,
               ref_graphdef=ref_graphdef, abstract_state=abstract_state, init_fn=init_fn, reference=reference,
               base=base, base_graphdef=base_graphdef, ref_path=ref_path, ref_fingerprint=fingerprint,
               step_fn=step_fn, eval_fn=eval_fn,
               hidden_size=int(nnx.to_pure_dict(abstract_params)["embed"].shape[-1]))


def initial_state(run: Run) -> TrainState:
    """The state at step 0: the policy's weights from its HF folder (with use_peft: fresh adapters,
    or those of `lora_adapter`), on the state's shardings."""
    m = run.cfg.model
    if m.use_peft:
        model_cfg = read_config(run.model_dir, **lora_options(run.cfg))
        shapes = {k: v[0] for k, v in layer_param_shapes(model_cfg).items()}
        targets = model_cfg.lora_targets
        if m.lora_adapter:
            adapters = lora.load_peft(m.lora_adapter, model_cfg.num_layers, shapes, targets, m.lora_r)
        else:
            adapters = lora.init_adapters(shapes, model_cfg.num_layers, targets, m.lora_r,
                                          jax.random.key(run.cfg.run.seed))
        return run.init_fn({"layers": {f"{name}_lora_{ab}": jnp.asarray(adapters[name][ab])
                                       for name in targets for ab in "ab"}})
    policy = load_hf(run.model_dir, param_dtype=jnp.float32, mesh=run.mesh, rules=LOGICAL_RULES,
                     **model_options(run.cfg))
    return run.init_fn(nnx.to_pure_dict(nnx.split(policy)[1]))


def policy_params(run: Run, state: TrainState) -> dict:
    """The whole policy's parameters (with use_peft: the frozen base joined with the adapters)."""
    return lora.join_adapters(run.base, state.params) if run.cfg.model.use_peft else state.params


def export_policy(run: Run, state: TrainState) -> None:
    """output_dir/hf: the policy as an HF folder (with use_peft, the adapters merged into the base),
    and with use_peft output_dir/adapter, a PEFT folder. Every process calls it (they gather the
    sharded parameters together); process 0 writes."""
    path = os.path.join(run.output_dir, "hf")
    if not run.cfg.model.use_peft:
        save_hf(nnx.merge(run.graphdef, state.params), path, tokenizer=run.tokenizer)
        return
    m = run.cfg.model
    merged = lora.merged_weights(run.base, state.params, m.lora_alpha / m.lora_r)
    save_hf(nnx.merge(run.base_graphdef, merged), path, tokenizer=run.tokenizer)
    adapters = lora.by_projection(jax.tree.map(host_gather, state.params))
    if run.main_process:
        lora.save_peft(adapters, os.path.join(run.output_dir, "adapter"), rank=m.lora_r, alpha=m.lora_alpha,
                       dropout=m.lora_dropout, targets=lora.resolve_targets(m.lora_target_modules),
                       base_model=os.path.abspath(m.model))


# ---------------------------------------------------------------------- the reference and its copy


def load_reference(cfg: TrainConfig, mesh, output_dir: str):
    """(graphdef, params, path, fingerprint) of the frozen reference: from its HF folder, or from the
    Orbax copy a previous start saved under output_dir when that folder is gone."""
    path = cfg.model.ref_model or cfg.model.model
    saved = os.path.join(output_dir, REFERENCE_COPY)
    folder = model_folder(path, os.path.join(saved, "hf"), "ref_model")
    check_pairing(cfg, folder, output_dir)
    # With use_peft and no separate ref_model the reference is the policy's frozen base, kept in the
    # compute dtype.
    as_base = cfg.model.use_peft and not cfg.model.separate_reference
    param_dtype = compute_dtype(cfg.model.dtype) if as_base else jnp.dtype(cfg.model.ref_dtype)
    quantized = base_options(cfg) if int8_reference(cfg) else {}
    graphdef, abstract = abstract_model(folder, param_dtype, cfg, **quantized)
    if folder == path:
        params = _load_params(path, param_dtype, cfg, mesh, "ref_model", **quantized)
        return graphdef, params, path, fingerprint_once(path)
    with open(os.path.join(saved, "reference.json"), encoding="utf-8") as f:
        record = json.load(f)
    if record.get("ref_dtype") != cfg.model.ref_dtype:
        raise ConfigError(f"ref_dtype: the saved reference copy in {saved} is {record.get('ref_dtype')}, "
                          f"not {cfg.model.ref_dtype}; keep ref_dtype or restore the original {path}")
    if record.get("int8", False) != bool(quantized):
        raise ConfigError(f"load_in_8bit: the saved reference copy in {saved} was written with load_in_8bit "
                          f"{str(record.get('int8', False)).lower()}; keep it or restore the original {path}")
    shardings = nnx.to_pure_dict(model_shardings(abstract, mesh))
    target = abstract_on(nnx.to_pure_dict(abstract), shardings)
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(os.path.abspath(os.path.join(saved, "params")), target)
    return graphdef, params, record["path"], record["fingerprint"]


def load_base(cfg: TrainConfig, mesh, model_dir: str):
    """(graphdef, params) of the frozen base the adapters sit on, with use_peft and a separate
    ref_model: from `--model` in the compute dtype (only the reference is saved under output_dir)."""
    if not any(name.endswith(".safetensors") for name in os.listdir(model_dir)):
        raise ConfigError(f"model: {cfg.model.model} is gone; with use_peft and a separate ref_model the frozen "
                          "base is read from it on every start (only the reference is saved under output_dir)")
    dtype = compute_dtype(cfg.model.dtype)
    return (abstract_model(model_dir, dtype, cfg, **base_options(cfg))[0],
            _load_params(model_dir, dtype, cfg, mesh, "model", **base_options(cfg)))


def _load_params(path: str, param_dtype, cfg: TrainConfig, mesh, key: str, **extra) -> dict:
    with reading_weights(path, key):
        model = load_hf(path, param_dtype=param_dtype, mesh=mesh, rules=LOGICAL_RULES, **model_options(cfg), **extra)
    params = nnx.to_pure_dict(nnx.split(model)[1])
    check_finite_weights(params, path, key)
    return params


def save_model_copies(run: Run) -> None:
    """Once per output_dir: the policy's config + tokenizer (`model/`) and, unless save_reference is
    off, the reference weights (`reference/`, Orbax) with its config and fingerprint. Every process
    calls it (the Orbax write is collective); process 0 writes the small files."""
    model_copy = os.path.join(run.output_dir, MODEL_COPY)
    if run.main_process and run.model_dir != model_copy and not os.path.exists(model_copy):
        _copy_hf_files(run.model_dir, model_copy, run.tokenizer)
    saved = os.path.join(run.output_dir, REFERENCE_COPY)
    if not run.cfg.run.save_reference or run.reference is None or os.path.exists(os.path.join(saved, "reference.json")):
        return
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.abspath(os.path.join(saved, "params")), run.reference, force=True)
    if run.main_process:
        _copy_hf_files(run.ref_path, os.path.join(saved, "hf"), None)
        atomic_write_json(os.path.join(saved, "reference.json"),  # written last: marks the copy complete
                          {"path": os.path.abspath(run.ref_path), "fingerprint": run.ref_fingerprint,
                           "ref_dtype": run.cfg.model.ref_dtype,
                           "int8": int8_reference(run.cfg)}, indent=2)


def _copy_hf_files(source: str, target: str, tokenizer) -> None:
    tmp = f"{target}.tmp-{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        if os.path.exists(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)


# ------------------------------------------------------------------------------- resume, precompute


def restore(run: Run, checkpointer, identity: dict | None = None) -> tuple[TrainState, dict | None, int]:
    """(state, UDM state or None, step) of the newest complete checkpoint that reads, onto this run's
    mesh; the initial state at step 0 when there is none. Before any array is read, a checkpoint of
    other reference weights, of another model's shapes, or of a config whose meaning differs
    (`check_resume`; `identity`: `run_identity(run)`) is refused."""
    target = {"train": run.abstract_state}
    if run.cfg.loss.udm:
        target["udm"] = {"classifier": udm.abstract_params(run.hidden_size),
                         "weights": jax.ShapeDtypeStruct((len(run.train_data),), jnp.float32)}
    identity = run_identity(run) if identity is None else identity

    def check(step, extras):
        ckpt_lib.check_reference(extras, run.ref_fingerprint)
        check_resume(run, step, extras, identity)

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
            name = f"reference_logps-{ref_id}-{dtypes}-{data.fingerprint()[:16]}.npy"
            return reference_table(data, cfg.data, cfg.run.eval_batch, run.ref_graphdef, run.reference, run.mesh,
                                   os.path.join(run.output_dir, name))

        tables = tables._replace(ref_table=table(run.train_data),
                                 eval_ref_table=table(run.eval_data) if run.eval_data is not None else None)
    return tables


def _needs_reference(run: Run):
    if run.reference is None:
        raise ConfigError("udm: fitting the classifier needs the reference model, which is not available")
    return run.reference
