"""The training configuration: one typed dataclass per concern, flattened into one namespace of keys.

Keys follow TRL's BCOConfig / transformers' TrainingArguments where a counterpart exists. A YAML file
gives keys (flat, or grouped under the concern names), and `--key value` flags override it. Every
option appears once, here or in `bco_jax.data.config.DataConfig`, with its default and one line of doc.
A choice is typed `Literal[...]` and checked from its type; `validate` returns the resolved config
(the sections are frozen: the loss section is the jit-static configuration of the step).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from bco_jax.data.config import DataConfig
from bco_jax.errors import ConfigError
from bco_jax.losses import DEFAULT_REWARD_SHIFT_DECAY, PAIRED_LOSSES, LossType, RewardShiftMode
from bco_jax.models.attention import ATTN_IMPLEMENTATIONS
from bco_jax.models.decoder import REMAT_POLICIES
from bco_jax.models.lora import resolve_targets

# The model's own lists of choices, as types.
RematPolicy = Literal[REMAT_POLICIES]
AttnImplementation = Literal[ATTN_IMPLEMENTATIONS]
# Old key names still read, with a warning: old -> new.
KEY_ALIASES = {"attention_impl": "attn_implementation"}

__all__ = ["OPERATIONAL_KEYS", "ConfigError", "TrainConfig", "build_config", "key_table", "mesh_shape",
           "parse_args", "resume_differences", "run_name", "validate"]


def _opt(default, help_text: str):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help_text})
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class ModelOptions:
    model: str = _opt("", "HF folder of the policy to align (empty: the shipped oracle-task SFT model)")
    ref_model: str | None = _opt(None, "HF folder of the frozen reference (default: the same as model)")
    dtype: Literal["auto", "float32", "bfloat16"] = _opt(
        "auto", "compute dtype: auto (bfloat16 on GPU/TPU, float32 on CPU), float32, bfloat16")
    ref_dtype: Literal["float32", "bfloat16"] = _opt("float32", "parameter dtype of the frozen reference")
    remat: RematPolicy = _opt("none", "activation rematerialisation: none, full or save_dots")
    attn_implementation: AttnImplementation = _opt(
        "auto", "attention kernel: auto (cudnn on GPU, splash on TPU, xla on CPU), xla, cudnn or splash")
    use_peft: bool = _opt(False, "train LoRA adapters on a frozen base; the reference is ref_model, or without it "
                                 "the base with adapters off")
    lora_r: int = _opt(16, "LoRA rank")
    lora_alpha: float = _opt(32.0, "LoRA scale numerator: updates are (lora_alpha / lora_r) x A B")
    lora_dropout: float = _opt(0.05, "dropout on the adapters' input while training")
    lora_target_modules: list[str] = _opt(
        [], "projections to adapt, PEFT names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj) "
            "or all-linear (empty: all of them)")
    lora_adapter: str | None = _opt(None, "a PEFT adapter folder to start from (None: fresh adapters)")
    load_in_8bit: bool = _opt(False, "with use_peft: hold the frozen base's projections in int8 (per-channel "
                                     "scales; QLoRA-style, about half the base's memory)")

    @property
    def separate_reference(self) -> bool:
        """Whether ref_model names another folder than model (with use_peft: a second model in memory)."""
        return bool(self.ref_model) and os.path.abspath(self.ref_model) != os.path.abspath(self.model)


@dataclass(frozen=True)
class LossOptions:
    loss_type: LossType = _opt("bco", "bco, bce (bco with delta = 0), dpo, ipo, nca (paired) or kto")
    beta: float = _opt(0.1, "temperature of the implicit reward beta * (log pi - log pi_ref)")
    reward_shift: RewardShiftMode = _opt(
        "ema", "delta: ema (paper: midpoint of class-mean EMAs), trl (TRL's running mean), none")
    reward_shift_decay: float = _opt(
        DEFAULT_REWARD_SHIFT_DECAY, "EMA decay of the class means per optimizer step (reward_shift=ema)")
    label_smoothing: float = _opt(0.0, "conservative-DPO label smoothing (dpo only)")
    desirable_weight: float = _opt(1.0, "KTO weight of thumbs-up examples")
    undesirable_weight: float = _opt(1.0, "KTO weight of thumbs-down examples")
    udm: bool = _opt(False, "weight thumbs-down by the prompt density ratio p(up|x)/p(down|x) (UDM)")
    prompt_sample_size: int = _opt(1024, "prompts per class used to fit the UDM classifier")
    min_density_ratio: float = _opt(0.5, "lower clip of UDM density ratios")
    max_density_ratio: float = _opt(10.0, "upper clip of UDM density ratios")


@dataclass(frozen=True)
class OptimOptions:
    learning_rate: float = _opt(5e-7, "peak learning rate of AdamW (paper: 5e-7)")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = _opt(
        "linear", "linear, cosine (warmup, then decay to 0), constant_with_warmup, or constant (no warmup), "
        "as transformers")
    warmup_ratio: float = _opt(0.1, "fraction of the steps spent warming up linearly from 0")
    weight_decay: float = _opt(0.0, "AdamW decoupled weight decay")
    max_grad_norm: float = _opt(1.0, "clip gradients to this global norm (0: no clipping)")
    adam_beta1: float = _opt(0.9, "AdamW beta1")
    adam_beta2: float = _opt(0.999, "AdamW beta2")
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon")


@dataclass(frozen=True)
class RunOptions:
    output_dir: str | None = _opt(None, "where checkpoints, metrics and the export go (None: outputs/<run name>)")
    seed: int = _opt(42, "seed of the data order and of sampling")
    max_steps: int = _opt(-1, "optimizer steps to run (-1: num_train_epochs over the data)")
    num_train_epochs: float = _opt(1.0, "epochs over the training data when max_steps is -1")
    batch_size: int = _opt(64, "global batch in examples (pairs for paired losses) per optimizer step")
    gradient_accumulation_steps: int = _opt(1, "micro-batches per optimizer step (scanned inside the step)")
    eval_batch_size: int | None = _opt(None, "global batch for evaluation and precomputing (None: batch_size)")
    logging_steps: int = _opt(10, "write metrics every this many steps")
    save_steps: int = _opt(500, "checkpoint every this many steps (and always at the end)")
    save_total_limit: int | None = _opt(None, "keep only the newest this many checkpoints (None: all)")
    eval_steps: int | None = _opt(None, "evaluate on eval_data every this many steps (None: at the end only)")
    precompute_ref_log_probs: bool = _opt(False, "compute reference log-probs in one pass before training")
    mesh: str = _opt("-1,1,1", "devices along the data, fsdp and tensor axes; -1 fills the rest")
    dry_run: bool = _opt(False, "compile the step for the mesh, print per-device memory, and exit")
    max_nonfinite_steps: int = _opt(10, "stop after this many skipped (non-finite) steps in a row")
    sigterm_exit_code: int | None = _opt(
        None, "exit code after saving on SIGTERM / Ctrl-C (None: 128 + the signal, 143 / 130, as a shell)")
    tensorboard: bool = _opt(True, "also write TensorBoard scalars to output_dir/tensorboard")
    export_hf: bool = _opt(True, "export the final policy to output_dir/hf as an HF folder")
    save_reference: bool = _opt(True, "save the reference weights once under output_dir/reference (Orbax), "
                                      "so a resume needs no model folder (off for very large references)")
    demo_samples: int = _opt(1200, "answers sampled on held-out prompts for the demo's before/after oracle table")
    allow_config_change: bool = _opt(False, "resume although keys that change what past steps meant differ "
                                            "from the checkpoint's (beta, loss_type, data, weights ...)")
    debug: bool = _opt(False, "show the full traceback of an error instead of one line")

    @property
    def eval_batch(self) -> int:
        """The global batch of evaluation and precomputation passes."""
        return self.eval_batch_size or self.batch_size


@dataclass(frozen=True)
class LaunchOptions:
    """How this process joins a multi-process job (TPU pod slice, SLURM, several GPU hosts). Without
    them a detected cluster or JAX_COORDINATOR_ADDRESS is joined, else the run is single-process.
    Not part of the default run name: every process of a job derives the same output_dir."""
    coordinator_address: str | None = _opt(None, "HOST:PORT of process 0's coordinator (None: detect)")
    num_processes: int | None = _opt(None, "processes in the job (with coordinator_address)")
    process_id: int | None = _opt(None, "this process's index in the job, 0 .. num_processes - 1")
    distributed_timeout: int = _opt(300, "seconds to wait for every peer at start before failing")


# Keys that do not change what past steps meant: a resume may change them (each start is recorded in
# config_history.jsonl), and they stay out of the default run name's digest. Model and data paths are
# here because their contents are compared instead (weights by hash, data by token fingerprint). Every
# other key is refused on resume when it differs from the checkpoint's, unless allow_config_change.
OPERATIONAL_KEYS = frozenset({
    "model", "ref_model", "train_data", "eval_data", "split", "eval_split", "tfds_data_dir", "cache_dir",
    "remat", "attn_implementation", "output_dir", "max_steps", "num_train_epochs", "eval_batch_size",
    "logging_steps", "save_steps", "save_total_limit", "eval_steps", "precompute_ref_log_probs", "mesh",
    "dry_run", "max_nonfinite_steps", "sigterm_exit_code", "tensorboard", "export_hf", "save_reference",
    "demo_samples", "allow_config_change", "debug", "skip_invalid", "packing",
    "coordinator_address", "num_processes", "process_id", "distributed_timeout"})
# Operational, but they name the run: two models (or datasets) never share a default output_dir.
_NAMING_KEYS = ("model", "ref_model", "train_data")
# Keys added after run names were fixed: left out of the digest at their default, so adding an option
# does not rename (and so un-resume) existing runs.
_LATER_KEYS = {"load_in_8bit": False}

SECTIONS = {"model": ModelOptions, "loss": LossOptions, "optim": OptimOptions, "run": RunOptions,
            "data": DataConfig, "launch": LaunchOptions}


@dataclass(frozen=True)
class TrainConfig:
    model: ModelOptions = field(default_factory=ModelOptions)
    loss: LossOptions = field(default_factory=LossOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    run: RunOptions = field(default_factory=RunOptions)
    data: DataConfig = field(default_factory=DataConfig)
    launch: LaunchOptions = field(default_factory=LaunchOptions)

    def flat(self) -> dict:
        """Every key -> value, one namespace (what metrics, checkpoints and --help show)."""
        return {k: v for section in SECTIONS for k, v in dataclasses.asdict(getattr(self, section)).items()}


def key_table() -> dict[str, tuple[str, dataclasses.Field]]:
    """Key -> (section, field). Keys are unique across sections by construction (checked here)."""
    table = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.name in table:
                raise AssertionError(f"config key {f.name!r} defined twice")
            table[f.name] = (section, f)
    return table


def _field_type(f: dataclasses.Field, cls) -> object:
    return typing.get_type_hints(cls)[f.name]


def _parse_value(key: str, raw, annotation):
    """Turn a CLI string (or a YAML value) into the field's type; errors name the key."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    args = typing.get_args(annotation) if union else ()
    optional = type(None) in args
    base = next(a for a in args if a is not type(None)) if union else annotation
    if isinstance(raw, str) and optional and raw.lower() in ("none", "null"):
        return None
    if raw is None:
        if optional:
            return None
        raise ConfigError(f"--{key}: a value is required")
    origin = typing.get_origin(base)
    try:
        if origin is list:
            (item,) = typing.get_args(base)
            if isinstance(raw, str):
                raw = [] if raw.strip() in ("", "[]") else [x.strip() for x in raw.split(",")]
            return [_parse_value(key, x, item) for x in raw]
        if base is bool:
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in ("true", "1", "yes"):
                return True
            if str(raw).lower() in ("false", "0", "no"):
                return False
            raise ValueError("expected true or false")
        if isinstance(raw, bool) and base in (int, float):
            raise ValueError("expected a number")
        if base is int:
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError("expected an integer")
            return int(raw)
        if base is float:
            return float(raw)
        return str(raw)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--{key}: cannot read {raw!r} ({err})") from None


