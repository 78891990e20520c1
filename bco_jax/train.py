"""`python -m bco_jax.train`: align a causal LM from thumbs-up / thumbs-down feedback.

The loop around the pure step (bco_jax/step.py) and the CLI. `bco_jax.build` loads the policy and the
frozen reference onto the mesh, the data and the jitted step; this module resumes, precomputes, steps,
logs, evaluates, checkpoints and exports the policy as an HF folder at the end. With no arguments it
runs the embedded demonstration: BCO on the shipped oracle-task SFT model and feedback, with a
before/after table.

Exit codes (docs/reliability.md): 0 finished; 128 + the signal after saving on SIGTERM (143) or
Ctrl-C (130), unless `sigterm_exit_code`; 2 a user error (config, data, model, checkpoint: one line
`error: ...`); 1 any other failure (a full or read-only disk: one line; a bug: its traceback).
`--debug true` shows the traceback of every error.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import traceback
import warnings

import jax
import numpy as np
from jax.experimental import multihost_utils

from bco_jax import checkpoint as ckpt_lib
from bco_jax.build import (
    Run,
    Tables,
    build,
    export_policy,
    policy_params,
    precompute,
    restore,
)
from bco_jax.config import TrainConfig, parse_args
from bco_jax.errors import USER_ERRORS, ConfigError, TrainError, fault_point, log
from bco_jax.files import atomic_write_json
from bco_jax.load import save_model_copies
from bco_jax.losses import GRPO_LOSSES
from bco_jax.metrics import MetricsWriter, Reporter
from bco_jax.oracle import demo as oracle_demo
from bco_jax.precompute import attach_tables
from bco_jax.resume import IDENTITY, RunIdentity
from bco_jax.run_dir import RunDir, check_output_dir, claim_output_dir
from bco_jax.scoring import eval_pass
from bco_jax.sharding import initialize_distributed, put_batch
from bco_jax.step import TrainState, memory_report


class Preemption:
    """SIGTERM (a TPU VM preemption notice, SLURM's) or Ctrl-C: finish the current step, save, exit.

    One process: a Python handler notes the signal. Several: JAX's preemption service owns SIGTERM
    and names one step at which every process stops (`reached_preemption_sync_point`, called every
    step, costs no host sync); Ctrl-C is turned into a SIGTERM to take the same path. A second
    Ctrl-C aborts at once.
    """

    def __init__(self):
        self.requested = self.interrupted = False
        self.signum = signal.SIGTERM  # which signal asked to stop (the exit code is 128 + it)
        self.multi = jax.process_count() > 1
        self._previous = {signal.SIGINT: signal.signal(signal.SIGINT, self._interrupt)}
        if not self.multi:
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._terminate)

    def _terminate(self, signum, frame):
        self.requested = True
        self.signum = signum

    def _interrupt(self, signum, frame):
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        self.signum = signal.SIGINT
        log.warning("Ctrl-C: saving after this step and exiting (Ctrl-C again to abort at once)")
        if self.multi:
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            self.requested = True

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step`; the same answer on every process."""
        if self.multi:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self.requested

    def restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def evaluate(run: Run, state: TrainState, tables: Tables, writer=None, step: int = 0) -> dict:
    """eval_ metrics on the run's eval_data (empty without one), written at `step` by `writer`."""
    if run.eval_data is None:
        return {}
    record = eval_pass(run.program.eval, state.params, run.frozen, state.reward_shift, run.eval_data, run.cfg.data,
                       run.cfg.run.eval_batch, run.mesh, tables.eval_ref_table)
    if writer is not None:
        writer.write(step, record)
    return record


def save(run: Run, checkpointer, step: int, state: TrainState, tables: Tables) -> None:
    check_finite(state, step, "saved")
    item = {"train": state} if tables.udm is None else {"train": state, "udm": tables.udm}
    checkpointer.save(step, item, {"data": run.iterator.state(), "config": flat_config(run.cfg)})
    fault_point("checkpoint")  # the write goes on in the background


def flat_config(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(cfg.flat(), default=str))


def check_finite(state: TrainState, step: int, what: str) -> None:
    """Refuse to save or export a policy holding a NaN or inf (one reduction, one host sync)."""
    bad = ckpt_lib.nonfinite_arrays(state.params)
    if bad:
        raise TrainError(f"step {step}: the policy has non-finite weights in {', '.join(bad[:3])}: not {what} "
                         "(the last checkpoint is kept); lower learning_rate or check the data")


def check_result(run: Run, state: TrainState, final: dict) -> None:
    """A run whose policy is garbage must not end like a finished one: non-finite weights, a last
    step skipped (its loss or gradients were not finite at the final weights), or a non-finite
    final evaluation loss."""
    check_finite(state, run.steps, "exported")
    skipped = int(jax.device_get(state.nonfinite_in_row))
    if skipped:
        raise TrainError(f"the last {skipped} step(s) were skipped (non-finite loss or gradients): the final "
                         "policy is not exported (the checkpoints are kept); lower learning_rate or check the data")
    if "eval_loss" in final and not np.isfinite(final["eval_loss"]):
        raise TrainError("the final evaluation loss is not finite: the policy is not exported (the checkpoints "
                         "are kept); lower learning_rate or check the data")


def train_loop(run: Run, state: TrainState, tables: Tables, checkpointer, writer, start: int = 0):
    """Steps start+1 .. run.steps; returns (final state, last logged record). SIGTERM: save, exit.
    Metrics of step N are read while step N+1 runs; windows end at checkpoints, so a resumed run logs
    exactly what an uninterrupted one does."""
    opts = run.cfg.run
    reporter = Reporter(writer, total=run.steps, start=start, batch_size=opts.batch_size,
                        epoch_length=run.iterator.epoch_length, logging_steps=opts.logging_steps,
                        max_nonfinite_steps=opts.max_nonfinite_steps, show=run.main_process)
    preemption, pending = Preemption(), None
    weights = None if tables.udm is None else tables.udm["weights"]
    try:
        for step in range(start + 1, run.steps + 1):
            local = attach_tables(next(run.iterator), tables.ref_table, weights)
            batch = put_batch(local, run.mesh, opts.gradient_accumulation_steps)
            state, metrics = run.program.step(state, run.frozen, batch)
            fault_point("step")
            if pending is not None:  # read step N-1's metrics while step N runs
                reporter.add(*pending)
            pending = (step, metrics)
            stop = preemption.reached(step)  # read once: the save and the exit must agree
            if opts.eval_steps and step % opts.eval_steps == 0 and step != run.steps:
                evaluate(run, state, tables, writer, step)  # before the save: a resume replays it if lost
            if step % opts.save_steps == 0 or step == run.steps or stop:
                reporter.add(*pending)
                reporter.flush(step)
                pending = None
                save(run, checkpointer, step, state, tables)
            if stop:
                code = 128 + int(preemption.signum) if opts.sigterm_exit_code is None else opts.sigterm_exit_code
                log.warning("stopped by a signal: saved step %d, exiting with code %d", step, code)
                writer.close()
                raise SystemExit(code)
    finally:  # also on errors and SIGTERM: the save in flight completes, never half-written
        checkpointer.close()
        preemption.restore()
        reporter.close()
    return state, reporter.last


def fit(cfg: TrainConfig, *, demo: bool = False) -> dict:
    """Train as configured; returns the last logged and evaluated metrics. `demo`: also score the
    oracle task before and after and print the table (the embedded default run)."""
    if not cfg.model.model or not cfg.data.train_data:
        raise ConfigError("model and train_data: give both (an HF folder and feedback data), or neither "
                          "for the embedded demo")
    if cfg.loss.loss_type in GRPO_LOSSES:
        raise ConfigError(f"loss_type: {cfg.loss.loss_type} (GRPO) trains on fresh answers with their judge's "
                          "scores: run python -m bco_jax.online")
    output_dir = RunDir.for_config(cfg).root
    check_output_dir(cfg, output_dir)  # before anything is written
    run = build(cfg, output_dir=output_dir)  # every input read and checked; nothing written yet
    if cfg.run.dry_run:
        with jax.set_mesh(run.mesh):
            return dry_run(run)
    if run.main_process:
        claim_output_dir(output_dir)  # the first write of the run
    identity = run.identity()
    checkpointer = ckpt_lib.Checkpointer(run.output_dir, save_total_limit=cfg.run.save_total_limit,
                                         constant_extras={IDENTITY: identity.record()})
    try:
        state, udm_state, start = restore(run, checkpointer, identity)  # outside the mesh context, as loading is
    except BaseException:
        checkpointer.close()
        raise
    # Under the mesh context the models pin activations to the batch axes, so with FSDP XLA gathers
    # weights rather than the whole batch's activations.
    with jax.set_mesh(run.mesh):
        save_model_copies(run)
        tables = precompute(run, udm_state)
        if tables.ref_table is not None:  # log-probs come with the batch: the reference's weights are freed
            run = dataclasses.replace(run, reference=None)  # (`run` was their last holder; a LoRA base stays)
        return _fit_built(run, checkpointer, state, tables, start, demo, identity)


def _fit_built(run: Run, checkpointer, state, tables: Tables, start: int, demo: bool, identity: RunIdentity) -> dict:
    cfg, output_dir, main_process = run.cfg, run.output_dir, run.main_process
    writer = MetricsWriter(output_dir, cfg.run.tensorboard, enabled=main_process)
    if main_process:
        ckpt_lib.record_config(output_dir, flat_config(cfg), start, identity.record())
    if tables.udm_log and start == 0:
        writer.write(0, tables.udm_log)
    if demo and start == 0:
        _demo_before(run, state, tables, writer)

    state, last = train_loop(run, state, tables, checkpointer, writer, start)
    final = evaluate(run, state, tables, writer, run.steps)
    check_result(run, state, final)
    if main_process:
        ckpt_lib.write_final_state(output_dir, step=run.steps, reward_shift=state.reward_shift, beta=cfg.loss.beta,
                                   loss_type=cfg.loss.loss_type, reference_path=run.ref_path,
                                   reference_fingerprint=run.ref_fingerprint)
    if cfg.run.export_hf:
        export(run, state)
    result = {**last, **final, **(tables.udm_log or {}), "output_dir": output_dir}
    if demo:
        result.update(_demo_after(run, state, final))
    writer.close()
    return result


def export(run: Run, state: TrainState) -> None:
    """The final policy to output_dir/hf (and adapter/). Every process calls it: they gather the sharded
    parameters together, process 0 writes. A failure is one OSError line; hf/ stays as it was."""
    fault_point("export")
    try:
        export_policy(run, state)
    except OSError as err:  # a full disk: hf/ stays as it was (the export is one folder rename)
        raise OSError(f"the export to {run.dir.hf} failed ({err.strerror or err}); nothing was exported, "
                      "the checkpoints are kept: rerun the command to export") from err
    log.info("exported the policy to %s", run.dir.hf)


# ------------------------------------------------------------------------------- the embedded demo


def _demo_before(run: Run, state: TrainState, tables: Tables, writer) -> None:
    """The demo's scores before training, kept in output_dir so that a resumed demo still has them.
    Every process scores: evaluation and sampling run over the whole mesh."""
    before = {**evaluate(run, state, tables, writer, 0), **score_oracle(run, state)}
    if run.main_process:
        atomic_write_json(run.dir.demo_before, before)


def _demo_after(run: Run, state: TrainState, final: dict) -> dict:
    """The demo's scores after training, with those from before (`before_*`); prints the table."""
    after = {**final, **score_oracle(run, state)}
    out = {}
    if run.main_process:
        with open(run.dir.demo_before, encoding="utf-8") as f:
            before = json.load(f)
        oracle_demo.print_table(before, after, run.output_dir)
        out.update({f"before_{k}": v for k, v in before.items()})
    return {**out, **after}


def score_oracle(run: Run, state: TrainState) -> dict:
    return oracle_demo.success(run.graphdef, policy_params(run, state), run.tokenizer, seed=run.cfg.run.seed,
                               samples=run.cfg.run.demo_samples, mesh=run.mesh)


def dry_run(run: Run) -> dict:
    """Compile the step for the first batch's shape and report XLA's per-device memory analysis."""
    local = attach_tables(next(run.iterator))
    reference = run.frozen
    if run.cfg.run.precompute_ref_log_probs:  # no reference weights (with LoRA, the base stays)
        reference = dataclasses.replace(run, reference=None).frozen
        local = local.replace(reference_logps=np.zeros((local.num_examples, len(local.scored())), np.float32))
    batch = put_batch(local, run.mesh, run.cfg.run.gradient_accumulation_steps)
    report = memory_report(run.program.step.lower(run.program.abstract_state, reference, batch).compile())
    shape = batch.scored()[0].input_ids.shape
    print(f"dry run: mesh {dict(run.mesh.shape)}, batch [micro-batches, rows, tokens] {shape}")
    for key, value in report.items():
        print(f"  {key:32s} {value / 2**20:10.1f} MiB per device")
    return report


def _wants_debug(argv) -> bool:
    """`--debug true` (or `--debug=1`, ...), read before the config parses: its errors too get a traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, token in enumerate(argv):
        value = token.split("=", 1)[1] if token.startswith("--debug=") else (
            argv[i + 1] if token == "--debug" and i + 1 < len(argv) else None)
        if value is not None and value.lower() in ("true", "1", "yes"):
            return True
    return False


def _fail(err: BaseException, code: int, debug: bool, message: str | None = None) -> int:
    """One line `error: ...` on stderr (and the traceback with --debug); returns the exit code."""
    if debug:
        traceback.print_exception(err)
    text = message or " ".join(str(err).split()) or type(err).__name__
    print(f"error: {text}", file=sys.stderr)
    return code


def _unraisable_to_debug_log(unraisable) -> None:
    """Exceptions Python cannot raise anywhere (Orbax's background tasks finishing after their event
    loop closed, coroutines collected at exit) go to the debug log, not onto the user's terminal:
    the run's outcome is already said in one line. `--debug true` keeps Python's own report."""
    log.debug("ignored in %r: %s", unraisable.object, unraisable.exc_value)


def main(argv=None) -> int:
    """The CLI; returns the exit code (see the module's doc)."""
    def start(argv):
        cfg = parse_args(argv)
        demo = not cfg.model.model and not cfg.data.train_data
        if demo:
            cfg = parse_args(argv, defaults=oracle_demo.defaults())
        return cfg, lambda c: fit(c, demo=demo)

    return run_cli(argv, start)


def run_cli(argv, start) -> int:
    """What every training CLI (train, online) does around its work: logging, one-line errors and
    their exit codes, joining the job. `start(argv)` -> (config, run: config -> anything)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    debug = _wants_debug(argv)
    for noisy in ("absl", "orbax", "jax"):  # "jax": the root of JAX's module loggers
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not debug:  # Orbax logs a failed background write with its traceback; the error says it in one line
        logging.getLogger("absl").setLevel(logging.CRITICAL)
        sys.unraisablehook = _unraisable_to_debug_log
        # Orbax's coroutines abandoned by a failed background write, collected at exit
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
    # A checkpoint that does not read leaves Orbax's background read task failed; asyncio would print
    # its traceback ("Task exception was never retrieved") after the fallback has already said why.
    logging.getLogger("asyncio").setLevel(logging.DEBUG if debug else logging.CRITICAL)
    try:
        cfg, run = start(argv)
        initialize_distributed(cfg.launch)
        run(cfg)
    except SystemExit as stop:  # stopped by a signal after saving
        return stop.code if isinstance(stop.code, int) else 1
    except KeyboardInterrupt as err:
        return _fail(err, 128 + signal.SIGINT, debug, "interrupted (Ctrl-C): stopped without saving")
    except USER_ERRORS as err:
        return _fail(err, 2, debug)
    except OSError as err:  # a full or read-only disk, a vanished mount: not a bug in the run
        return _fail(err, 1, debug)
    return 0


if __name__ == "__main__":
    sys.exit(main())
