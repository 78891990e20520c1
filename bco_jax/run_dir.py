"""The run directory: every path a run writes or reads under its output_dir, named once.

    out = RunDir(output_dir)
    out.checkpoints, out.metrics, out.hf, out.reference_record, ...

Every module asks `RunDir` for a path; the file names below appear nowhere else in the package.
A finished run's folder holds:

    bco_jax_run.txt                     the mark of a run folder, written before anything else
    config.json, config_history.jsonl   the latest start's config; one line per start
    metrics.jsonl, tensorboard/         logged records (and TensorBoard scalars)
    checkpoints/<step>/                 Orbax checkpoints (bco_jax.checkpoint)
    model/                              the policy's config and tokenizer, so a resume needs no --model
    reference/{params,hf,reference.json}  the reference weights (Orbax), config, and what they are
    reference_logps-*.npy               precomputed reference log-probs (precompute_ref_log_probs)
    bco_state.json, hf/, adapter/       the final delta and beta, the exported policy, its PEFT adapters
    demo_before.json                    the embedded demo's scores before training
    eval.json, eval_samples.jsonl       `python -m bco_jax.evaluate`'s report and samples

`check_output_dir` is the one ownership rule of the folders a command writes: a new or empty folder,
or a run; never a folder it reads; anything else only with `overwrite_output_dir`.
"""
from __future__ import annotations

import dataclasses
import json
import os

from bco_jax.config import TrainConfig, run_name
from bco_jax.errors import ConfigError

DEFAULT_PARENT = "outputs"  # where a run without output_dir goes: outputs/<run name>
CONFIG = "config.json"
CONFIG_HISTORY = "config_history.jsonl"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
MODEL_COPY = "model"
REFERENCE_COPY = "reference"
FINAL_STATE = "bco_state.json"  # beside hf/: what `python -m bco_jax.evaluate` needs
HF_EXPORT = "hf"
ADAPTER_EXPORT = "adapter"
DEMO_BEFORE = "demo_before.json"
EVAL_REPORT = "eval.json"
RUN_MARKER = "bco_jax_run.txt"  # written first by every start: the folder is a run
SAMPLES_SUFFIX = "_samples.jsonl"  # beside an evaluation report: eval.json -> eval_samples.jsonl


@dataclasses.dataclass(frozen=True)
class RunDir:
    """Paths under one output_dir (`root`); nothing is created or read here."""
    root: str

    @classmethod
    def for_config(cls, cfg: TrainConfig) -> RunDir:
        """The run's folder: output_dir, or outputs/<run name> when none is given."""
        return cls(cfg.run.output_dir or os.path.join(DEFAULT_PARENT, run_name(cfg)))

    def _join(self, *names: str) -> str:
        return os.path.join(self.root, *names)

    # -- what every start writes
    @property
    def config(self) -> str:
        return self._join(CONFIG)

    @property
    def config_history(self) -> str:
        return self._join(CONFIG_HISTORY)

    @property
    def metrics(self) -> str:
        return self._join(METRICS)

    @property
    def tensorboard(self) -> str:
        return self._join(TENSORBOARD)

    @property
    def checkpoints(self) -> str:
        return self._join(CHECKPOINTS)

    # -- the copies a resume reads when the original model folders are gone
    @property
    def model_copy(self) -> str:
        """The policy's config.json and tokenizer (no weights: those are in the checkpoints)."""
        return self._join(MODEL_COPY)

    @property
    def reference_copy(self) -> str:
        return self._join(REFERENCE_COPY)

    @property
    def reference_params(self) -> str:
        """The reference weights, an Orbax checkpoint (an absolute path: Orbax wants one)."""
        return os.path.abspath(self._join(REFERENCE_COPY, "params"))

    @property
    def reference_hf(self) -> str:
        """The reference's config.json (no weights)."""
        return self._join(REFERENCE_COPY, "hf")

    @property
    def reference_record(self) -> str:
        """Path, fingerprint and dtype of the saved reference; written last, it marks the copy complete."""
        return self._join(REFERENCE_COPY, "reference.json")

    def reference_logps(self, reference_id: str, dtypes: str, data_id: str) -> str:
        """The cache of one dataset's precomputed reference log-probs, named by what they depend on."""
        return self._join(f"reference_logps-{reference_id}-{dtypes}-{data_id}.npy")

    # -- what a finished run leaves
    @property
    def final_state(self) -> str:
        return self._join(FINAL_STATE)

    @property
    def hf(self) -> str:
        """The exported policy, an HF folder."""
        return self._join(HF_EXPORT)

    @property
    def adapter(self) -> str:
        """With use_peft: the adapters alone, a PEFT folder."""
        return self._join(ADAPTER_EXPORT)

    @property
    def demo_before(self) -> str:
        return self._join(DEMO_BEFORE)

    @property
    def eval_report(self) -> str:
        """`python -m bco_jax.evaluate`'s report when no --output is given."""
        return self._join(EVAL_REPORT)


