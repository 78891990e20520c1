"""Tables, claims with paired intervals, plots and the pinned-verdict check, from a task's results.json."""
from __future__ import annotations

import json
import math
import os

import numpy as np

from experiments.oracle import protocol as P
from experiments.oracle.stats import INCONCLUSIVE, paired_interval

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = {"arithmetic": os.path.join(REPO, "experiments", "oracle", "results", "results.json"),
           "interval": os.path.join(REPO, "experiments", "interval", "results", "results.json")}

# (id, claim in words, a, b, metric, beta, is a claim of the paper). Each claim reads "a - b > 0" on
# the test prompts, paired by seed.
CLAIMS = [
    ("bco_gt_sft", "BCO on thumbs-up/down raises success over SFT", "bco", "sft", "success", P.BETA, True),
    ("bco_pairs_gt_sft", "BCO on pairs read unpaired raises success", "bco_pairs", "sft", "success", P.BETA, True),
    ("bco_likert_gt_sft", "BCO on thresholded Likert ratings raises success over SFT", "bco_likert", "sft", "success",
     P.BETA, True),
    ("bco_pairs_gt_dpo", "BCO on the pairs read unpaired beats DPO on the same pairs", "bco_pairs", "dpo", "success",
     P.BETA, True),
    ("bco_pairs_gt_ipo", "BCO on the pairs read unpaired beats IPO", "bco_pairs", "ipo", "success", P.BETA, True),
    ("bco_gt_kto", "BCO beats KTO on the same thumbs-up/down data", "bco", "kto", "success", P.BETA, True),
    ("bco_gt_bce", "the reward shift helps: BCO beats BCE (delta 0)", "bco", "bce", "success", P.BETA, True),
    ("bco_gt_bce_b0.05", "BCO beats BCE at beta 0.05", "bco", "bce", "success", 0.05, True),
    ("bco_gt_bce_b0.3", "BCO beats BCE at beta 0.3", "bco", "bce", "success", 0.3, True),
    *[(f"udm_gt_none_{pct}", f"UDM raises BCO's success under {pct}/{100 - pct} prompt mismatch", f"bco_mm{pct}_udm",
       f"bco_mm{pct}", "success", P.BETA, True) for pct in P.MISMATCH_STRENGTHS],
    *[(f"udm_sub_{pct}", f"UDM raises success on subtractions (where thumbs-down concentrate) at {pct}/{100 - pct}",
       f"bco_mm{pct}_udm", f"bco_mm{pct}", "success_sub", P.BETA, False) for pct in P.MISMATCH_STRENGTHS],
    ("nca_gt_bco_pairs", "NCA beats BCO on the same pairs", "nca", "bco_pairs", "success", P.BETA, False),
    ("bco_gt_trl", "the EMA class-mean shift beats TRL's running mean of all rewards", "bco", "bco_trl_shift",
     "success", P.BETA, False),
]
# Verdicts pinned by `--check`: those the full protocol of 2026-11-30 decided (docs/results.md); the
# inconclusive ones are not pinned, a rerun may tip them either way.
_H, _N = "held", "did not hold"
PINNED: dict = {
    "arithmetic": {"bco_gt_sft": _H, "bco_pairs_gt_sft": _H, "bco_likert_gt_sft": _H, "bco_pairs_gt_dpo": _H,
                   "bco_pairs_gt_ipo": _H, "bco_gt_kto": _H, "bco_gt_bce": _N, "bco_gt_bce_b0.3": _N,
                   "udm_gt_none_80": _N, "udm_gt_none_95": _N, "udm_sub_60": _H, "udm_sub_80": _H,
                   "nca_gt_bco_pairs": _H},
    "interval": {"bco_gt_sft": _H, "bco_pairs_gt_sft": _H, "bco_likert_gt_sft": _H, "bco_pairs_gt_dpo": _H,
                 "bco_pairs_gt_ipo": _H, "bco_gt_kto": _H, "bco_gt_bce": _N, "nca_gt_bco_pairs": _H},
}


def test_values(runs, method: str, metric: str, beta: float) -> dict:
    """seed -> metric of the method's finished test run at beta."""
    return {r["seed"]: r[metric] for r in runs if r.get("phase") == "test" and r["method"] == method
            and r.get("status") == "ok" and math.isclose(r["beta"], beta) and r.get(metric) is not None}


def claims(results) -> list[dict]:
    runs = results["runs"]
    out = []
    for cid, text, a, b, metric, beta, paper in CLAIMS:
        va = test_values(runs, a, metric, beta)
        vb = test_values(runs, b, metric, P.BETA if b == "sft" else beta)
        seeds = sorted(set(va) & set(vb))
        if not seeds:
            continue
        ci = paired_interval([va[s] for s in seeds], [vb[s] for s in seeds])
        out.append({"id": cid, "claim": text, "metric": metric, "a": a, "b": b, "beta": beta, "paper": paper,
                    "seeds": seeds, "interval": ci, "verdict": ci.verdict()})
    return out


