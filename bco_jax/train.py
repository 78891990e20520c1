"""`python -m bco_jax.train`: align a causal LM from thumbs-up / thumbs-down feedback.

The loop around the pure step (bco_jax/step.py): load the policy and the frozen reference onto the
mesh, build the data stream, optionally precompute reference log-probs and fit the UDM classifier,
then step, log, evaluate and checkpoint; resume from the latest checkpoint of `output_dir`; export
the policy as an HF folder at the end. With no arguments it runs the embedded demonstration: BCO on
the shipped oracle-task SFT model and feedback, with a before/after table.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from bco_jax import checkpoint as ckpt_lib
from bco_jax import losses as L
from bco_jax import udm
from bco_jax.config import PAIRED_LOSSES, ConfigError, TrainConfig, mesh_shape, parse_args, run_name
from bco_jax.data import BatchIterator, DataError, load_dataset, ordered_batches, prompt_batches
from bco_jax.metrics import MetricsWriter, Window, eval_summary
from bco_jax.models import load_hf, save_hf
from bco_jax.oracle import demo as oracle_demo
from bco_jax.sharding import LOGICAL_RULES, make_mesh, model_shardings
from bco_jax.step import StepConfig, TrainState, batch_logps, eval_step, init_state, make_optimizer, train_step

log = logging.getLogger("bco_jax.train")
BATCH_AXES = ("data", "fsdp")


class TrainError(RuntimeError):
    """A run that cannot go on; the message says why, the last good checkpoint is kept."""


# ------------------------------------------------------------------------------------------ setup


def compute_dtype(name: str):
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


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


def build_mesh(shape):
    """The configured mesh; a fully specified mesh smaller than the machine uses the first devices."""
    devices = jax.devices()
    wanted = int(np.prod(shape))
    if -1 not in shape and wanted < len(devices):
        log.warning("mesh %s uses %d of %d devices", shape, wanted, len(devices))
        devices = devices[:wanted]
    try:
        return make_mesh(shape, devices)
    except ValueError as err:
        raise ConfigError(f"mesh: {err}") from None


def batch_sharding(mesh, ndim: int):
    """[A, b, ...] micro-batched arrays: rows sharded over the data axes, micro-batches not."""
    return NamedSharding(mesh, PartitionSpec(None, BATCH_AXES, *([None] * (ndim - 2))))


def to_device_batch(local: dict, mesh, accumulation: int) -> dict:
    """This process's rows [b, ...] -> global [A, B/A, ...] jax.Arrays on the mesh."""
    out = {}
    for key, value in local.items():
        value = np.asarray(value).reshape(accumulation, -1, *np.shape(value)[1:])
        global_shape = (accumulation, value.shape[1] * jax.process_count(), *value.shape[2:])
        out[key] = jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value,
                                                          global_shape)
    return out


# ---------------------------------------------------------------------- one-pass precomputations


def reference_table(cfg, data, graphdef, ref_params, mesh, cache_path) -> np.ndarray:
    """Reference log-probs of every example ([n] unpaired, [n, 2] chosen/rejected), one pass in
    order, cached on disk under a key of reference weights + tokenized examples."""
    if os.path.exists(cache_path):
        log.info("reference log-probs: reusing %s", cache_path)
        return np.load(cache_path)
    prefixes = ["chosen_", "rejected_"] if data.paired else [""]
    # One pass over [1, b, ...] batches: the step's own log-prob helper on the single micro-batch.
    logps_fn = jax.jit(lambda p, b, pre: batch_logps(graphdef, p, {k: v[0] for k, v in b.items()}, pre)[0][None],
                       static_argnums=2)
    table = np.zeros((len(data), len(prefixes)), np.float32)
    batch_size = cfg.run.eval_batch_size or cfg.run.batch_size
    for batch in ordered_batches(data, cfg.data, batch_size, jax.process_index(), jax.process_count()):
        arrays = to_device_batch(batch, mesh, 1)
        idx = gather(arrays["example_index"])[0]  # the whole global batch, on every process
        for j, pre in enumerate(prefixes):
            values = gather(logps_fn(ref_params, arrays, pre))[0]
            table[idx[idx >= 0], j] = values[idx >= 0]
    table = table[:, 0] if not data.paired else table
    _atomic_save(cache_path, table)
    return table


