"""Validation and the resolved config: invalid combinations are refused before anything loads (each
message names the key), what the loss implies is filled in, and the facts derived from a config
(its mesh shape, its default run name) are computed here, once.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import typing
from pathlib import Path
from typing import Literal

from bco_jax.argv import mesh_problem, parse_mesh
from bco_jax.config.schema import OnlineOptions, TrainConfig, field_type, key_table
from bco_jax.errors import ConfigError, short
from bco_jax.losses import GRPO_LOSSES, PAIRED_LOSSES
from bco_jax.models.lora import resolve_targets
from bco_jax.resume import LATER_KEYS, NAMING_KEYS, OPERATIONAL_KEYS


def _check_choices(cfg: TrainConfig) -> None:
    """Every Literal-typed key holds one of its type's values."""
    for key, (section, _) in key_table().items():
        annotation = field_type(section, key)
        if typing.get_origin(annotation) is Literal:
            value = getattr(getattr(cfg, section), key)
            if value not in typing.get_args(annotation):
                raise ConfigError(f"{key}: must be one of {', '.join(typing.get_args(annotation))} "
                                  f"(got {short(value)})")


def _check_finite(cfg: TrainConfig) -> None:
    """No inf or NaN in any float key (an infinite learning rate passes every later guard)."""
    for key, value in cfg.flat().items():
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ConfigError(f"{key}: must be a finite number (got {short(value)})")


# HOST:PORT, HOST a name, an IPv4 address or a bracketed IPv6 one; the port 1..65535.
_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)"
                      r":(?:[1-9]\d{0,3}|[1-5]\d{4}|6[0-4]\d{3}|65[0-4]\d{2}|655[0-2]\d|6553[0-5])")
LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_adapter", "load_in_8bit")