# ------------------------------------------------------------------------------------------ tables


def _ms(values) -> str:
    v = np.asarray(list(values), float)
    return "-" if len(v) == 0 else f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def grid_table(results) -> str:
    grid = [r for r in results["runs"] if r.get("phase") == "grid" and r.get("status") == "ok"]
    if not grid:
        return ""
    task = P.TASKS[results["settings"]["task"]]()
    cfg = results["settings"]["protocol"]
    selected = P.selected_rates(results["runs"], task, cfg)
    rates = sorted({r["lr"] for r in grid})
    lines = ["| method | " + " | ".join(f"{lr:g}" for lr in rates) + " | selected |",
             "|---|" + "---|" * (len(rates) + 1)]
    for method in P.base_methods(task, cfg):
        scores = P.grid_scores(grid, method, rates, cfg)
        cells = []
        for lr in rates:
            s = scores[lr]
            cell = "" if s is None else f"{s:.3f}"
            cells.append(f"**{cell}**" if s is not None and lr == selected.get(method) else cell)
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {selected.get(method, '-'):g} |"
                     if method in selected else f"| {method} | " + " | ".join(cells) + " | - |")
    return "\n".join(lines) + "\n"


def test_table(results) -> str:
    runs, task = results["runs"], P.TASKS[results["settings"]["task"]]()
    fams = task.module.FAMILIES
    cols = ["success", *(f"success_{f}" for f in fams), "kl", "heldout_reward_accuracy", "heldout_reward_auc"]
    head = ["method", "lr", "seeds", "success", "vs SFT, paired [95% CI]", *fams, "KL to SFT", "reward acc.",
            "reward AUC", "final delta"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    sft = test_values(runs, "sft", "success", P.BETA)
    for method in ["sft", *task.methods]:
        rows = [r for r in runs if r.get("phase") == "test" and r["method"] == method and r.get("status") == "ok"
                and math.isclose(r["beta"], P.BETA)]
        if not rows:
            continue
        vals = {c: [r[c] for r in rows if r.get(c) is not None] for c in cols}
        mine = {r["seed"]: r["success"] for r in rows}
        seeds = sorted(set(mine) & set(sft))
        gain = "-" if method == "sft" else str(paired_interval([mine[s] for s in seeds], [sft[s] for s in seeds]))
        lr = "-" if method == "sft" else f"{rows[0]['lr']:g}"
        delta = "-" if method == "sft" else _ms(r["delta"] for r in rows)
        lines.append(f"| {method} | {lr} | {len(rows)} | {_ms(vals['success'])} | {gain} | "
                     + " | ".join(_ms(vals[c]) for c in cols[1:]) + f" | {delta} |")
    return "\n".join(lines) + "\n"


def claims_table(results) -> str:
    lines = ["| claim | paper's? | metric | a - b, mean [95% CI] | seeds | verdict |", "|---|---|---|---|---|---|"]
    for c in claims(results):
        verdict = c["verdict"] if c["verdict"] == INCONCLUSIVE else f"**{c['verdict']}**"
        lines.append(f"| {c['claim']} | {'yes' if c['paper'] else 'no'} | {c['metric']} | {c['interval']} | "
                     f"{len(c['seeds'])} | {verdict} |")
    return "\n".join(lines) + "\n"


def beta_table(results) -> str:
    runs = results["runs"]
    cfg = results["settings"]["protocol"]
    betas = sorted({P.BETA, *cfg["betas"]})
    seeds = set(cfg["beta_seeds"])
    lines = ["| method | " + " | ".join(f"beta {b:g}" for b in betas) + " |", "|---|" + "---|" * len(betas)]
    for m in cfg["beta_methods"]:
        cells = [_ms(v for s, v in test_values(runs, m, "success", b).items() if s in seeds) for b in betas]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if set(cfg["beta_methods"]) >= {"bco", "bce"}:
        cells = []
        for b in betas:
            va, vb = test_values(runs, "bco", "success", b), test_values(runs, "bce", "success", b)
            common = sorted(set(va) & set(vb) & seeds)
            cells.append(str(paired_interval([va[s] for s in common], [vb[s] for s in common])) if common else "-")
        lines.append("| BCO - BCE, paired [95% CI] | " + " | ".join(cells) + " |")
    for m in cfg["beta_methods"]:
        if m == "bce":
            continue  # its delta is 0 by definition
        cells = [_ms(v for s, v in test_values(runs, m, "delta", b).items() if s in seeds) for b in betas]
        lines.append(f"| {m}: final delta | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def mismatch_table(results) -> str:
    runs = results["runs"]
    lines = ["| thumbs-up from additions | no UDM: success (add / sub) | UDM: success (add / sub) | "
             "UDM - none, success [95% CI] | UDM - none, sub [95% CI] |", "|---|---|---|---|---|"]
    found = False
    for pct in P.MISMATCH_STRENGTHS:
        a, b = f"bco_mm{pct}_udm", f"bco_mm{pct}"
        cells = []
        for m in (b, a):
            s = test_values(runs, m, "success", P.BETA)
            if not s:
                break
            found = True
            cells.append(f"{_ms(s.values())} ({_ms(test_values(runs, m, 'success_add', P.BETA).values())} / "
                         f"{_ms(test_values(runs, m, 'success_sub', P.BETA).values())})")
        if len(cells) < 2:
            continue
        for metric in ("success", "success_sub"):
            va, vb = test_values(runs, a, metric, P.BETA), test_values(runs, b, metric, P.BETA)
            common = sorted(set(va) & set(vb))
            cells.append(str(paired_interval([va[s] for s in common], [vb[s] for s in common])))
        lines.append(f"| {pct}% | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" if found else ""


def mechanism_table(results) -> str:
    """Final-window values (last 10-step window) of BCO and BCE, mean over seeds."""
    keys = ("delta", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")
    lines = ["| method | " + " | ".join(keys) + " | success |", "|---|" + "---|" * (len(keys) + 1)]
    for m in ("bco", "bce"):
        rows = [r for r in results["runs"] if r.get("phase") == "test" and r["method"] == m and r.get("status") == "ok"
                and math.isclose(r["beta"], P.BETA) and r.get("curve")]
        if not rows:
            continue
        last = [r["curve"][-1] for r in rows]
        lines.append(f"| {m} | " + " | ".join(_ms(c.get(k, math.nan) for c in last) for k in keys)
                     + f" | {_ms(r['success'] for r in rows)} |")
    # Does delta's size track the gap? Every (seed, beta) where both ran: BCO's final delta against
    # BCO's success minus BCE's.
    pairs = []
    for beta in sorted({r["beta"] for r in results["runs"] if r.get("phase") == "test"}):
        runs = results["runs"]
        bco, bce = test_values(runs, "bco", "success", beta), test_values(runs, "bce", "success", beta)
        deltas = test_values(runs, "bco", "delta", beta)
        pairs += [(deltas[s], bco[s] - bce[s]) for s in sorted(set(bco) & set(bce))]
    if len(pairs) > 2:
        d, g = np.array(pairs).T
        lines.append(f"\nAcross the {len(pairs)} (seed, beta) pairs of BCO and BCE runs: BCO's final delta "
                     f"{d.min():+.2f} to {d.max():+.2f}, BCO - BCE success {g.min():+.3f} to {g.max():+.3f}, "
                     f"Pearson r(delta, gap) = {np.corrcoef(d, g)[0, 1]:+.2f}.")
    return "\n".join(lines) + "\n"


def markdown(results) -> str:
    name = results["settings"]["task"]
    parts = [f"# {name}: results of the tuning protocol\n", "## Grid (validation success, mean over trials)\n",
             grid_table(results), "## Test (selected rates, beta 0.1)\n", test_table(results),
             "## Claims (paired by seed, 95% t-intervals)\n", claims_table(results),
             "## Beta sweep (test success)\n", beta_table(results)]
    mm = mismatch_table(results)
    if mm:
        parts += ["## Prompt mismatch strengths\n", mm]
    parts += ["## Mechanism: last training window, BCO vs BCE\n", mechanism_table(results)]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------- plots


def _save(fig, folder: str, name: str) -> str:
    import matplotlib.pyplot as plt

    path = os.path.join(folder, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _finish(fig, ax, xlabel: str, ylabel: str, title: str, folder: str, name: str) -> str:
    """Labels, grid and legend of a one-panel figure, then `_save`."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, folder, name)


def grid_plot(results, folder: str) -> str:
    import matplotlib.pyplot as plt

    name = results["settings"]["task"]
    task, cfg = P.TASKS[name](), results["settings"]["protocol"]
    selected = P.selected_rates(results["runs"], task, cfg)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for method in P.base_methods(task, cfg):
        rates = P.grid_rates(results["runs"], method, cfg)
        scores = P.grid_scores(results["runs"], method, rates, cfg)
        xs = [lr for lr in rates if scores[lr] is not None]
        line, = ax.plot(xs, [scores[lr] for lr in xs], marker="o", label=method)
        if method in selected:
            ax.scatter([selected[method]], [scores[selected[method]]], s=120, facecolors="none",
                       edgecolors=line.get_color())
    ax.set_xscale("log")
    return _finish(fig, ax, "peak learning rate", "oracle success, validation prompts (T=1)",
                   f"{name}: learning-rate grid (circled: selected)", folder, f"results_{name}_grid.png")


def kl_plot(results, folder: str) -> str:
    import matplotlib.pyplot as plt

    name = results["settings"]["task"]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for method in ["sft", *P.TASKS[name]().methods]:
        rows = [r for r in results["runs"] if r.get("phase") == "test" and r["method"] == method
                and r.get("status") == "ok" and math.isclose(r["beta"], P.BETA)]
        if rows:
            kl, s = np.array([r["kl"] for r in rows]), np.array([r["success"] for r in rows])
            ax.errorbar(kl.mean(), s.mean(), xerr=kl.std(ddof=1) if len(kl) > 1 else 0,
                        yerr=s.std(ddof=1) if len(s) > 1 else 0, fmt="o", capsize=3, label=method)
    return _finish(fig, ax, "KL(policy || SFT), nats per answer", "oracle success, test prompts (T=1)",
                   f"{name}: success vs KL at the selected rates (mean ± std over seeds)", folder,
                   f"results_{name}_reward_vs_kl.png")


def mechanism_plot(by_task: dict, folder: str) -> str:
    """BCO vs BCE over training on every task: delta, class-mean implicit rewards, class-mean log-probs."""
    import matplotlib.pyplot as plt

    panels = [("delta", "reward shift delta"), ("rewards", "mean implicit reward (solid: up, dashed: down)"),
              ("logps", "mean log-prob (solid: up, dashed: down)")]
    fig, axes = plt.subplots(len(by_task), 3, figsize=(14, 3.6 * len(by_task)), squeeze=False)
    colors = {"bco": "tab:blue", "bce": "tab:orange"}
    for row, (name, results) in enumerate(by_task.items()):
        for m in ("bco", "bce"):
            curves = [r["curve"] for r in results["runs"] if r.get("phase") == "test" and r["method"] == m
                      and r.get("status") == "ok" and math.isclose(r["beta"], P.BETA) and r.get("curve")]
            if not curves:
                continue
            steps = [c["step"] for c in curves[0]]

            def mean(key, curves=curves, steps=steps):
                return np.nanmean([[c.get(key, np.nan) for c in cur[:len(steps)]] for cur in curves], axis=0)
            axes[row, 0].plot(steps, mean("delta"), color=colors[m], label=m)
            for col, prefix in ((1, "rewards"), (2, "logps")):
                axes[row, col].plot(steps, mean(f"{prefix}/chosen"), color=colors[m], label=f"{m} up")
                axes[row, col].plot(steps, mean(f"{prefix}/rejected"), color=colors[m], linestyle="--",
                                    label=f"{m} down")
        for col, (_, title) in enumerate(panels):
            axes[row, col].set_title(f"{name}: {title}", fontsize=9)
            axes[row, col].grid(alpha=0.3)
            axes[row, col].set_xlabel("optimizer step")
        axes[row, 0].legend(fontsize=7)
        axes[row, 1].legend(fontsize=7)
    fig.suptitle("BCO vs BCE over training (mean over test seeds, 10-step windows, beta 0.1)")
    return _save(fig, folder, "results_mechanism.png")


def write(results, task: str, out: str, plot_folder: str) -> None:
    text = markdown(results)
    with open(os.path.join(out, "table.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        print("matplotlib is not installed (pip install -r requirements-experiments.txt): no plots")
        return
    os.makedirs(plot_folder, exist_ok=True)
    paths = [grid_plot(results, plot_folder), kl_plot(results, plot_folder)]
    by_task = {}
    for name, path in RESULTS.items():  # the mechanism figure shows every task that has results
        if name == task:
            by_task[name] = results
        elif os.path.exists(path) and os.path.dirname(path) != out:
            with open(path, encoding="utf-8") as f:
                by_task[name] = json.load(f)
    paths.append(mechanism_plot(by_task, plot_folder))
    for p in paths:
        print("wrote", os.path.relpath(p, REPO))


def check(results, task: str) -> tuple[list[str], bool]:
    """Recompute every claim's verdict and compare with PINNED; also require that every run finished."""
    lines, failed = [], False
    bad = [f"{r['phase']}/{r['method']}/s{r['seed']}" for r in results["runs"] if r.get("status") != "ok"]
    if bad:
        lines.append(f"FAIL runs that did not finish: {bad}")
        failed = True
    pinned = PINNED.get(task, {})
    for c in claims(results):
        want = pinned.get(c["id"])
        ok = want is None or want == c["verdict"]
        failed |= not ok
        lines.append(f"{'PASS' if ok else 'FAIL'} {c['claim']}: {c['interval']} -> {c['verdict']}"
                     + ("" if want is None else f" (pinned: {want})"))
    if not pinned:
        lines.append("note: no verdicts are pinned for this task yet")
    return lines, failed
