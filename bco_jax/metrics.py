"""What the user sees of a run: TRL-named metrics, metrics.jsonl, TensorBoard scalars, ROC AUC.

The step returns sums and counts; the host turns a window of steps into TRL's metric names
(`rewards/chosen` is the mean reward of the thumbs-up examples in the window, and so on).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

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


class MetricsWriter:
    """One JSON line per record in output_dir/metrics.jsonl, and TensorBoard scalars."""

    def __init__(self, output_dir: str, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self._file = open(os.path.join(output_dir, "metrics.jsonl"), "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def write(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **record}
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
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