def _flatten_yaml(doc: dict, where: str) -> dict:
    """Grouped sections into one namespace: a key under the wrong section, or given twice with
    different values (flat and grouped, or in two sections), is refused naming it."""
    table = key_table()
    flat, origin = {}, {}
    for key, value in (doc or {}).items():
        if key in SECTIONS and isinstance(value, dict):
            items = [(k, v, key) for k, v in value.items()]
        else:
            items = [(key, value, None)]
        for k, v, section in items:
            name = KEY_ALIASES.get(k, k)
            if section is not None and name in table and table[name][0] != section:
                raise ConfigError(f"--config {where}: key {k!r} is under {section}:, but belongs to "
                                  f"{table[name][0]}:")
            if name in flat and flat[name] != v:
                raise ConfigError(f"--config {where}: key {name!r} is given twice with different values "
                                  f"({origin[name]}: {flat[name]!r}, {section or 'top level'}: {v!r})")
            flat[name], origin[name] = v, section or "top level"
    return flat


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"key {key!r} is given twice (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep)


def build_config(values: dict) -> TrainConfig:
    """A validated, resolved TrainConfig from key -> value (already typed or strings)."""
    table = key_table()
    sections = {name: {} for name in SECTIONS}
    for key, raw in values.items():
        if key in KEY_ALIASES:
            warnings.warn(f"config key {key!r} is now {KEY_ALIASES[key]!r}", DeprecationWarning, stacklevel=2)
            key = KEY_ALIASES[key]
        if key not in table:
            close = [k for k in table if k.startswith(key[:4])][:3]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}")
        section, f = table[key]
        sections[section][key] = _parse_value(key, raw, _field_type(f, SECTIONS[section]))
    try:
        built = {name: SECTIONS[name](**kw) for name, kw in sections.items()}
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return validate(TrainConfig(**built))


