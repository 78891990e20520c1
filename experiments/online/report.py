"""Tables, corrected verdicts and the figure of the online protocol (experiments/online/protocol.py).

Every interval reported here is a paired 95% t-interval over the test seeds; the family of all of them
(each method against online BCO, and each method's gain over the starting model, on both tasks) is
corrected with Holm's step-down procedure, and a verdict is read from the adjusted p-value.
"""
from __future__ import annotations

import json
import os

import numpy as np

from experiments.oracle import protocol as P
from experiments.oracle.stats import corrected_verdict, holm, paired_interval

FIGURE = "results_online.png"
# The verdicts docs/results.md states, pinned so that a rerun that changes one fails --check:
# (task, claim) -> verdict after Holm.
PINNED: dict[tuple[str, str], str] = {
    ("arithmetic", "online_bco > sft"): "held",
    ("arithmetic", "online_bco > offline_bco"): "inconclusive",
    ("arithmetic", "offline_bco > sft"): "held",
    ("arithmetic", "online_bco > offline_bco_4ep"): "inconclusive",
    ("arithmetic", "offline_bco_4ep > sft"): "held",
    ("arithmetic", "online_bco > online_bce"): "inconclusive",
    ("arithmetic", "online_bce > sft"): "held",
    ("arithmetic", "online_bco > online_kto"): "inconclusive",
    ("arithmetic", "online_kto > sft"): "held",
    ("arithmetic", "online_bco > online_dpo"): "inconclusive",
    ("arithmetic", "online_dpo > sft"): "held",
    ("arithmetic", "online_bco > grpo"): "inconclusive",
    ("arithmetic", "grpo > sft"): "held",
    ("interval", "online_bco > sft"): "held",
    ("interval", "online_bco > offline_bco"): "inconclusive",
    ("interval", "offline_bco > sft"): "held",
    ("interval", "online_bco > grpo"): "inconclusive",
    ("interval", "grpo > sft"): "held",
}


def load(folder: str) -> dict:
    out = {}
    for task in ("arithmetic", "interval"):
        path = os.path.join(folder, f"protocol_{task}.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                out[task] = json.load(f)
    return out


def test_values(results: dict, method: str, key: str = "success") -> dict:
    return {r["seed"]: r[key] for r in results["runs"]
            if r.get("phase") == "test" and r["method"] == method and r.get("status") == "ok"}


def methods_of(results: dict) -> list[str]:
    return results["settings"]["protocol"]["methods"]


def selected(results: dict) -> dict:
    from experiments.online.protocol import selected as pick

    return pick(results["runs"], results["settings"]["protocol"])


def claims(by_task: dict) -> list[dict]:
    """Every interval of the section, with its Holm-adjusted p-value and verdict."""
    rows = []
    for task, results in by_task.items():
        bco, sft = test_values(results, "online_bco"), test_values(results, "sft")
        for method in methods_of(results):
            mine = test_values(results, method)
            pairs = [("online_bco", bco, method, mine)] if method != "online_bco" else []
            pairs.append((method, mine, "sft", sft))
            for a_name, a, b_name, b in pairs:
                seeds = sorted(set(a) & set(b))
                ci = paired_interval([a[s] for s in seeds], [b[s] for s in seeds])
                rows.append({"task": task, "claim": f"{a_name} > {b_name}", "interval": ci})
    for row, adjusted in zip(rows, holm([r["interval"].p for r in rows])):
        row.update(adjusted_p=adjusted, verdict=corrected_verdict(row["interval"], adjusted),
                   uncorrected=row["interval"].verdict())
    return rows


def _ms(values) -> str:
    v = np.asarray(list(values), float)
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v.mean():.3f}" if len(v) else "-"