def gather(x) -> np.ndarray:
    """A global jax.Array as one NumPy array on every process (its shards may live on other hosts)."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _atomic_save(path, array):
    tmp = f"{path}.tmp-{os.getpid()}.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def fit_udm(cfg, data, graphdef, ref_params, mesh, restored=None):
    """UDM: the prompt classifier (fit, or restored from a checkpoint) and the weight of every example."""
    embed = jax.jit(lambda p, ids, mask: udm.mean_pool(nnx.merge(graphdef, p).hidden_states(ids, mask), mask))
    emb = np.zeros((len(data), 0), np.float32)
    batch_size = cfg.run.eval_batch_size or cfg.run.batch_size
    for thumbs_up in (True, False):
        for batch in prompt_batches(data, cfg.data, thumbs_up, batch_size):
            e = np.asarray(embed(ref_params, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])))
            if emb.shape[1] == 0:
                emb = np.zeros((len(data), e.shape[1]), np.float32)
            keep = batch["example_index"] >= 0
            emb[batch["example_index"][keep]] = e[keep]
    labels = data.labels
    if restored is None:
        sample = udm.sample_per_class(labels, cfg.loss.prompt_sample_size, cfg.run.seed)
        up, down = sample[labels[sample]], sample[~labels[sample]]
        params = udm.fit_prompt_classifier(emb[up], emb[down])
        acc_up, acc_down = udm.classifier_accuracy(params, emb[up], emb[down])
        log.info("UDM classifier: training accuracy %.3f thumbs-up, %.3f thumbs-down", acc_up, acc_down)
    else:
        params, acc_up, acc_down = restored, math.nan, math.nan
    weights = np.asarray(udm.density_ratio_weights(params, emb, labels, min_density_ratio=cfg.loss.min_density_ratio,
                                                   max_density_ratio=cfg.loss.max_density_ratio))
    return params, weights, {"udm/accuracy_chosen": acc_up, "udm/accuracy_rejected": acc_down}


def attach_tables(batch: dict, ref_table, weights) -> dict:
    """Host-side lookups by example_index: precomputed reference log-probs and UDM weights."""
    idx = np.maximum(batch["example_index"], 0)
    if ref_table is not None:
        if ref_table.ndim == 2:
            batch["chosen_reference_logps"], batch["rejected_reference_logps"] = ref_table[idx, 0], ref_table[idx, 1]
        else:
            batch["reference_logps"] = ref_table[idx]
    if weights is not None:
        batch["weights"] = weights[idx]
    return batch


# ------------------------------------------------------------------------------------- evaluation


def evaluate(cfg, data, state, reference, eval_fn, mesh, ref_table=None) -> dict:
    """eval_ metrics over a whole labelled dataset, with the state's current delta."""
    rows, n_rows, loss_sum = {"rewards": [], "labels": [], "mask": []}, 0, 0.0
    batch_size = cfg.run.eval_batch_size or cfg.run.batch_size
    for batch in ordered_batches(data, cfg.data, batch_size, jax.process_index(), jax.process_count()):
        batch = attach_tables(batch, ref_table, None)
        batch.pop("example_index")
        out = eval_fn(state.params, reference, to_device_batch(batch, mesh, 1), state.reward_shift)
        for key in rows:
            rows[key].append(gather(out[key]).reshape(-1))
        loss_sum += float(gather(out["loss_sum"]))
        n_rows += int(gather(out["n_examples"]))
    delta = float(L.reward_shift_delta(state.reward_shift))
    return eval_summary(*(np.concatenate(rows[k]) for k in ("rewards", "labels", "mask")), loss_sum, n_rows, delta)


# ------------------------------------------------------------------------------------------- run


