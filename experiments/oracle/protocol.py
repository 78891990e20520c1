"""The tuning protocol's settings and decisions: tasks, methods, the learning-rate grid, how a rate is
selected, and which runs the test phases make. Pure functions of the finished runs, so an interrupted
protocol resumes to the same decisions."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import ModuleType

# One budget for every method: 200 AdamW steps, 10% warmup then linear decay, 64 sequences per step
# (64 examples for unpaired losses, 32 pairs for DPO / IPO / NCA), beta 0.1 unless the beta phase says otherwise.
BETA = 0.1
SEQUENCES_PER_STEP = 64
WARMUP_RATIO = 0.1
SCHEDULE = "linear"
MAX_LENGTH = 16  # answers are <= 11 tokens with their prompt; the default 64 only adds masked padding
MAX_NEW_TOKENS = 5
TEST_SAMPLES = 4  # per test prompt: 300 x 4 = 1,200 samples for the success rate and the KL
VAL_SAMPLES = 2  # per validation prompt: 400 x 2 = 800 samples for the grid's selection score
LIKERT_THRESHOLD = 4  # near misses count as good; not the paper's (top grade only: 5 here)
PAIRED_LOSSES = ("dpo", "ipo", "nca")
CURVE_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "delta", "grad_norm",
              "learning_rate", "logps/chosen", "logps/rejected")

# Half-decade ladder; the grid starts on LR_GRID and grows along the ladder at an edge.
LADDER = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
MAX_EXTENSIONS = 2  # per side
MISMATCH_STRENGTHS = (60, 80, 95)  # % of thumbs-up drawn from additions (and of thumbs-down from subtractions)


@dataclass(frozen=True)
class Method:
    data: str  # file in the task's feedback folder
    keys: dict  # trainer options
    what: str
    base: str | None = None  # a variant runs at its base method's selected rate


@dataclass(frozen=True)
class Task:
    name: str
    module: ModuleType  # reward, prompt_family, FAMILIES, split_prompts
    model_dir: str
    feedback_dir: str
    methods: dict = field(default_factory=dict)

    def base_methods(self) -> list[str]:
        return [m for m, spec in self.methods.items() if spec.base is None]

    def base_of(self, method: str) -> str:
        return self.methods[method].base or method


def method_table(mismatch: bool) -> dict:
    """Every method of a task by name; `mismatch`: with the prompt-mismatch variants (arithmetic only)."""
    bco = {"loss_type": "bco"}
    methods = {
        "dpo": Method("paired.jsonl", {"loss_type": "dpo"}, "DPO on paired.jsonl"),
        "ipo": Method("paired.jsonl", {"loss_type": "ipo"}, "IPO on paired.jsonl"),
        "nca": Method("paired.jsonl", {"loss_type": "nca"}, "NCA on paired.jsonl"),
        "bco_pairs": Method("paired.jsonl", bco, "BCO on the same pairs read unpaired (2 rows per pair)"),
        "bco": Method("binary.jsonl", bco, "BCO on binary.jsonl (thumbs-up/down), EMA reward shift"),
        "bce": Method("binary.jsonl", {"loss_type": "bce"}, "BCE (BCO with delta = 0) on binary.jsonl"),
        "kto": Method("binary.jsonl", {"loss_type": "kto"}, "KTO on binary.jsonl"),
        "bco_likert": Method("likert.jsonl", {**bco, "rating_threshold": LIKERT_THRESHOLD},
                             f"BCO on likert.jsonl, thumbs-up iff rating >= {LIKERT_THRESHOLD}"),
        "bco_trl_shift": Method("binary.jsonl", {**bco, "reward_shift": "trl"},
                                "BCO on binary.jsonl, reward_shift=trl (running mean of all rewards)", "bco"),
    }
    for pct in MISMATCH_STRENGTHS if mismatch else ():
        data = "mismatch_binary.jsonl" if pct == 80 else f"mismatch_binary_{pct}.jsonl"
        methods[f"bco_mm{pct}"] = Method(data, bco, f"BCO, {pct}/{100 - pct} prompt mismatch, no UDM", "bco")
        methods[f"bco_mm{pct}_udm"] = Method(data, {**bco, "udm": True}, f"BCO, {pct}/{100 - pct} mismatch, UDM", "bco")
    return methods


def arithmetic() -> Task:
    from bco_jax import oracle
    from bco_jax.oracle import task

    return Task("arithmetic", task, oracle.MODEL_DIR, oracle.FEEDBACK_DIR, method_table(mismatch=True))


def interval() -> Task:
    from bco_jax import oracle
    from bco_jax.oracle import interval as task

    return Task("interval", task, oracle.INTERVAL_MODEL_DIR, oracle.INTERVAL_FEEDBACK_DIR, method_table(mismatch=False))


TASKS = {"arithmetic": arithmetic, "interval": interval}


def full_config(task: str) -> dict:
    return {"grid": list(LR_GRID), "max_extensions": MAX_EXTENSIONS, "grid_seeds": [100], "grid_steps": 200,
            "steps": 200, "seeds": [0, 1, 2, 3, 4], "betas": [0.05, 0.3], "beta_methods": ["bco", "bce"],
            "beta_seeds": [0, 1, 2], "methods": None}


def quick_config(task: str) -> dict:
    return {"grid": [1e-3, 3e-3], "max_extensions": 0, "grid_seeds": [100], "grid_steps": 30, "steps": 30,
            "seeds": [0], "betas": [0.3], "beta_methods": ["bco"], "beta_seeds": [0], "methods": ["bco", "bce"]}


def settings(task: Task, cfg: dict) -> dict:
    """What results.json must agree on to be resumed."""
    return {"task": task.name, "protocol": cfg, "beta": BETA, "sequences_per_step": SEQUENCES_PER_STEP,
            "warmup_ratio": WARMUP_RATIO, "schedule": SCHEDULE, "max_length": MAX_LENGTH,
            "test_samples_per_prompt": TEST_SAMPLES, "val_samples_per_prompt": VAL_SAMPLES,
            "likert_threshold": LIKERT_THRESHOLD, "model_dir": os.path.basename(os.path.dirname(task.model_dir))}


def make_run(phase: str, method: str, lr: float, beta: float, seed: int) -> dict:
    return {"phase": phase, "method": method, "lr": lr, "beta": beta, "seed": seed}


def run_key(run: dict) -> str:
    return f"{run['phase']}/{run['method']}/lr{run['lr']:g}/beta{run['beta']:g}/s{run['seed']}"


def _methods_of(task: Task, cfg: dict) -> list[str]:
    return [m for m in task.methods if cfg["methods"] is None or m in cfg["methods"]]


def base_methods(task: Task, cfg: dict) -> list[str]:
    return [m for m in task.base_methods() if m in _methods_of(task, cfg)]


# ------------------------------------------------------------------------------- grid and selection


def grid_scores(runs: list[dict], method: str, rates: list[float], cfg: dict) -> dict:
    """rate -> mean validation success over the grid trials; None where a trial is missing."""
    by = {(r["lr"], r["seed"]): r["val_success"] for r in runs
          if r.get("phase") == "grid" and r["method"] == method and r.get("status") == "ok"}
    scores = {}
    for lr in rates:
        vals = [by.get((lr, s)) for s in cfg["grid_seeds"]]
        scores[lr] = None if None in vals else sum(vals) / len(vals)
    return scores


def best_rate(scores: dict) -> float:
    """Highest score; a tie goes to the smaller rate (the more conservative update)."""
    return max(sorted(scores), key=lambda lr: (scores[lr], -lr))


def grid_rates(runs: list[dict], method: str, cfg: dict) -> list[float]:
    """The method's grid as far as its finished runs decide it: LR_GRID, plus the next ladder rate
    beyond an edge wherever the best rate sits on that edge (MAX_EXTENSIONS per side)."""
    rates, added = list(cfg["grid"]), {"low": 0, "high": 0}
    while True:
        scores = grid_scores(runs, method, rates, cfg)
        if None in scores.values():
            return rates
        best, i = best_rate(scores), LADDER.index(best_rate(scores))
        if best == rates[0] and i > 0 and added["low"] < cfg["max_extensions"]:
            rates.insert(0, LADDER[i - 1])
            added["low"] += 1
        elif best == rates[-1] and i + 1 < len(LADDER) and added["high"] < cfg["max_extensions"]:
            rates.append(LADDER[i + 1])
            added["high"] += 1
        else:
            return rates


def selected_rates(runs: list[dict], task: Task, cfg: dict) -> dict:
    """method -> selected learning rate, for every method (a variant takes its base method's)."""
    chosen = {}
    for method in base_methods(task, cfg):
        scores = grid_scores(runs, method, grid_rates(runs, method, cfg), cfg)
        done = {lr: s for lr, s in scores.items() if s is not None}
        if done:
            chosen[method] = best_rate(done)
    return {m: chosen[task.base_of(m)] for m in task.methods if task.base_of(m) in chosen}


def test_runs(task: Task, selected: dict, cfg: dict) -> list[dict]:
    """The test phases in the order they run: every method on every seed (seed-major, mismatch rows
    last within a seed), then the beta sweep."""
    methods = [m for m in _methods_of(task, cfg) if m in selected]
    runs = [make_run("test", m, selected[m], BETA, seed) for seed in cfg["seeds"] for m in methods]
    runs += [make_run("test", m, selected[m], beta, seed) for seed in cfg["beta_seeds"]
             for m in cfg["beta_methods"] if m in selected for beta in cfg["betas"]]
    return runs
