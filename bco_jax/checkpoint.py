"""Training checkpoints (Orbax).

One checkpoint per saved step under `output_dir/checkpoints/<step>/`, holding two items:
  - `state`:  any pytree of arrays (the TrainState; put the UDM classifier params in it too, e.g.
              `{"train": train_state, "udm": udm_params}`: they are arrays and want the same handling).
  - `extras`: a JSON-able dict (data-iterator state, resolved config, the run's identity: `bco_jax.resume`).

Atomicity: Orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it to `<step>` only once every item
is written (and, on object stores, adds a commit marker). A run killed mid-save leaves only the tmp
folder, which `latest_step` ignores, so a resume never sees half a checkpoint.

`classify` is the one place that decides whether a `<step>` folder is a complete checkpoint: Orbax's
`_CHECKPOINT_METADATA`, the state's `_METADATA` and the extras all present. A torn one (a stray empty
folder, a missing `_METADATA`) is set aside as `<step>.torn` when a Checkpointer opens the folder;
one whose arrays do not read (truncated, corrupt) is set aside as `<step>.corrupt` by `restore_latest`,
which then falls back to the previous one. Nothing is deleted.

Typed PRNG keys (`jax.random.key`) are stored as their raw `key_data` and re-wrapped on restore with the
implementation named by the abstract state's dtype, so the abstract state stays the real one.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from bco_jax import losses as L
from bco_jax.errors import ConfigError, TrainError, clip, first_line, log
from bco_jax.files import atomic_write_json, atomic_write_text
from bco_jax.run_dir import RunDir

# What a finalized checkpoint holds, besides the arrays (see `classify`).
COMPLETE_MARKERS = ("_CHECKPOINT_METADATA", "state/_METADATA", "extras/metadata")


def classify(directory) -> tuple[list[int], list[int]]:
    """(complete steps, torn steps), ascending, of the `<step>` entries of a checkpoints folder: the
    one place that decides. Complete: every file of COMPLETE_MARKERS is there; torn: anything else
    named by a step (an empty folder, a missing `_METADATA`, a file)."""
    folder = Path(directory)
    complete, torn = [], []
    for path in sorted(folder.iterdir() if folder.is_dir() else [], key=lambda p: p.name):
        if path.name.isdigit():
            ok = path.is_dir() and all((path / marker).is_file() for marker in COMPLETE_MARKERS)
            (complete if ok else torn).append(int(path.name))
    return sorted(complete), sorted(torn)


def set_aside(path, why: str) -> Path:
    """Rename checkpoint folder `path` to `<step>.<why>` (a name Orbax does not read as a step)."""
    path = Path(path)
    target, n = path.with_name(f"{path.name}.{why}"), 1
    while target.exists():
        target, n = path.with_name(f"{path.name}.{why}{n}"), n + 1
    os.replace(path, target)
    return target


def _path_name(path) -> str:
    """`train/params/embed` from a jax key path (dict keys, attributes and indices alike)."""
    parts = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path]
    return "/".join(str(p) for p in parts)


def shape_differences(state_dir, abstract_state) -> list[str]:
    """`key: checkpoint shape -> expected shape` for every array of `abstract_state` that the
    checkpoint's `state` item (folder `state_dir`) stores with another shape or lacks."""
    handler = ocp.PyTreeCheckpointHandler()
    try:
        tree = handler.metadata(epath.Path(Path(state_dir).absolute()))
    finally:
        handler.close()
    saved = {_path_name(p): tuple(x.shape) for p, x in
             jax.tree_util.tree_flatten_with_path(getattr(tree, "tree", tree))[0] if hasattr(x, "shape")}
    out = []
    for path, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
        if not hasattr(x, "shape"):
            continue
        name, shape = _path_name(path), tuple(_abstract_key_data(x).shape if _is_key(x) else x.shape)
        if name not in saved:
            out.append(f"{name}: missing -> {shape}")
        elif saved[name] != shape:
            out.append(f"{name}: {saved[name]} -> {shape}")
    return out


def nonfinite_arrays(tree) -> list[str]:
    """Key paths of the floating-point arrays of `tree` that hold a NaN or an inf. One jitted
    reduction per array and one host transfer; every process gets the same answer."""
    items = [(path, x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
             if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]
    if not items:
        return []
    flags = jax.jit(lambda xs: jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs]))([x for _, x in items])
    if not flags.is_fully_addressable:
        flags = multihost_utils.process_allgather(flags, tiled=True)
    return [_path_name(path) for (path, _), ok in zip(items, np.asarray(flags)) if not ok]


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _key_impl(abstract_key):
    # The PRNG implementation is only reachable from a (traced) key array, not from a ShapeDtypeStruct.
    found = []
    jax.eval_shape(lambda k: found.append(jax.random.key_impl(k)) or k, abstract_key)
    return found[0]