def _check_choices(cfg: TrainConfig) -> None:
    """Every Literal-typed key holds one of its type's values."""
    for key, (section, f) in key_table().items():
        choices = typing.get_args(_field_type(f, SECTIONS[section]))
        if typing.get_origin(_field_type(f, SECTIONS[section])) is Literal:
            value = getattr(getattr(cfg, section), key)
            if value not in choices:
                raise ConfigError(f"{key}: must be one of {', '.join(choices)} (got {value!r})")


def _check_finite(cfg: TrainConfig) -> None:
    """No inf or NaN in any float key (an infinite learning rate passes every later guard)."""
    for key, value in cfg.flat().items():
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ConfigError(f"{key}: must be a finite number (got {value!r})")


def _mesh_entries(mesh: str) -> list[int] | None:
    if re.fullmatch(r"\s*-?\d+\s*(,\s*-?\d+\s*){2}", mesh) is None:
        return None
    return [int(x) for x in mesh.split(",")]


def validate(cfg: TrainConfig) -> TrainConfig:
    """Reject invalid combinations before anything loads (each message names the key); return the
    config with what the loss implies filled in."""
    _check_choices(cfg)
    _check_finite(cfg)
    l, o, r = cfg.loss, cfg.optim, cfg.run
    checks = [
        (0.0 <= l.reward_shift_decay < 1.0, "reward_shift_decay", "must be in [0, 1)"),
        (l.beta > 0, "beta", "must be > 0"),
        (0.0 <= l.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)"),
        (l.label_smoothing == 0.0 or l.loss_type == "dpo", "label_smoothing", "applies to loss_type=dpo only"),
        (not l.udm or l.loss_type in ("bco", "bce"), "udm", "applies to loss_type bco or bce only"),
        (not cfg.data.packing or l.loss_type not in PAIRED_LOSSES, "packing",
         f"applies to the unpaired losses (bco, bce, kto); {l.loss_type} keeps one pair per row"),
        (not cfg.data.packing or cfg.model.attn_implementation != "cudnn", "packing",
         "attn_implementation=cudnn takes no segment ids; use auto, xla or splash with packing"),
        (0 < l.min_density_ratio <= l.max_density_ratio, "min_density_ratio", "must be in (0, max_density_ratio]"),
        (l.prompt_sample_size > 0, "prompt_sample_size", "must be > 0"),
        (l.loss_type != "kto" or r.batch_size >= 2, "batch_size",
         "KTO needs >= 2 examples per batch (its KL term pairs each prompt with another completion)"),
        (0.0 <= o.warmup_ratio < 1.0, "warmup_ratio", "must be in [0, 1)"),
        (o.learning_rate >= 0, "learning_rate", "must be >= 0"),
        (o.max_grad_norm >= 0, "max_grad_norm", "must be >= 0"),
        (r.batch_size > 0, "batch_size", "must be > 0"),
        (r.gradient_accumulation_steps > 0, "gradient_accumulation_steps", "must be > 0"),
        (r.batch_size % r.gradient_accumulation_steps == 0, "batch_size",
         f"{r.batch_size} is not divisible by gradient_accumulation_steps={r.gradient_accumulation_steps}"),
        (r.max_steps == -1 or r.max_steps > 0, "max_steps", "must be > 0, or -1 to use num_train_epochs"),
        (0 <= r.seed < 2**32, "seed", "must be in [0, 2**32)"),
        (r.eval_batch_size is None or r.eval_batch_size > 0, "eval_batch_size", "must be > 0 (none: batch_size)"),
        (r.save_total_limit is None or r.save_total_limit > 0, "save_total_limit", "must be > 0 (none: keep all)"),
        (r.sigterm_exit_code is None or 0 <= r.sigterm_exit_code <= 255, "sigterm_exit_code",
         "must be in [0, 255] (none: 128 + the signal)"),
        (r.demo_samples > 0, "demo_samples", "must be > 0"),
        (r.max_steps > 0 or r.num_train_epochs > 0, "num_train_epochs", "must be > 0"),
        (r.logging_steps > 0, "logging_steps", "must be > 0"),
        (r.save_steps > 0, "save_steps", "must be > 0"),
        (r.eval_steps is None or r.eval_steps > 0, "eval_steps", "must be > 0"),
        (r.max_nonfinite_steps > 0, "max_nonfinite_steps", "must be > 0"),
        (cfg.launch.distributed_timeout > 0, "distributed_timeout", "must be > 0"),
        (cfg.model.lora_r > 0, "lora_r", "must be > 0"),
        (not cfg.model.load_in_8bit or cfg.model.use_peft, "load_in_8bit",
         "needs use_peft true (int8 weights are frozen: only adapters can train on them)"),
        (cfg.model.lora_alpha > 0, "lora_alpha", "must be > 0"),
        (0.0 <= cfg.model.lora_dropout < 1.0, "lora_dropout", "must be in [0, 1)"),
        ((cfg.launch.num_processes is None) == (cfg.launch.process_id is None), "process_id",
         "give num_processes and process_id together"),
        (cfg.launch.process_id is None or 0 <= cfg.launch.process_id < (cfg.launch.num_processes or 0),
         "process_id", f"must be in [0, num_processes={cfg.launch.num_processes})"),
        (_mesh_entries(r.mesh) is not None, "mesh", "must be three integers data,fsdp,tensor (one may be -1)"),
        (all(n > 0 or n == -1 for n in _mesh_entries(r.mesh) or []), "mesh",
         "each entry must be > 0, or -1 for the remaining devices"),
        ((_mesh_entries(r.mesh) or []).count(-1) <= 1, "mesh", "at most one entry may be -1"),
        (cfg.launch.num_processes is None or cfg.launch.num_processes > 0, "num_processes", "must be > 0"),
    ]
    for ok, key, why in checks:
        if not ok:
            raise ConfigError(f"{key}: {why} (got {getattr_flat(cfg, key)!r})")
    try:
        resolve_targets(cfg.model.lora_target_modules)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    # Paired losses read pairs (checked against the files when they load); KTO reads its KL pairs;
    # BCE is BCO with delta = 0.
    data = dataclasses.replace(cfg.data, paired=cfg.data.paired or l.loss_type in PAIRED_LOSSES,
                               kl_pairs=cfg.data.kl_pairs or l.loss_type == "kto")
    loss = dataclasses.replace(l, reward_shift="none") if l.loss_type == "bce" else l
    return dataclasses.replace(cfg, data=data, loss=loss)


