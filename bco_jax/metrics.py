"""What the user sees of a run: TRL-named metrics, metrics.jsonl, TensorBoard scalars, ROC AUC, the
progress bar.

The step returns sums and counts; the host turns a window of steps into TRL's metric names
(`rewards/chosen` is the mean reward of the thumbs-up examples in the window, and so on).
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np

from bco_jax.errors import TrainError, log
from bco_jax.files import atomic_write_text
from bco_jax.run_dir import RunDir

SUM_KEYS = ("rewards_sum/chosen", "rewards_sum/rejected", "logps_sum/chosen", "logps_sum/rejected",
            "count/chosen", "count/rejected", "tokens", "skipped")


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve: P(score of a random positive > score of a random negative), ties 1/2.
    NaN when a class is absent."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # Average ranks over ties (the Mann-Whitney statistic).
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


class Window:
    """Accumulates step metrics between two logging points."""

    def __init__(self):
        self.sums, self.means, self.steps = {}, {}, 0

    def add(self, metrics: dict) -> None:
        if float(metrics.get("skipped", 0)):
            # A skipped step's NaNs would poison the window's means: count it, log nothing else of it.
            self.sums["skipped"] = self.sums.get("skipped", 0.0) + 1.0
            return
        self.steps += 1
        for key, value in metrics.items():
            value = float(value)
            if key in SUM_KEYS:
                self.sums[key] = self.sums.get(key, 0.0) + value
            else:
                self.means.setdefault(key, []).append(value)

    def summary(self) -> dict:
        """TRL's names. Per-class means are over the window's examples of that class and are absent
        when the window held none (as TRL); loss and delta are means over the window's steps;
        learning_rate and grad_norm are the last step's (as transformers' Trainer logs them)."""
        out = {}
        for key, values in self.means.items():
            out[key] = values[-1] if key in ("learning_rate", "grad_norm") else float(np.mean(values))
        s = self.sums
        for side in ("chosen", "rejected"):
            n = s.get(f"count/{side}", 0.0)
            out[f"count/{side}"] = n
            if n > 0:
                out[f"rewards/{side}"] = s[f"rewards_sum/{side}"] / n
                out[f"logps/{side}"] = s[f"logps_sum/{side}"] / n
        if "rewards/chosen" in out and "rewards/rejected" in out:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        out["skipped_steps"] = s.get("skipped", 0.0)
        out["tokens"] = s.get("tokens", 0.0)
        return out


def eval_summary(rewards, labels, mask, loss_sum, n_rows, delta) -> dict:
    """eval_ metrics from per-row rewards: accuracy of sign(reward - delta), AUC, class means."""
    rewards, labels, mask = (np.asarray(x) for x in (rewards, labels, mask))
    rewards, labels = rewards[mask.astype(bool)], labels[mask.astype(bool)].astype(bool)
    out = {"eval_loss": float(loss_sum) / max(n_rows, 1), "eval_delta": float(delta),
           "eval_reward_accuracy": float(np.mean((rewards > delta) == labels)) if len(rewards) else math.nan,
           "eval_reward_auc": roc_auc(rewards, labels),
           "eval_count/chosen": int(labels.sum()), "eval_count/rejected": int((~labels).sum())}
    if labels.any():
        out["eval_rewards/chosen"] = float(rewards[labels].mean())
    if (~labels).any():
        out["eval_rewards/rejected"] = float(rewards[~labels].mean())
    if labels.any() and (~labels).any():
        out["eval_rewards/margins"] = out["eval_rewards/chosen"] - out["eval_rewards/rejected"]
    return out


def json_line(record: dict) -> str:
    """One strict-JSON line: a NaN or inf (an AUC over one class, a diverged loss) becomes null."""
    def finite(value):
        if isinstance(value, (float, np.floating)):
            return float(value) if math.isfinite(value) else None
        return value

    return json.dumps({k: finite(v) for k, v in record.items()}, sort_keys=True, allow_nan=False)


class MetricsWriter:
    """One JSON line per record in output_dir/metrics.jsonl, and TensorBoard scalars."""

    def __init__(self, output_dir: str, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self._file = open(RunDir(output_dir).metrics, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(RunDir(output_dir).tensorboard)

    def write(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **record}
        self._file.write(json_line(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()


class Reporter:
    """Turns step metrics into logged records: window sums, TRL names, tokens/s, progress bar.
    `epoch_length`: examples per epoch; `max_nonfinite_steps`: skipped steps in a row that stop the run."""

    def __init__(self, writer: MetricsWriter, *, total: int, start: int, batch_size: int, epoch_length: int,
                 logging_steps: int, max_nonfinite_steps: int, show: bool):
        self.writer, self.total, self.batch_size, self.epoch_length = writer, total, batch_size, epoch_length
        self.logging_steps, self.max_nonfinite_steps = logging_steps, max_nonfinite_steps
        self.window, self.last, self.t0 = Window(), {}, time.perf_counter()
        self.bar, self.show = None, show
        if show:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                            disable=None)  # None: no bar when stderr is not a terminal (CI logs)

    def add(self, step: int, metrics) -> None:
        metrics = jax.device_get(metrics)
        if int(metrics["skipped"]):
            log.warning("step %d: non-finite loss or gradients, update skipped", step)
        if int(metrics.pop("nonfinite_in_row")) >= self.max_nonfinite_steps:
            raise TrainError(f"{self.max_nonfinite_steps} non-finite steps in a row at step {step}: "
                             "stopping (the last checkpoint is kept); lower learning_rate or check the data")
        self.window.add(metrics)
        if self.bar is not None:
            rate = self.window.sums.get("tokens", 0.0) / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", delta=f"{float(metrics['delta']):.4f}",
                                 tok_s=f"{rate:.0f}")
        if step % self.logging_steps == 0 or step == self.total:
            self.flush(step)

    def flush(self, step: int) -> None:
        if not self.window.steps:
            return
        record = self.window.summary()
        elapsed = time.perf_counter() - self.t0
        record["tokens_per_second"] = record.pop("tokens") / max(elapsed, 1e-9)
        record["epoch"] = step * self.batch_size / max(self.epoch_length, 1)
        self.writer.write(step, record)
        if self.show and (self.bar is None or self.bar.disable):  # no terminal: a log line instead
            log.info("step %d/%d: %s", step, self.total, progress_text(record))
        self.last, self.window, self.t0 = record, Window(), time.perf_counter()

    def close(self):
        if self.bar is not None:
            self.bar.close()


def progress_text(record: dict) -> str:
    """`loss 0.6931 delta 0.0012 tokens/s 1234` (what the progress bar shows), for logs."""
    parts = [f"{name} {record[key]:.4f}" for name, key in (("loss", "loss"), ("delta", "delta"))
             if isinstance(record.get(key), float)]
    parts.append(f"tokens/s {record.get('tokens_per_second', 0.0):.0f}")
    if record.get("skipped_steps"):
        parts.append(f"skipped {int(record['skipped_steps'])}")
    return " ".join(parts)


def truncate_metrics(output_dir: str, step: int, finished: bool, keep_start: bool = True) -> None:
    """A resumed run replays the steps after its checkpoint: drop their old records (and, when the
    run had finished, its final evaluation, which the resumed run writes again). `keep_start=False`:
    drop step `step`'s records too (a run starting over from step 0 writes them again)."""
    path = RunDir(output_dir).metrics
    if not os.path.exists(path):
        return

    def keep(line):
        try:  # a line torn by a crash mid-write (or not a record) is dropped
            record = json.loads(line)
            return record.get("step", 0) < step or (record.get("step", 0) == step and keep_start and not
                                                     (finished and "eval_loss" in record))
        except (ValueError, AttributeError, TypeError):
            log.warning("%s: dropping a line that is not a JSON record: %s", path, line.strip()[:80])
            return False

    with open(path, encoding="utf-8", errors="replace") as f:
        kept = [line for line in f if line.strip() and keep(line)]
    atomic_write_text(path, "".join(kept))