def samples_path(report: str) -> str:
    """The sampled completions' JSONL beside an evaluation report (`x.json` -> `x_samples.jsonl`)."""
    return os.path.splitext(report)[0] + SAMPLES_SUFFIX


def overlap(a: str, b: str) -> str | None:
    """How path `a` lies relative to path `b`: "is", "is inside", "contains", or None (apart)."""
    a, b = os.path.realpath(a), os.path.realpath(b)
    return ("is" if a == b else "is inside" if a.startswith(b.rstrip(os.sep) + os.sep) else
            "contains" if b.startswith(a.rstrip(os.sep) + os.sep) else None)


def is_run(folder: str) -> bool:
    """Whether `folder` is a bco-jax run: it holds the marker every start writes first, or (runs from
    before the marker) its config history."""
    return os.path.exists(os.path.join(folder, RUN_MARKER)) or os.path.exists(os.path.join(folder, CONFIG_HISTORY))


def is_model_folder(folder: str) -> bool:
    """Whether `folder` looks like a model a user owns: a config.json beside weights or a tokenizer,
    or a GGUF file."""
    try:
        names = set(os.listdir(folder))
    except OSError:
        return False
    return any(n.endswith(".gguf") for n in names) or ("config.json" in names and any(
        n.endswith((".safetensors", ".bin")) or n.startswith("tokenizer") for n in names))


def check_output_dir(cfg: TrainConfig, output_dir: str) -> None:
    """The ownership rule of every command that writes a run folder (train, online): `output_dir` is
    a folder that does not exist yet, an empty one, or a bco-jax run (resumed); anything else the
    user owns is refused unless `overwrite_output_dir`. It never overlaps a folder the run reads
    (model, ref_model, lora_adapter), overwrite or not. Checks only: nothing is created here."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ConfigError(f"output_dir: {output_dir} is a file, not a folder")
    for key in ("model", "ref_model", "lora_adapter"):
        path = getattr(cfg.model, key)
        relation = overlap(output_dir, path) if path and os.path.exists(path) else None
        if relation:
            raise ConfigError(f"output_dir: {output_dir} {relation} the {key} folder {path}; the run would "
                              "overwrite its files: choose another output_dir")
    if not os.path.isdir(output_dir):
        return
    if is_run(output_dir):
        check_run_records(output_dir)
        return
    try:
        names = sorted(os.listdir(output_dir))
    except OSError as err:
        raise ConfigError(f"output_dir: cannot read {output_dir} ({err.strerror or err})") from None
    if names and not cfg.run.overwrite_output_dir:
        what = "an HF model folder" if is_model_folder(output_dir) else "not empty and not a bco-jax run"
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise ConfigError(f"output_dir: {output_dir} is {what} (it holds {shown}); choose another output_dir, "
                          "or pass --overwrite_output_dir true to write into it")


def check_run_records(output_dir: str) -> None:
    """The records a resume reads (config_history.jsonl, reference/reference.json) are JSON objects,
    one per line: a damaged one is named with its line, before anything is read or written."""
    out = RunDir(output_dir)
    for path, lines in ((out.config_history, True), (out.reference_record, False)):
        if not os.path.exists(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                texts = [t for t in f.read().splitlines() if t.strip()] if lines else [f.read()]
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"output_dir: cannot read {path} ({err})") from None
        for number, text in enumerate(texts, 1):
            try:
                ok = isinstance(json.loads(text), dict)
            except ValueError:
                ok = False
            if not ok:
                where = f"{path} line {number}" if lines else path
                raise ConfigError(f"output_dir: {where} is not a JSON record: this run's own record is damaged "
                                  "(repair or remove it, or choose another output_dir)")


def claim_output_dir(output_dir: str) -> None:
    """Create `output_dir` (if needed) and mark it a bco-jax run: the first write of a start, after
    every input is checked. A folder that cannot be created or written is a ConfigError naming it."""
    marker = os.path.join(output_dir, RUN_MARKER)
    if os.path.exists(marker):
        return
    try:
        os.makedirs(output_dir, exist_ok=True)
        with open(marker, "w", encoding="utf-8") as f:
            f.write("This folder is a bco-jax run: re-running its command resumes it.\n")
    except OSError as err:
        raise ConfigError(f"output_dir: cannot write into {output_dir} ({err.strerror or err})") from None