def getattr_flat(cfg: TrainConfig, key: str):
    section, _ = key_table()[key]
    return getattr(getattr(cfg, section), key)


def mesh_shape(cfg: TrainConfig) -> tuple[int, int, int]:
    return tuple(int(x) for x in cfg.run.mesh.split(","))


def run_name(cfg: TrainConfig) -> str:
    """A deterministic name from model, data and loss (no timestamps): re-running resumes, also with
    other operational keys (a longer max_steps, another mesh, ...)."""
    model = Path(cfg.model.model or "oracle-sft").name or "model"
    data = "+".join(Path(p.rstrip("/")).stem for p in cfg.data.train_data) or "oracle-feedback"
    what = {k: v for k, v in cfg.flat().items() if (k not in OPERATIONAL_KEYS or k in _NAMING_KEYS)
            and not (k in _LATER_KEYS and v == _LATER_KEYS[k])}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9._+-]", "_", f"{model}-{data}-{cfg.loss.loss_type}-{digest}")[:120]


def resume_differences(saved: dict, current: dict) -> list[str]:
    """`key: old -> new` for every key outside OPERATIONAL_KEYS whose value differs between a
    checkpoint's flat config and this run's (keys one of them lacks, from another version, are skipped)."""
    saved, current = (json.loads(json.dumps(c, default=str)) for c in (saved, current))
    return [f"{k}: {saved[k]!r} -> {current[k]!r}" for k in sorted(set(saved) & set(current))
            if k not in OPERATIONAL_KEYS and saved[k] != current[k]]