def grid_table(task: str, results: dict) -> str:
    cfg, runs = results["settings"]["protocol"], results["runs"]
    rates = sorted({lr for m in methods_of(results) for lr in P.grid_rates(runs, m, cfg)})
    chosen = selected(results)
    lines = [f"| {task}: validation success | " + " | ".join(f"{lr:g}" for lr in rates) + " |",
             "|---" * (len(rates) + 1) + "|"]
    for method in methods_of(results):
        scores = P.grid_scores(runs, method, rates, cfg)
        cells = ["-" if scores[lr] is None else (f"**{scores[lr]:.3f}**" if lr == chosen.get(method)
                                                 else f"{scores[lr]:.3f}") for lr in rates]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def test_table(task: str, results: dict) -> str:
    chosen = selected(results)
    lines = [f"| {task} | lr | test success | KL to start (nats) | thumbs-up, last round | judged answers |",
             "|---|---|---|---|---|---|"]
    for method in ["sft", *methods_of(results)]:
        runs = [r for r in results["runs"] if r.get("phase") == "test" and r["method"] == method
                and r.get("status") == "ok"]
        if not runs:
            continue
        last = [r["thumbs_up_rate"][-1] for r in runs if r.get("thumbs_up_rate")]
        lines.append(f"| {method} | {chosen.get(method, 0):g} | {_ms(r['success'] for r in runs)} | "
                     f"{_ms(r['kl'] for r in runs)} | {_ms(last)} | "
                     f"{runs[0].get('judged_answers', '-')} |")
    return "\n".join(lines)


def claims_table(rows: list[dict]) -> str:
    lines = ["| task | claim | difference [95% CI] | p | Holm p | verdict (Holm) | uncorrected |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = r["interval"]
        lines.append(f"| {r['task']} | {r['claim']} | {ci} | {ci.p:.4f} | {r['adjusted_p']:.4f} | "
                     f"{r['verdict']} | {r['uncorrected']} |")
    return "\n".join(lines)


def markdown(by_task: dict) -> str:
    parts = []
    for task, results in by_task.items():
        parts += [grid_table(task, results), test_table(task, results)]
    parts.append(claims_table(claims(by_task)))
    walls = {task: sum(e.get("wall_seconds", 0) for e in r["environments"]) / 60 for task, r in by_task.items()}
    parts.append("Wall time: " + ", ".join(f"{t} {w:.1f} min" for t, w in walls.items()) + " (2 shared cores).")
    return "\n\n".join(parts) + "\n"


def figure(by_task: dict, folder: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(by_task), figsize=(6.5 * len(by_task), 8.5), squeeze=False)
    for col, (task, results) in enumerate(by_task.items()):
        top, bottom = axes[0][col], axes[1][col]
        for i, method in enumerate(["sft", *methods_of(results)]):
            runs = [r for r in results["runs"] if r.get("phase") == "test" and r["method"] == method
                    and r.get("status") == "ok"]
            if not runs:
                continue
            color = f"C{i}"
            kl, s = np.array([r["kl"] for r in runs]), np.array([r["success"] for r in runs])
            top.scatter(kl, s, color=color, alpha=0.35, s=14)
            top.errorbar(kl.mean(), s.mean(), xerr=kl.std(ddof=1) if len(kl) > 1 else 0,
                         yerr=s.std(ddof=1) if len(s) > 1 else 0, fmt="o", color=color, capsize=3, label=method)
            curves = [r["thumbs_up_rate"] for r in runs if r.get("thumbs_up_rate")]
            if curves and len(curves[0]) > 1:
                bottom.plot(np.arange(1, len(curves[0]) + 1), np.mean(curves, axis=0), color=color, label=method)
        top.set(xlabel="KL(policy || start), nats per answer", ylabel="oracle success, test prompts (T=1)",
                title=f"{task}: success vs KL (dots: seeds; bars: mean ± sd)")
        bottom.set(xlabel="round", ylabel="judge's thumbs-up rate on the round's fresh samples",
                   title=f"{task}: the optimised quantity, mean over seeds")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(folder, FIGURE)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def check(by_task: dict) -> list[str]:
    """The pinned verdicts that no longer hold (empty: all hold)."""
    got = {(r["task"], r["claim"]): r["verdict"] for r in claims(by_task)}
    return [f"{task} {claim}: pinned {want}, now {got.get((task, claim))}" for (task, claim), want in PINNED.items()
            if got.get((task, claim)) != want]


def main(folder: str, docs: str, *, check_only: bool = False) -> int:
    by_task = load(folder)
    if not by_task:
        raise SystemExit(f"error: no protocol_<task>.json in {folder}; run the protocol first")
    if check_only:
        broken = check(by_task)
        print("\n".join(broken) or f"all {len(PINNED)} pinned verdicts hold")
        return int(bool(broken))
    text = markdown(by_task)
    with open(os.path.join(folder, "table.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    print("figure:", figure(by_task, docs))
    return 0
