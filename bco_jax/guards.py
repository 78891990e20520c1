"""Checks on start and at the end of a run: nothing the user has is overwritten, no model folder,
pairing or checkpoint that cannot be right is used, and no garbage is saved or exported.

Each check raises ConfigError / TrainError with one line naming the key, file or array
(docs/reliability.md lists them and the tests that hold each). `run` arguments are
`bco_jax.build.Run`s; this module sits below `build` and takes them as values.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import TYPE_CHECKING

import jax
import numpy as np
from jax.experimental import multihost_utils

from bco_jax import checkpoint as ckpt_lib
from bco_jax.errors import ConfigError, TrainError, log

if TYPE_CHECKING:
    from bco_jax.build import Run
    from bco_jax.config import TrainConfig
    from bco_jax.step import TrainState

MODEL_COPY = "model"  # under output_dir: the policy's config and tokenizer (see bco_jax.build)


def check_output_dir(cfg: TrainConfig, output_dir: str) -> None:
    """output_dir must be a folder (or not exist yet) and share nothing with a model folder: the run
    writes config.json, hf/ and model/ there, which would overwrite the user's model."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ConfigError(f"output_dir: {output_dir} is a file, not a folder")
    out = os.path.realpath(output_dir)
    for key in ("model", "ref_model"):
        path = getattr(cfg.model, key)
        if not path or not os.path.exists(path):
            continue
        model = os.path.realpath(path)
        relation = ("is" if out == model else "is inside" if out.startswith(model + os.sep) else
                    "contains" if model.startswith(out + os.sep) else None)
        if relation:
            raise ConfigError(f"output_dir: {output_dir} {relation} the {key} folder {path}; the run would "
                              "overwrite its files: choose another output_dir")


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



def fingerprint_once(path: str) -> str:
    """The reference weights' content hash, computed by process 0 alone and shared."""
    value = ckpt_lib.params_fingerprint(path) if jax.process_index() == 0 else ""
    if jax.process_count() == 1:
        return value
    data = np.frombuffer(value.ljust(80).encode(), np.uint8)
    return bytes(multihost_utils.broadcast_one_to_all(data)).decode().strip()


def check_model_files(folder: str, key: str) -> str:
    """`folder`, once its config.json and safetensors files read: a truncated or garbled file is
    named here, not deep inside the loader."""
    config = os.path.join(folder, "config.json")
    try:
        with open(config, encoding="utf-8") as f:
            if not isinstance(json.load(f), dict):
                raise ValueError("not a JSON object")
    except FileNotFoundError:
        raise ConfigError(f"{key}: no config.json in {folder} (a local HF model folder is expected)") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"{key}: cannot read {config} ({err})") from None
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            _check_safetensors(os.path.join(folder, name), key)
    return folder


def _check_safetensors(path: str, key: str) -> None:
    """Header readable and every tensor's bytes inside the file (a truncated download fails here)."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < header_len <= size - 8:
                raise ValueError("no safetensors header")
            header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        raise ConfigError(f"{key}: {path} is not a readable safetensors file ({err})") from None
    if 8 + header_len + end > size:
        raise ConfigError(f"{key}: {path} is truncated ({size} bytes, its header needs {8 + header_len + end})")


@contextlib.contextmanager
def reading_weights(folder: str, key: str):
    """Turns a loader error on a model folder's weights into one ConfigError naming the folder."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"{key}: cannot load the weights in {folder} ({first})") from err


def check_finite_weights(params, folder: str, key: str) -> None:
    """Refuse a model with a NaN or inf weight: every step would be skipped and nothing learnt."""
    bad = ckpt_lib.nonfinite_arrays(params)
    if bad:
        raise ConfigError(f"{key}: {folder} has non-finite weights (NaN or inf) in {', '.join(bad[:3])}"
                          f"{' ...' if len(bad) > 3 else ''}")


def check_pairing(cfg: TrainConfig, ref_folder: str, output_dir: str) -> None:
    """A reference must score the policy's tokens: same vocabulary, architecture and width."""
    policy = cfg.model.model if os.path.isdir(cfg.model.model) else os.path.join(output_dir, MODEL_COPY)
    if os.path.abspath(policy) == os.path.abspath(ref_folder):
        return
    try:
        configs = [json.load(open(os.path.join(f, "config.json"), encoding="utf-8")) for f in (policy, ref_folder)]
    except (OSError, ValueError):
        return  # a missing policy config is reported where the policy loads
    for name in ("vocab_size", "model_type", "hidden_size"):
        ours, theirs = (c.get(name) for c in configs)
        if ours != theirs:
            raise ConfigError(f"ref_model: {ref_folder} has {name}={theirs!r}, the policy {policy} has "
                              f"{ours!r}; the reference must be the policy's own starting point (same "
                              "tokenizer and architecture)")


def run_identity(run: Run) -> dict:
    """What a checkpoint's steps were computed from, by content: the policy's and the reference's
    weights (hashes; the policy's only while its folder has weights) and the training data's tokens."""
    cfg = run.cfg
    if not cfg.model.separate_reference:
        model = run.ref_fingerprint
    elif any(n.endswith(".safetensors") for n in os.listdir(run.model_dir)):
        model = fingerprint_once(run.model_dir)
    else:
        model = None  # resumed from the saved copy: the policy's weights are in the checkpoint
    return {"model_weights": model, "reference_weights": run.ref_fingerprint,
            "train_data_content": run.train_data.fingerprint()}


def check_resume(run: Run, step: int, extras: dict, identity: dict) -> None:
    """The resume rules (docs/reliability.md): keys that change what past steps meant must equal the
    checkpoint's, unless allow_config_change; the run may not end before the checkpoint's step."""
    from bco_jax.config import resume_differences

    cfg = run.cfg
    saved_identity = extras.get("identity") or {}
    changed = resume_differences(extras.get("config") or {}, cfg.flat())
    changed += [f"{k}: {str(saved_identity[k])[:19]} -> {str(v)[:19]}" for k, v in identity.items()
                if saved_identity.get(k) and v and saved_identity[k] != v]
    if changed and not cfg.run.allow_config_change:
        raise ConfigError(f"resume: checkpoint {step} in {run.output_dir} was trained with other values of keys "
                          f"that change what its steps meant: {'; '.join(changed)}; use another output_dir, or "
                          "--allow_config_change true to continue anyway")
    if changed:
        log.warning("resume: continuing checkpoint %d with changed keys (allow_config_change): %s", step,
                    "; ".join(changed))
    if step > run.steps:
        raise ConfigError(f"max_steps: checkpoint {step} in {run.output_dir} is past this run's {run.steps} steps; "
                          f"give max_steps >= {step}, or another output_dir")
