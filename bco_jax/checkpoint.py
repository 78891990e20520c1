"""Training checkpoints (Orbax) and the identity of the reference weights.

One checkpoint per saved step under `output_dir/checkpoints/<step>/`, holding two items:
  - `state`:  any pytree of arrays (the TrainState; put the UDM classifier params in it too, e.g.
              `{"train": train_state, "udm": udm_params}`: they are arrays and want the same handling).
  - `extras`: a JSON-able dict (data-iterator state, resolved config, reference path + fingerprint).

Atomicity: Orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it to `<step>` only once every item
is written (and, on object stores, adds a commit marker). A run killed mid-save leaves only the tmp
folder, which `latest_step` ignores, so a resume never sees half a checkpoint.

Typed PRNG keys (`jax.random.key`) are stored as their raw `key_data` and re-wrapped on restore with the
implementation named by the abstract state's dtype, so the abstract state stays the real one.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from bco_jax import losses as L
from bco_jax.files import atomic_write_json

REFERENCE_FINGERPRINT = "reference_fingerprint"  # extras key written by the trainer
REFERENCE_PATH = "reference_path"
FINAL_STATE_FILE = "bco_state.json"  # beside hf/: what `python -m bco_jax.evaluate` needs
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")
_WEIGHT_NAMES = ("config.json",)


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


class Checkpointer:
    """Saves and restores training checkpoints in `output_dir/checkpoints`.

        ckpt = Checkpointer(output_dir, save_total_limit=3)
        ckpt.save(step, {"train": state, "udm": udm_params}, {"data": it.state(), "config": cfg, ...})
        step = ckpt.latest_step()                      # None when there is nothing to resume
        state, extras = ckpt.restore(step, abstract)   # abstract: ShapeDtypeStructs with .sharding
        ckpt.close()                                   # waits for the async save in flight

    Saves are asynchronous: `save` returns once the arrays are copied off the devices, the write goes on in
    the background; the next `save`, `wait` or `close` waits for it. `save_total_limit=None` keeps all.
    Usable as a context manager (closes on exit). Call every method on every process (multi-host).
    """

    def __init__(self, output_dir, *, save_total_limit: int | None = None, async_save: bool = True):
        if save_total_limit is not None and save_total_limit < 1:
            raise ValueError(f"save_total_limit must be >= 1 or None, got {save_total_limit}")
        self.directory = Path(output_dir).absolute() / "checkpoints"
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
        extras = dict(extras or {})
        json.dumps(extras)  # fail here, with the caller's stack, not later in Orbax's writer thread
        state = jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state)
        return self._manager.save(
            int(step), force=True,  # the trainer decides when to save; no Orbax interval policy
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    extras=ocp.args.JsonSave(extras)))

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
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves, then release Orbax's resources."""
        self.wait()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _as_abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct) or not hasattr(x, "shape"):
        return x  # already abstract, or a Python scalar that Orbax restores as itself
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def params_fingerprint(path) -> str:
    """`sha256:<hex>` over the weight files of an HF folder (or of one file).

    Hashes `*.safetensors`, `*.safetensors.index.json` and `config.json`: names, sizes and bytes, in
    sorted order, streamed in 1 MiB blocks (multi-GB weights never sit in memory). Tokenizer files and
    README do not count: they do not change the reference log-probs' weights.
    """
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file()
                       and (p.name.endswith(_WEIGHT_SUFFIXES) or p.name in _WEIGHT_NAMES))
    else:
        raise FileNotFoundError(f"reference model not found: {path}")
    if not any(p.name.endswith(".safetensors") for p in files):
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    digest = hashlib.sha256()
    for p in files:
        digest.update(f"{p.name}\0{os.path.getsize(p)}\0".encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def check_reference(extras: dict, fingerprint: str) -> None:
    """Refuse to resume when the checkpoint was trained against other reference weights.

    `extras` is what `restore` returned; the trainer writes `REFERENCE_FINGERPRINT` (and
    `REFERENCE_PATH`) into it at save time. A checkpoint without a recorded fingerprint is refused too.
    """
    saved = extras.get(REFERENCE_FINGERPRINT)
    if saved == fingerprint:
        return
    where = extras.get(REFERENCE_PATH, "an unrecorded path")
    raise ValueError(f"reference weights differ from the checkpoint's: checkpoint was trained against "
                     f"{where} ({saved}), now {fingerprint}; use the original reference model or a new "
                     f"output_dir")


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
    atomic_write_json(os.path.join(output_dir, FINAL_STATE_FILE), record, indent=2)
