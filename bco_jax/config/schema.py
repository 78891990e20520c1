"""The training configuration's schema: one frozen, typed dataclass per concern, flattened into one
namespace of keys.

Keys follow TRL's BCOConfig / transformers' TrainingArguments where a counterpart exists. Every option
appears once, here or in `bco_jax.data.config.DataConfig`, with its default and one line of doc. A
choice is typed `Literal[...]` (checked from its type by `bco_jax.config.validate`); the sections are
frozen: the loss section is the jit-static configuration of the step.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Literal

from bco_jax.data.config import DataConfig
from bco_jax.losses import DEFAULT_REWARD_SHIFT_DECAY, LossType, RewardShiftMode
from bco_jax.models.attention import ATTN_IMPLEMENTATIONS
from bco_jax.models.config import REMAT_POLICIES
from bco_jax.models.projections import PROJECTIONS

# The model's own lists of choices, as types.
RematPolicy = Literal[REMAT_POLICIES]
AttnImplementation = Literal[ATTN_IMPLEMENTATIONS]
# Old key names still read, with a warning: old -> new.
KEY_ALIASES = {"attention_impl": "attn_implementation"}


def _opt(default, doc: str):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": doc})
    return field(default=default, metadata={"help": doc})


@dataclass(frozen=True)
class ModelOptions:
    model: str = _opt("", "HF folder or GGUF file of the policy to align (empty: the shipped oracle-task SFT model)")
    ref_model: str | None = _opt(None, "HF folder or GGUF file of the frozen reference (default: model)")
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
        [], f"projections to adapt, PEFT names ({', '.join(p.peft for p in PROJECTIONS.values())}) "
            "or all-linear (empty: all of them)")
    lora_adapter: str | None = _opt(None, "a PEFT adapter folder to start from (None: fresh adapters)")
    load_in_8bit: bool = _opt(False, "with use_peft: hold the frozen base's projections in int8 (per-channel "
                                     "scales; QLoRA-style, about half the base's memory)")

    @property
    def separate_reference(self) -> bool:
        """Whether ref_model names another folder than model (with use_peft: a second model in memory)."""
        return separate_reference(self.model, self.ref_model)


@dataclass(frozen=True)
class LossOptions:
    loss_type: LossType = _opt("bco", "bco, bce (bco with delta = 0), dpo, ipo, nca (paired) or kto; online also "
                                      "grpo, dapo (GRPO, by TRL's aggregation names)")
    beta: float = _opt(0.1, "temperature of the implicit reward beta * (log pi - log pi_ref); for GRPO the KL "
                            "coefficient (online default 0.0, as TRL)")
    reward_shift: RewardShiftMode = _opt(
        "ema", "delta: ema (paper: midpoint of class-mean EMAs), ema_corrected (the same, EMAs bias-corrected "
               "as Adam's), trl (TRL's running mean), fixed (reward_shift_value), none")
    reward_shift_decay: float = _opt(
        DEFAULT_REWARD_SHIFT_DECAY, "EMA decay of the class means per optimizer step (reward_shift=ema, "
                                    "ema_corrected)")
    reward_shift_value: float = _opt(0.0, "the constant delta of reward_shift=fixed")
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
    overwrite_output_dir: bool = _opt(False, "write into an output_dir that is neither empty nor a bco-jax run "
                                             "(its files may be overwritten)")
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


@dataclass(frozen=True)
class OnlineOptions:
    """The online loop's keys (`python -m bco_jax.online`), named as TRL's GRPOConfig names them where
    it has them. Each round samples `num_generations` answers to each of `prompts_per_round` prompts
    from the current policy, judges them and trains `steps_per_round` optimizer steps on them."""
    prompts: list[str] = _opt([], "prompt sources (any format the data layer reads); other columns go to the judge")
    judge: str | None = _opt(None, "module:function (a TRL reward function works), or a built-in: "
                                   "arithmetic, interval, instructions")
    judge_threshold: float = _opt(0.5, "a judge's float score >= this is a thumbs-up")
    rounds: int = _opt(10, "rounds of sample -> judge -> train")
    prompts_per_round: int = _opt(16, "prompts sampled per round (all processes together)")
    num_generations: int = _opt(4, "answers sampled per prompt (K)")
    steps_per_round: int = _opt(1, "optimizer steps on each round's answers")
    max_completion_length: int = _opt(64, "tokens sampled per answer at most")
    temperature: float = _opt(1.0, "sampling temperature (0: greedy)")
    top_p: float = _opt(1.0, "nucleus sampling mass")
    epsilon: float = _opt(0.2, "GRPO's clip range of the policy ratio (steps_per_round > 1: later steps are clipped "
                               "against the round's sampling policy)")
    sync_ref_model: bool = _opt(False, "refresh the reference every ref_model_sync_steps optimizer steps to "
                                       "ref_model_mixup_alpha x policy + (1 - alpha) x reference (TRL's)")
    ref_model_sync_steps: int = _opt(512, "optimizer steps between reference refreshes (sync_ref_model)")
    ref_model_mixup_alpha: float = _opt(0.6, "the policy's weight in a reference refresh (sync_ref_model)")
    judge_timeout: float = _opt(0.0, "seconds a judge call may run before the run ends (exit 2); 0: no limit")


SECTIONS = {"model": ModelOptions, "loss": LossOptions, "optim": OptimOptions, "run": RunOptions,
            "data": DataConfig, "launch": LaunchOptions, "online": OnlineOptions}


@dataclass(frozen=True)
class TrainConfig:
    model: ModelOptions = field(default_factory=ModelOptions)
    loss: LossOptions = field(default_factory=LossOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    run: RunOptions = field(default_factory=RunOptions)
    data: DataConfig = field(default_factory=DataConfig)
    launch: LaunchOptions = field(default_factory=LaunchOptions)
    online: OnlineOptions = field(default_factory=OnlineOptions)

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


def field_type(section: str, key: str) -> object:
    """The resolved type of key `key` of section `section` (annotations are strings here)."""
    return typing.get_type_hints(SECTIONS[section])[key]


def help_text(f: dataclasses.Field) -> str:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return f"{f.metadata['help']} (default: {default})"


def separate_reference(model: str, ref_model: str | None) -> bool:
    """Whether `ref_model` names another folder (or config.json) than `model`: the reference is then
    a second model, not the policy's own starting weights (with use_peft: not the base)."""
    return bool(ref_model) and os.path.abspath(ref_model) != os.path.abspath(model)