class _Preemption:
    """SIGTERM (TPU VM preemption notice, SLURM): finish the current step, save, exit."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self) -> bool:
        """Whether any process got the signal: all of them must save and stop at the same step."""
        if jax.process_count() == 1:
            return self.requested
        return bool(np.max(multihost_utils.process_allgather(np.int32(self.requested))))

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


class Reporter:
    """Turns step metrics into logged records: window sums, TRL names, tokens/s, progress bar."""

    def __init__(self, cfg, writer, total, start, epoch_length, show):
        self.cfg, self.writer, self.total, self.epoch_length = cfg, writer, total, epoch_length
        self.window, self.last, self.t0 = Window(), {}, time.perf_counter()
        self.bar = None
        if show:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                            disable=None)  # None: no bar when stderr is not a terminal (CI logs)

    def add(self, step: int, metrics) -> None:
        metrics = jax.device_get(metrics)
        if int(metrics["skipped"]):
            log.warning("step %d: non-finite loss or gradients, update skipped", step)
        if int(metrics.pop("nonfinite_in_row")) >= self.cfg.run.max_nonfinite_steps:
            raise TrainError(f"{self.cfg.run.max_nonfinite_steps} non-finite steps in a row at step {step}: "
                             "stopping (the last checkpoint is kept); lower learning_rate or check the data")
        self.window.add(metrics)
        if self.bar is not None:
            rate = self.window.sums.get("tokens", 0.0) / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", delta=f"{float(metrics['delta']):.4f}",
                                 tok_s=f"{rate:.0f}")
        if step % self.cfg.run.logging_steps == 0 or step == self.total:
            self.flush(step)

    def flush(self, step: int) -> None:
        if not self.window.steps:
            return
        record = self.window.summary()
        elapsed = time.perf_counter() - self.t0
        record["tokens_per_second"] = record.pop("tokens") / max(elapsed, 1e-9)
        record["epoch"] = step * self.cfg.run.batch_size / max(self.epoch_length, 1)
        self.writer.write(step, record)
        self.last, self.window, self.t0 = record, Window(), time.perf_counter()

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _state_shardings(state: TrainState, param_shardings, mesh, optimizer):
    replicated = NamedSharding(mesh, PartitionSpec())
    opt = optax.tree_map_params(optimizer, lambda _, s: s, state.opt_state, param_shardings,
                                transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=param_shardings, opt_state=opt,
                      reward_shift=jax.tree.map(lambda _: replicated, state.reward_shift), rng=replicated,
                      nonfinite_in_row=replicated, skipped_steps=replicated)


def _truncate_metrics(output_dir: str, step: int, finished: bool) -> None:
    """A resumed run replays the steps after its checkpoint: drop their old records (and, when the
    run had finished, its final evaluation, which the resumed run writes again)."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return

    def keep(record):
        return record.get("step", 0) < step or (record.get("step", 0) == step and not
                                                 (finished and "eval_loss" in record))

    with open(path, encoding="utf-8") as f:
        kept = [line for line in f if line.strip() and keep(json.loads(line))]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def _load_models(cfg, mesh):
    dtype = compute_dtype(cfg.model.dtype)
    overrides = {"remat": cfg.model.remat, "attention_impl": cfg.model.attention_impl}
    policy = load_hf(cfg.model.model, dtype=dtype, param_dtype=jnp.float32, mesh=mesh, rules=LOGICAL_RULES,
                     **overrides)
    graphdef, param_state = nnx.split(policy)
    param_shardings = nnx.to_pure_dict(model_shardings(param_state, mesh))
    ref_path = cfg.model.ref_model or cfg.model.model
    reference = load_hf(ref_path, dtype=dtype, param_dtype=jnp.dtype(cfg.model.ref_dtype), mesh=mesh,
                        rules=LOGICAL_RULES, **overrides)
    ref_graphdef, ref_state = nnx.split(reference)
    return (graphdef, nnx.to_pure_dict(param_state), param_shardings, ref_graphdef, nnx.to_pure_dict(ref_state),
            reference.config.hidden_size, ref_path)


def _load_data(cfg: TrainConfig, tokenizer):
    train_data = load_dataset(cfg.data.train_data, tokenizer, cfg.data)
    eval_data = (load_dataset(cfg.data.eval_data, tokenizer, cfg.data, split=cfg.data.eval_split,
                              require_both_classes=False) if cfg.data.eval_data else None)
    paired_loss = cfg.loss.loss_type in PAIRED_LOSSES
    if paired_loss != train_data.paired:
        raise ConfigError(f"loss_type: {cfg.loss.loss_type} needs {'paired' if paired_loss else 'unpaired'} data "
                          f"(prompt/chosen/rejected), but train_data is {'paired' if train_data.paired else 'unpaired'}")
    return train_data, eval_data