def _abstract_key_data(leaf):
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
    # key_data adds trailing dims; a NamedSharding's spec leaves them unsharded, which is what we want.
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(leaf, "sharding", None))


def agreed(ok: bool) -> bool:
    """Whether `ok` holds on every process of the job (one small all-gather; `ok` alone on one process):
    a checkpoint that reads on some processes only must make all of them fall back, not some."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


class CheckpointWriteError(OSError):
    """A checkpoint's background write failed; the earlier checkpoints are intact."""


class Checkpointer:
    """Saves and restores training checkpoints in `output_dir/checkpoints`.

        ckpt = Checkpointer(output_dir, save_total_limit=3)
        ckpt.save(step, {"train": state, "udm": udm_params}, {"data": it.state(), "config": cfg, ...})
        step = ckpt.latest_step()                      # None when there is nothing to resume
        state, extras = ckpt.restore(step, abstract)   # abstract: ShapeDtypeStructs with .sharding
        ckpt.close()                                   # waits for the async save in flight

    Saves are asynchronous: `save` returns once the arrays are copied off the devices, the write goes on in
    the background; the next `save`, `wait` or `close` waits for it. `save_total_limit=None` keeps all;
    `constant_extras` go into every save's extras (e.g. what the run's steps were computed from).
    Usable as a context manager (closes on exit). Call every method on every process (multi-host).
    """

    def __init__(self, output_dir, *, save_total_limit: int | None = None, async_save: bool = True,
                 constant_extras: dict | None = None):
        if save_total_limit is not None and save_total_limit < 1:
            raise ConfigError(f"save_total_limit must be >= 1 or None, got {save_total_limit}")
        self.directory = Path(RunDir(str(output_dir)).checkpoints).absolute()
        self.constant_extras = dict(constant_extras or {})
        self._set_aside_torn()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=save_total_limit, enable_async_checkpointing=async_save, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "extras"))

    def save(self, step: int, state, extras: dict | None = None) -> bool:
        """Start saving `state` (pytree of arrays) and `extras` (JSON-able dict) as checkpoint `step`.

        Returns whether a save was started (False when `step` is already saved). The arrays are copied
        before it returns, so the caller may donate / overwrite `state` right after.
        """
        if step in self._manager.all_steps():
            return False
        extras = {**self.constant_extras, **(extras or {})}
        json.dumps(extras)  # fail here, with the caller's stack, not later in Orbax's writer thread
        state = jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state)
        with self._writing():  # Orbax first waits for the previous save, which may have failed
            return self._manager.save(
                int(step), force=True,  # the trainer decides when to save; no Orbax interval policy
                args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                        extras=ocp.args.JsonSave(extras)))

    @contextlib.contextmanager
    def _writing(self):
        """A background write that failed (a full disk, a vanished mount) surfaces as Orbax's own
        exception type: made an OSError of one line, the checkpoints before it untouched."""
        try:
            yield
        except Exception as err:
            first = clip(first_line(err), 300, keep_end=True)
            raise CheckpointWriteError(f"a checkpoint in {self.directory} could not be written ({first}); "
                                       "the previous checkpoints are kept") from err

    def _set_aside_torn(self) -> None:
        """Torn step folders (see `classify`) are renamed `<step>.torn` before Orbax lists the steps."""
        if jax.process_index() == 0:
            for step in classify(self.directory)[1]:
                where = set_aside(self.directory / str(step), "torn")
                log.warning("checkpoint %s is incomplete (no %s): ignored, set aside as %s", step,
                            " / ".join(COMPLETE_MARKERS), where.name)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("bco_jax: torn checkpoints set aside")

    def restore_latest(self, abstract_state, check=None):
        """(step, state, extras) of the newest checkpoint that reads, or None when there is none.

        `check(step, extras)` may raise to refuse a checkpoint (other reference weights, config, ...);
        arrays stored with other shapes than `abstract_state`'s (another model) raise TrainError naming
        them. A checkpoint whose files do not read (truncated, corrupt) is set aside as
        `<step>.corrupt`, with a warning, and the previous one is tried; when none reads, TrainError
        names them and nothing is moved.
        """
        failed = []
        for step in reversed(self.all_steps()):
            error = None
            try:
                extras = self.extras(step)
                mismatch = shape_differences(self.directory / str(step) / "state", abstract_state)
            except Exception as err:
                error = err
            if not agreed(error is None):  # every process falls back together, or none does
                failed.append((step, error or TrainError("it does not read on another process")))
                continue
            if check is not None:
                check(step, extras)
            if mismatch:
                more = f" (and {len(mismatch) - 3} more)" if len(mismatch) > 3 else ""
                raise TrainError(f"checkpoint {step} in {self.directory} is of another model: "
                                 f"{'; '.join(mismatch[:3])}{more} (checkpoint -> now); use the model it was "
                                 "trained from, or another output_dir")
            state, error = None, None
            try:
                state, extras = self.restore(step, abstract_state)
            except Exception as err:
                error = err
            if not agreed(error is None):
                failed.append((step, error or TrainError("it does not read on another process")))
                continue
            self._set_aside_unreadable(failed)
            return step, state, extras
        if failed:
            steps = ", ".join(str(s) for s, _ in failed)
            raise TrainError(f"no checkpoint in {self.directory} reads: step {steps} ({_first_line(failed[0][1])}); "
                             "move them away to start over, or use another output_dir")
        return None

    def _set_aside_unreadable(self, failed) -> None:
        if not failed:
            return
        if jax.process_index() == 0:
            for step, err in failed:
                where = set_aside(self.directory / str(step), "corrupt")
                log.warning("checkpoint %d does not read (%s): set aside as %s, resuming from an earlier one",
                            step, _first_line(err), where.name)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("bco_jax: unreadable checkpoints set aside")
        self._manager.reload()

    def all_steps(self) -> list[int]:
        """Steps of the complete (finalized) checkpoints, ascending (after any save in flight ends)."""
        self.wait()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None. Waits for a save in flight to finish first;
        an unfinished checkpoint left by a killed run (a tmp folder) never counts."""
        self.wait()
        return self._manager.latest_step()

    def restore(self, step: int, abstract_state):
        """Load checkpoint `step` onto the shardings of `abstract_state`; returns (state, extras).

        `abstract_state` is the pytree the state was saved as, with `jax.ShapeDtypeStruct` leaves
        (e.g. `jax.eval_shape(init)` with `.sharding` set, or concrete arrays): each array lands on its
        leaf's sharding, so the mesh may differ from the one that saved it.
        """
        self.wait()
        if step not in self._manager.all_steps():
            raise FileNotFoundError(f"no complete checkpoint for step {step} in {self.directory} "
                                    f"(have {self.all_steps()})")
        stored = jax.tree.map(
            lambda x: _abstract_key_data(x) if _is_key(x) else _as_abstract(x), abstract_state)
        out = self._manager.restore(
            int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(stored),
                                               extras=ocp.args.JsonRestore()))
        state = jax.tree.map(
            lambda a, x: jax.random.wrap_key_data(x, impl=_key_impl(a)) if _is_key(a) else x,
            abstract_state, out["state"])
        return state, dict(out["extras"] or {})

    def extras(self, step: int) -> dict:
        """The JSON extras of checkpoint `step` alone (cheap: no arrays are read)."""
        self.wait()
        out = self._manager.restore(int(step), args=ocp.args.Composite(extras=ocp.args.JsonRestore()))
        return dict(out["extras"] or {})

    def wait(self) -> None:
        """Block until the async save in flight (if any) is written and finalized."""
        with self._writing():
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves, then release Orbax's resources."""
        self.wait()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:200]}" if text else type(err).__name__


