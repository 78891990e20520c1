"""What a resume may change and what it may not: the run's identity and the operational keys.

Every checkpoint records, once (under its extras' "identity"), what its steps were computed from:
the policy's and the reference's weights by content hash, where the reference was read, and the
training data's token fingerprint (`RunIdentity`); beside it, the flat config. On resume
`check_resume` is the one check (docs/reliability.md, "Resume rules"):
  - other reference weights than the checkpoint's are refused, always;
  - a key outside OPERATIONAL_KEYS whose value changed, other policy weights or other training data
    are refused unless allow_config_change (then a warning names them);
  - a run that would end before the checkpoint's step is refused.
OPERATIONAL_KEYS also keep keys out of the default run name (`bco_jax.config.run_name`).

It sits low in the package (errors, jax): build and train hand it plain values, not a Run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from bco_jax.errors import ConfigError, log

# Keys that do not change what past steps meant: a resume may change them (each start is recorded in
# config_history.jsonl), and they stay out of the default run name's digest. Model and data paths are
# here because their contents are compared instead (weights by hash, data by token fingerprint). Every
# other key is refused on resume when it differs from the checkpoint's, unless allow_config_change.
OPERATIONAL_KEYS = frozenset({
    "model", "ref_model", "train_data", "eval_data", "split", "eval_split", "tfds_data_dir", "cache_dir",
    "remat", "attn_implementation", "output_dir", "max_steps", "num_train_epochs", "eval_batch_size",
    "logging_steps", "save_steps", "save_total_limit", "eval_steps", "precompute_ref_log_probs", "mesh",
    "dry_run", "max_nonfinite_steps", "sigterm_exit_code", "tensorboard", "export_hf", "save_reference",
    "demo_samples", "allow_config_change", "debug", "overwrite_output_dir", "skip_invalid", "packing",
    "coordinator_address", "num_processes", "process_id", "distributed_timeout", "prompts", "rounds",
    "judge_timeout"})
# Operational, but they name the run: two models (or datasets) never share a default output_dir.
NAMING_KEYS = ("model", "ref_model", "train_data", "prompts")
# Keys added after run names were fixed (the online section's too: `config.validate.run_name`): left out
# of the digest at their default, so adding an option does not rename (and so un-resume) existing runs.
LATER_KEYS = {"load_in_8bit": False, "reward_shift_value": 0.0}

IDENTITY = "identity"  # the checkpoint extras' key of `RunIdentity.record()`
REFERENCE_FINGERPRINT = "reference_weights"  # keys of the identity record
REFERENCE_PATH = "reference_path"
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".gguf")
_WEIGHT_NAMES = ("config.json",)


def resume_differences(saved: dict, current: dict) -> list[str]:
    """`key: old -> new` for every key outside OPERATIONAL_KEYS whose value differs between a
    checkpoint's flat config and this run's (keys one of them lacks, from another version, are skipped)."""
    saved, current = (json.loads(json.dumps(c, default=str)) for c in (saved, current))
    return [f"{k}: {saved[k]!r} -> {current[k]!r}" for k in sorted(set(saved) & set(current))
            if k not in OPERATIONAL_KEYS and saved[k] != current[k]]


# ------------------------------------------------------------------------------------ fingerprints


def params_fingerprint(path) -> str:
    """`sha256:<hex>` over the weight files of an HF folder (or of one file: a GGUF file is its own
    config and weights).

    Hashes `*.safetensors`, `*.safetensors.index.json`, `*.gguf` and `config.json`: names, sizes and bytes, in
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
    if not has_weights(files):
        raise FileNotFoundError(f"no *.safetensors or *.gguf weights in {path}")
    digest = hashlib.sha256()
    for p in files:
        digest.update(f"{p.name}\0{os.path.getsize(p)}\0".encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def has_weights(files) -> bool:
    """Whether `files` (paths) hold a model's weights: safetensors or a GGUF file."""
    return any(Path(p).name.endswith((".safetensors", ".gguf")) for p in files)


def fingerprint_once(path: str) -> str:
    """The weights' content hash, computed by process 0 alone and shared with every process."""
    value = params_fingerprint(path) if jax.process_index() == 0 else ""
    if jax.process_count() == 1:
        return value
    data = np.frombuffer(value.ljust(80).encode(), np.uint8)
    return bytes(multihost_utils.broadcast_one_to_all(data)).decode().strip()


# ---------------------------------------------------------------------------------------- identity


@dataclasses.dataclass(frozen=True)
class RunIdentity:
    """What a run's steps are computed from, by content. `model_weights` is None when the policy's
    folder holds no weights (resumed from the copy under output_dir: they are in the checkpoint)."""
    model_weights: str | None
    reference_weights: str
    reference_path: str  # where the reference was read: named in messages, never compared
    train_data_content: str

    def record(self) -> dict:
        """The JSON stored once in every checkpoint's extras (under IDENTITY) and in config_history."""
        return dataclasses.asdict(self)


def run_identity(*, model_dir: str, separate_reference: bool, ref_path: str, ref_fingerprint: str,
                 train_data_fingerprint: str) -> RunIdentity:
    """The identity of a run whose policy is read from `model_dir` and reference from `ref_path`
    (hash `ref_fingerprint`): the policy's hash is the reference's when they are the same weights."""
    if not separate_reference:
        model = ref_fingerprint
    elif has_weights(Path(model_dir).iterdir() if os.path.isdir(model_dir) else [Path(model_dir)]):
        model = fingerprint_once(model_dir)
    else:
        model = None  # resumed from the saved copy: the policy's weights are in the checkpoint
    return RunIdentity(model_weights=model, reference_weights=ref_fingerprint,
                       reference_path=os.path.abspath(ref_path), train_data_content=train_data_fingerprint)


def saved_identity(extras: dict) -> dict:
    """A checkpoint's identity record. Checkpoints written before the identity held the reference's
    path kept it beside it, under the same key: it is read from there too."""
    return {**{k: extras[k] for k in (REFERENCE_PATH,) if k in extras}, **(extras.get(IDENTITY) or {})}


def check_reference(saved: dict, fingerprint: str) -> None:
    """Refuse a checkpoint trained against other reference weights (`saved`: its identity record);
    one recording none is refused too."""
    recorded = saved.get(REFERENCE_FINGERPRINT)
    if recorded == fingerprint:
        return
    where = saved.get(REFERENCE_PATH, "an unrecorded path")
    raise ConfigError(f"reference weights differ from the checkpoint's: checkpoint was trained against "
                      f"{where} ({recorded}), now {fingerprint}; use the original reference model or a new "
                      f"output_dir")


def check_resume(identity: RunIdentity, step: int, extras: dict, *, config: dict, allow_config_change: bool,
                 steps: int, output_dir: str) -> None:
    """The resume rules, in one place: may this run (`identity`, flat `config`, `steps` in all)
    continue checkpoint `step` of `output_dir`, whose JSON extras are `extras`?"""
    saved = saved_identity(extras)
    check_reference(saved, identity.reference_weights)
    changed = resume_differences(extras.get("config") or {}, config)
    current = identity.record()
    changed += [f"{k}: {str(saved[k])[:19]} -> {str(current[k])[:19]}" for k in ("model_weights", "train_data_content")
                if saved.get(k) and current[k] and saved[k] != current[k]]
    if changed and not allow_config_change:
        raise ConfigError(f"resume: checkpoint {step} in {output_dir} was trained with other values of keys "
                          f"that change what its steps meant: {'; '.join(changed)}; use another output_dir, or "
                          "--allow_config_change true to continue anyway")
    if changed:
        log.warning("resume: continuing checkpoint %d with changed keys (allow_config_change): %s", step,
                    "; ".join(changed))
    if step > steps:
        raise ConfigError(f"max_steps: checkpoint {step} in {output_dir} is past this run's {steps} steps; "
                          f"give max_steps >= {step}, or another output_dir")