def _check_layout(cfg: TrainConfig, mesh) -> None:
    accumulation = cfg.run.gradient_accumulation_steps
    data_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.run.batch_size % (accumulation * data_devices):
        raise ConfigError(f"batch_size: {cfg.run.batch_size} is not divisible by gradient_accumulation_steps "
                          f"({accumulation}) x data-parallel devices ({data_devices})")
    eval_batch = cfg.run.eval_batch_size or cfg.run.batch_size
    if eval_batch % data_devices:
        raise ConfigError(f"eval_batch_size: {eval_batch} is not divisible by the {data_devices} data-parallel devices")
    if cfg.run.precompute_ref_log_probs and cfg.loss.loss_type == "kto":
        raise ConfigError("precompute_ref_log_probs: not supported with loss_type=kto (its KL pairs change "
                          "with every batch)")


class Session:
    """One training run: what it loaded, its state, and the jitted step. The pieces change together
    (a resume replaces the state, precomputation frees the reference), so they live together."""

    def __init__(self, cfg: TrainConfig, output_dir: str):
        self.cfg, self.output_dir = cfg, output_dir
        self.main_process = jax.process_index() == 0
        self.mesh = build_mesh(mesh_shape(cfg))
        _check_layout(cfg, self.mesh)
        self.tokenizer = load_tokenizer(cfg.model.model)
        self.train_data, self.eval_data = _load_data(cfg, self.tokenizer)
        self.iterator = BatchIterator(self.train_data, cfg.data, seed=cfg.run.seed,
                                      global_batch_size=cfg.run.batch_size, process_index=jax.process_index(),
                                      process_count=jax.process_count())
        self.steps = total_steps(cfg, self.iterator.steps_per_epoch)
        (self.graphdef, params, param_shardings, self.ref_graphdef, self.reference, self.hidden,
         self.ref_path) = _load_models(cfg, self.mesh)
        self.fingerprint = ckpt_lib.params_fingerprint(self.ref_path)
        optimizer, schedule = make_optimizer(cfg.optim, self.steps)
        shift = L.reward_shift_init(cfg.loss.reward_shift, cfg.loss.reward_shift_decay)
        # Built under jit straight onto its shardings: on several hosts no process holds all of it.
        make_state = lambda p: init_state(p, optimizer, shift, cfg.run.seed)  # noqa: E731
        self.shardings = _state_shardings(jax.eval_shape(make_state, params), param_shardings, self.mesh,
                                          optimizer)
        self.state = jax.jit(make_state, out_shardings=self.shardings)(params)
        step_cfg = StepConfig(loss_type=cfg.loss.loss_type, beta=cfg.loss.beta,
                              label_smoothing=cfg.loss.label_smoothing, desirable_weight=cfg.loss.desirable_weight,
                              undesirable_weight=cfg.loss.undesirable_weight)
        graphdefs = (self.graphdef, self.ref_graphdef)
        self.step_fn = jax.jit(functools.partial(train_step, graphdefs=graphdefs, cfg=step_cfg,
                                                 optimizer=optimizer, schedule=schedule),
                               out_shardings=(self.shardings, None), donate_argnums=0)
        self.eval_fn = jax.jit(lambda p, r, b, s: eval_step(p, r, {k: v[0] for k, v in b.items()}, s,
                                                            graphdefs=graphdefs, cfg=step_cfg))
        self.udm_params = self.weights = self.ref_table = self.eval_table = None
        self.udm_log = {}

    def resume(self, checkpointer) -> int:
        """Restore the newest complete checkpoint, if any (onto this run's mesh); returns its step."""
        start = checkpointer.latest_step()
        if start is not None:
            target = {"train": _abstract(self.state, self.shardings)}
            if self.cfg.loss.udm:
                target["udm"] = udm.abstract_params(self.hidden)
            restored, saved = checkpointer.restore(start, target)
            ckpt_lib.check_reference(saved, self.fingerprint)
            self.state, self.udm_params = restored["train"], restored.get("udm")
            self.iterator.restore(saved["data"])
            if self.main_process:
                _truncate_metrics(self.output_dir, start, finished=start == self.steps)
            log.info("resumed %s at step %d", self.output_dir, start)
        return start or 0

    def precompute(self) -> None:
        """UDM weights, and reference log-probs (then the reference weights are freed)."""
        cfg = self.cfg
        if cfg.loss.udm:
            self.udm_params, self.weights, self.udm_log = fit_udm(cfg, self.train_data, self.ref_graphdef,
                                                                  self.reference, self.mesh, self.udm_params)
        if cfg.run.precompute_ref_log_probs:
            os.makedirs(self.output_dir, exist_ok=True)
            ref_id = self.fingerprint.split(":")[-1][:16]
            table = lambda data: reference_table(  # noqa: E731
                cfg, data, self.ref_graphdef, self.reference, self.mesh,
                os.path.join(self.output_dir, f"reference_logps-{ref_id}-{data.fingerprint()[:16]}.npy"))
            self.ref_table = table(self.train_data)
            self.eval_table = table(self.eval_data) if self.eval_data is not None else None
            self.reference = None  # the step reads reference log-probs from the batch

    def save(self, checkpointer, step: int) -> None:
        item = {"train": self.state} if self.udm_params is None else {"train": self.state, "udm": self.udm_params}
        checkpointer.save(step, item, {"data": self.iterator.state(), "config": self.flat_config(),
                                       ckpt_lib.REFERENCE_PATH: os.path.abspath(self.ref_path),
                                       ckpt_lib.REFERENCE_FINGERPRINT: self.fingerprint})

    def flat_config(self) -> dict:
        return json.loads(json.dumps(self.cfg.flat(), default=str))

    def evaluate(self, writer, step: int) -> dict:
        if self.eval_data is None:
            return {}
        record = evaluate(self.cfg, self.eval_data, self.state, self.reference, self.eval_fn, self.mesh,
                          self.eval_table)
        writer.write(step, record)
        return record

    def train(self, checkpointer, writer, start: int) -> dict:
        """Steps start+1 .. steps; returns the last logged record. SIGTERM: save, then exit."""
        cfg, steps = self.cfg, self.steps
        reporter = Reporter(cfg, writer, steps, start, self.iterator.epoch_length, show=self.main_process)
        preemption, pending = _Preemption(), None
        try:
            for step in range(start + 1, steps + 1):
                local = attach_tables(next(self.iterator), self.ref_table, self.weights)
                local.pop("example_index")
                batch = to_device_batch(local, self.mesh, cfg.run.gradient_accumulation_steps)
                self.state, metrics = self.step_fn(self.state, self.reference, batch)
                if pending is not None:  # read step N-1's metrics while step N runs
                    reporter.add(*pending)
                pending = (step, metrics)
                stop = preemption.agreed()  # read once: the save and the exit must agree
                if cfg.run.eval_steps and step % cfg.run.eval_steps == 0 and step != steps:
                    self.evaluate(writer, step)  # before the save: a resume replays it if it is lost
                if step % cfg.run.save_steps == 0 or step == steps or stop:
                    reporter.add(*pending)
                    reporter.flush(step)  # windows end at checkpoints, so a resumed run logs the same
                    pending = None
                    self.save(checkpointer, step)
                if stop:
                    log.warning("SIGTERM: saved step %d, exiting with code %d", step, cfg.run.sigterm_exit_code)
                    writer.close()
                    raise SystemExit(cfg.run.sigterm_exit_code)
        finally:  # also on errors and SIGTERM: the save in flight completes, never half-written
            checkpointer.close()
            preemption.restore()
            reporter.close()
        return reporter.last


