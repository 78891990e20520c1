"""The run directory: every path a run writes or reads under its output_dir, named once.

    out = RunDir(output_dir)
    out.checkpoints, out.metrics, out.hf, out.reference_record, ...

Every module asks `RunDir` for a path; the file names below appear nowhere else in the package.
A finished run's folder holds:

    config.json, config_history.jsonl   the latest start's config; one line per start
    metrics.jsonl, tensorboard/         logged records (and TensorBoard scalars)
    checkpoints/<step>/                 Orbax checkpoints (bco_jax.checkpoint)
    model/                              the policy's config and tokenizer, so a resume needs no --model
    reference/{params,hf,reference.json}  the reference weights (Orbax), config, and what they are
    reference_logps-*.npy               precomputed reference log-probs (precompute_ref_log_probs)
    bco_state.json, hf/, adapter/       the final delta and beta, the exported policy, its PEFT adapters
    demo_before.json                    the embedded demo's scores before training
    eval.json, eval_samples.jsonl       `python -m bco_jax.evaluate`'s report and samples

`check_output_dir` keeps the run from writing over a model folder it reads.
"""
from __future__ import annotations

import dataclasses
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