def _as_abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct) or not hasattr(x, "shape"):
        return x  # already abstract, or a Python scalar that Orbax restores as itself
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def record_config(output_dir: str, config: dict, start: int, identity: dict) -> None:
    """config.json: the configuration of the latest start; config_history.jsonl: one line per start
    (time, step, keys changed since the previous start, the whole config and what it trained from)."""
    path = RunDir(output_dir).config_history
    history = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            history = [line for line in f if line.strip()]
    previous = json.loads(history[-1]).get("config", {}) if history else {}
    changed = sorted(k for k in config if k in previous and previous[k] != config[k])
    line = json.dumps({"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": start, "changed": changed,
                       "config": config, "identity": identity}, sort_keys=True)
    atomic_write_text(path, "".join(history) + line + "\n")
    atomic_write_json(RunDir(output_dir).config, config, indent=2, sort_keys=True)


def write_final_state(output_dir, *, step: int, reward_shift, beta: float, loss_type: str, reference_path: str,
                      reference_fingerprint: str) -> None:
    """`output_dir/bco_state.json`: the delta, beta and reference of the finished run (read by
    `python -m bco_jax.evaluate`), written atomically."""
    shift = jax.device_get(reward_shift)
    record = {"step": int(step), "delta": float(L.reward_shift_delta(shift)), "beta": beta,
              "loss_type": loss_type, "reference_path": os.path.abspath(reference_path),
              "reference_fingerprint": reference_fingerprint,
              "reward_shift": {"mode": shift.mode, "decay": shift.decay,
                               "class_means": np.asarray(shift.class_means).tolist(),
                               "class_counts": np.asarray(shift.class_counts).tolist(),
                               "mean": float(shift.mean), "count": float(shift.count)}}
    atomic_write_json(RunDir(str(output_dir)).final_state, record, indent=2)