def run(cfg: TrainConfig, *, demo: bool = False) -> dict:
    """Train as configured; returns the last logged and evaluated metrics. `demo`: also score the
    oracle task before and after and print the table (the embedded default run)."""
    if not cfg.model.model or not cfg.data.train_data:
        raise ConfigError("model and train_data: give both (an HF folder and feedback data), or neither "
                          "for the embedded demo")
    output_dir = cfg.run.output_dir or os.path.join("outputs", run_name(cfg))
    session = Session(cfg, output_dir)
    # Under the mesh context the models pin activations to the batch axes, so with FSDP XLA gathers
    # weights rather than the whole batch's activations.
    with jax.set_mesh(session.mesh):
        return _run(session, cfg, output_dir, demo)


def _run(session: Session, cfg: TrainConfig, output_dir: str, demo: bool) -> dict:
    if cfg.run.dry_run:
        return dry_run(session)
    checkpointer = ckpt_lib.Checkpointer(output_dir, save_total_limit=cfg.run.save_total_limit)
    start = session.resume(checkpointer)
    session.precompute()
    main_process = session.main_process
    writer = MetricsWriter(output_dir, cfg.run.tensorboard, enabled=main_process)
    if main_process:
        with open(os.path.join(output_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(session.flat_config(), f, indent=2, sort_keys=True)
    if session.udm_log and start == 0:
        writer.write(0, session.udm_log)
    before_path = os.path.join(output_dir, "demo_before.json")
    if demo and start == 0:  # every process: evaluation and sampling run over the whole mesh
        before = {**session.evaluate(writer, 0), **score_oracle(session)}
        if main_process:
            with open(before_path, "w", encoding="utf-8") as f:
                json.dump(before, f)

    last = session.train(checkpointer, writer, start)
    final = session.evaluate(writer, session.steps)
    if main_process:
        write_final_state(output_dir, session.state, cfg, session.ref_path, session.fingerprint, session.steps)
    if cfg.run.export_hf:
        export(session.graphdef, session.state.params, os.path.join(output_dir, "hf"), session.tokenizer)
    result = {**last, **final, **session.udm_log, "output_dir": output_dir}
    if demo:
        after = {**final, **score_oracle(session)}
        if main_process:
            with open(before_path, encoding="utf-8") as f:
                before = json.load(f)
            oracle_demo.print_table(before, after, output_dir)
            result.update({f"before_{k}": v for k, v in before.items()})
        result.update(after)
    writer.close()
    return result


def score_oracle(session: Session) -> dict:
    return oracle_demo.success(session.graphdef, session.state.params, session.tokenizer,
                               seed=session.cfg.run.seed, samples=session.cfg.run.demo_samples)


def write_final_state(output_dir, state, cfg, ref_path, fingerprint, step):
    """What `python -m bco_jax.evaluate` needs beside hf/: delta, beta and the reference."""
    shift = jax.device_get(state.reward_shift)
    record = {"step": int(step), "delta": float(L.reward_shift_delta(shift)), "beta": cfg.loss.beta,
              "loss_type": cfg.loss.loss_type, "reference_path": os.path.abspath(ref_path),
              "reference_fingerprint": fingerprint,
              "reward_shift": {"mode": shift.mode, "decay": shift.decay,
                               "class_means": np.asarray(shift.class_means).tolist(),
                               "class_counts": np.asarray(shift.class_counts).tolist(),
                               "mean": float(shift.mean), "count": float(shift.count)}}
    path = os.path.join(output_dir, "bco_state.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    os.replace(path + ".tmp", path)


def export(graphdef, params, path, tokenizer):
    """The policy as an HF folder (safetensors + config + tokenizer), loadable by transformers.
    Every process calls it (they gather the sharded parameters together); process 0 writes."""
    save_hf(nnx.merge(graphdef, params), path, tokenizer=tokenizer)
    log.info("exported the policy to %s", path)


def dry_run(session: Session) -> dict:
    """Compile the step for the first batch's shape and report XLA's per-device memory analysis."""
    local = next(session.iterator)
    local.pop("example_index")
    reference = session.reference
    if session.cfg.run.precompute_ref_log_probs:
        reference = None
        for key in [k for k in local if k.endswith("input_ids")]:
            local[key.replace("input_ids", "reference_logps")] = np.zeros(len(local[key]), np.float32)
    batch = to_device_batch(local, session.mesh, session.cfg.run.gradient_accumulation_steps)
    mem = session.step_fn.lower(session.state, reference, batch).compile().memory_analysis()
    report = {k: int(getattr(mem, k, 0) or 0) for k in
              ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "generated_code_size_in_bytes")}
    report["peak_estimate_bytes"] = report["argument_size_in_bytes"] + report["temp_size_in_bytes"]
    shape = next(v.shape for k, v in batch.items() if k.endswith("input_ids"))
    print(f"dry run: mesh {dict(session.mesh.shape)}, batch [micro-batches, rows, tokens] {shape}")
    for key, value in report.items():
        print(f"  {key:32s} {value / 2**20:10.1f} MiB per device")
    return report


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = parse_args(argv)
        demo = not cfg.model.model and not cfg.data.train_data
        if demo:
            cfg = parse_args(argv, defaults=oracle_demo.defaults())
        run(cfg, demo=demo)
    except (ConfigError, DataError, TrainError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