def _help_text(f: dataclasses.Field) -> str:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return f"{f.metadata['help']} (default: {default})"


_NEGATIVE = re.compile(r"-(\d|\.\d|inf|nan)", re.IGNORECASE)


def _join_negative_values(argv: list[str]) -> list[str]:
    """`--mesh -1,1,1` -> `--mesh=-1,1,1`: argparse would read a value starting with '-' as a flag."""
    out = []
    for token in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and _NEGATIVE.match(token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def parse_args(argv: list[str] | None = None, prog: str = "python -m bco_jax.train",
               defaults: dict | None = None) -> TrainConfig:
    """`[--config FILE.yaml] [--key value ...]`: flags override the file, which overrides `defaults`
    (e.g. the embedded demo's settings); --help lists every key."""
    import sys

    argv = _join_negative_values(list(sys.argv[1:] if argv is None else argv))
    parser = argparse.ArgumentParser(prog=prog, description="Align a causal LM with BCO (or DPO, IPO, NCA, "
                                     "KTO, BCE) from thumbs-up / thumbs-down feedback.",
                                     argument_default=argparse.SUPPRESS, allow_abbrev=False)
    parser.add_argument("--config", help="YAML file of keys (flat, or grouped under model/loss/optim/run/data)")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        for f in dataclasses.fields(cls):
            group.add_argument(f"--{f.name}", metavar="VALUE", help=_help_text(f))
    for old in KEY_ALIASES:
        parser.add_argument(f"--{old}", metavar="VALUE", help=argparse.SUPPRESS)
    parsed, unknown = parser.parse_known_args(argv)
    for token in unknown:
        if token.startswith("--"):
            build_config({token[2:].split("=")[0]: None})  # raises, naming the key and close matches
        raise ConfigError(f"unexpected argument {token!r}: keys are given as --key value")
    args = vars(parsed)
    values = dict(defaults or {})
    config_file = args.pop("config", None)
    if config_file:
        try:
            doc = yaml.load(Path(config_file).read_text(), Loader=_UniqueKeyLoader)
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"--config {config_file}: cannot read ({_one_line(err)})") from None
        except ConfigError as err:
            raise ConfigError(f"--config {config_file}: {err}") from None
        if doc is not None and not isinstance(doc, dict):
            raise ConfigError(f"--config {config_file}: expected a mapping of keys")
        values.update(_flatten_yaml(doc, config_file))
    values.update(args)
    return build_config(values)


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())