def _check_lora_keys(cfg: TrainConfig) -> None:
    """LoRA keys set without use_peft would be ignored (a full fine-tune would run): refused."""
    if cfg.model.use_peft:
        return
    defaults = type(cfg.model)()
    changed = [k for k in LORA_KEYS if getattr(cfg.model, k) != getattr(defaults, k)]
    if changed:
        value = short(getattr_flat(cfg, changed[0]))
        raise ConfigError(f"{changed[0]}: applies with use_peft true only (got {value} without it: a full "
                          "fine-tune would run); add --use_peft true or drop the LoRA keys")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Reject invalid combinations before anything loads (each message names the key); return the
    config with what the loss implies filled in."""
    _check_choices(cfg)
    _check_finite(cfg)
    l, o, r = cfg.loss, cfg.optim, cfg.run
    mesh_why = mesh_problem(r.mesh)
    checks = [
        (0.0 <= l.reward_shift_decay < 1.0, "reward_shift_decay", "must be in [0, 1)"),
        (l.reward_shift_value == 0.0 or (l.reward_shift == "fixed" and l.loss_type == "bco"), "reward_shift_value",
         f"applies with reward_shift=fixed and loss_type=bco only; here reward_shift={l.reward_shift}, "
         f"loss_type={l.loss_type}"),
        (l.beta > 0 or (l.loss_type in GRPO_LOSSES and l.beta == 0), "beta", "must be > 0 (0 only for GRPO)"),
        (l.loss_type not in GRPO_LOSSES or not cfg.data.packing, "packing", "not with GRPO"),
        (0.0 <= l.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)"),
        (l.label_smoothing == 0.0 or l.loss_type == "dpo", "label_smoothing", "applies to loss_type=dpo only"),
        (not l.udm or l.loss_type in ("bco", "bce"), "udm", "applies to loss_type bco or bce only"),
        (not cfg.data.packing or l.loss_type not in PAIRED_LOSSES, "packing",
         f"applies to the unpaired losses (bco, bce, kto); {l.loss_type} keeps one pair per row"),
        (not cfg.data.packing or cfg.model.attn_implementation != "cudnn", "packing",
         "attn_implementation=cudnn takes no segment ids; use auto, xla or splash with packing"),
        (not (cfg.model.attn_implementation == "cudnn" and cfg.model.dtype == "float32"), "attn_implementation",
         "cudnn runs in bfloat16 / float16: use dtype bfloat16 (or auto on GPU), or attn_implementation xla"),
        (0 < l.min_density_ratio <= l.max_density_ratio, "min_density_ratio", "must be in (0, max_density_ratio]"),
        (l.prompt_sample_size > 0, "prompt_sample_size", "must be > 0"),
        (l.loss_type != "kto" or r.batch_size >= 2, "batch_size",
         "KTO needs >= 2 examples per batch (its KL term pairs each prompt with another completion)"),
        (0.0 <= o.warmup_ratio < 1.0, "warmup_ratio", "must be in [0, 1)"),
        (o.learning_rate >= 0, "learning_rate", "must be >= 0"),
        (o.max_grad_norm >= 0, "max_grad_norm", "must be >= 0"),
        (r.batch_size > 0, "batch_size", "must be > 0"),
        (r.gradient_accumulation_steps > 0, "gradient_accumulation_steps", "must be > 0"),
        (r.gradient_accumulation_steps <= 0 or r.batch_size % r.gradient_accumulation_steps == 0, "batch_size",
         f"{r.batch_size} is not divisible by gradient_accumulation_steps={r.gradient_accumulation_steps}"),
        (r.max_steps == -1 or r.max_steps > 0, "max_steps", "must be > 0, or -1 to use num_train_epochs"),
        (0 <= r.seed < 2**32, "seed", "must be in [0, 2**32)"),
        (r.eval_batch_size is None or r.eval_batch_size > 0, "eval_batch_size", "must be > 0 (none: batch_size)"),
        (r.save_total_limit is None or r.save_total_limit > 0, "save_total_limit", "must be > 0 (none: keep all)"),
        (r.sigterm_exit_code is None or 0 <= r.sigterm_exit_code <= 255, "sigterm_exit_code",
         "must be in [0, 255] (none: 128 + the signal)"),
        (r.demo_samples > 0, "demo_samples", "must be > 0"),
        (r.num_train_epochs > 0, "num_train_epochs", "must be > 0"),
        (r.logging_steps > 0, "logging_steps", "must be > 0"),
        (r.save_steps > 0, "save_steps", "must be > 0"),
        (r.eval_steps is None or r.eval_steps > 0, "eval_steps", "must be > 0"),
        (r.max_nonfinite_steps > 0, "max_nonfinite_steps", "must be > 0"),
        (cfg.launch.distributed_timeout > 0, "distributed_timeout", "must be > 0"),
        (cfg.model.lora_r > 0, "lora_r", "must be > 0"),
        (cfg.model.lora_alpha > 0, "lora_alpha", "must be > 0"),
        (0.0 <= cfg.model.lora_dropout < 1.0, "lora_dropout", "must be in [0, 1)"),
        ((cfg.launch.num_processes is None) == (cfg.launch.process_id is None), "process_id",
         "give num_processes and process_id together"),
        (cfg.launch.process_id is None or 0 <= cfg.launch.process_id < (cfg.launch.num_processes or 0),
         "process_id", f"must be in [0, num_processes={cfg.launch.num_processes})"),
        (mesh_why is None, "mesh", mesh_why),
        (cfg.launch.coordinator_address is None or _ADDRESS.fullmatch(cfg.launch.coordinator_address) is not None,
         "coordinator_address", "must be HOST:PORT (e.g. 10.0.0.1:1234), the port in 1..65535"),
        (cfg.launch.num_processes is None or cfg.launch.num_processes > 0, "num_processes", "must be > 0"),
        *_online_checks(cfg.online),
    ]
    for ok, key, why in checks:
        if not ok:
            raise ConfigError(f"{key}: {why} (got {short(getattr_flat(cfg, key))})")
    resolve_targets(cfg.model.lora_target_modules)  # ConfigError naming an unknown module
    _check_lora_keys(cfg)
    # Paired losses read pairs (checked against the files when they load); KTO reads its KL pairs;
    # BCE is BCO with delta = 0.
    data = dataclasses.replace(cfg.data, paired=cfg.data.paired or l.loss_type in PAIRED_LOSSES,
                               kl_pairs=cfg.data.kl_pairs or l.loss_type == "kto")
    loss = dataclasses.replace(l, reward_shift="none") if l.loss_type == "bce" else l
    return dataclasses.replace(cfg, data=data, loss=loss)


def _online_checks(o) -> list:
    """The online loop's keys in range (at their defaults they pass, so train never trips on them)."""
    return [
        (o.rounds > 0, "rounds", "must be > 0"),
        (o.prompts_per_round > 0, "prompts_per_round", "must be > 0"),
        (o.num_generations > 0, "num_generations", "must be > 0"),
        (o.steps_per_round > 0, "steps_per_round", "must be > 0"),
        (o.max_completion_length > 0, "max_completion_length", "must be > 0"),
        (o.temperature >= 0, "temperature", "must be >= 0 (0: greedy)"),
        (0 < o.top_p <= 1, "top_p", "must be in (0, 1]"),
        (o.epsilon > 0, "epsilon", "must be > 0"),
        (o.ref_model_sync_steps > 0, "ref_model_sync_steps", "must be > 0"),
        (0 <= o.ref_model_mixup_alpha <= 1, "ref_model_mixup_alpha", "must be in [0, 1]"),
        (o.judge_timeout >= 0, "judge_timeout", "must be >= 0 (0: no limit)"),
    ]


def getattr_flat(cfg: TrainConfig, key: str):
    section, _ = key_table()[key]
    return getattr(getattr(cfg, section), key)


def mesh_shape(cfg: TrainConfig) -> tuple[int, int, int]:
    """The configured (data, fsdp, tensor) sizes; -1 fills the remaining devices."""
    return parse_mesh(cfg.run.mesh)


def run_name(cfg: TrainConfig) -> str:
    """A deterministic name from model, data and loss (no timestamps): re-running resumes, also with
    other operational keys (a longer max_steps, another mesh, ...)."""
    model = Path(cfg.model.model or "oracle-sft").name or "model"
    data = "+".join(Path(p.rstrip("/")).stem for p in cfg.data.train_data or cfg.online.prompts) or "oracle-feedback"
    later = {**LATER_KEYS, **dataclasses.asdict(OnlineOptions())}  # the online keys came later too
    what = {k: v for k, v in cfg.flat().items() if (k not in OPERATIONAL_KEYS or k in NAMING_KEYS)
            and not (k in later and v == later[k])}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9._+-]", "_", f"{model}-{data}-{cfg.loss.loss_type}-{digest}")[:120]

