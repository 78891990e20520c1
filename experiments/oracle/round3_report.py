"""Tables, the equal-KL figure, Holm-corrected verdicts and the pinned-verdict check of evidence round 3
(experiments/oracle/round3.py), with round 2's claims in the same multiplicity family.

Every interval is a paired 95% t-interval over seeds. One family holds every interval reported from the
oracle tasks in rounds 2 and 3 (round 2's claims on both tasks and every comparison below); Holm's
step-down procedure adjusts their p-values and each verdict is read from the adjusted one, the
uncorrected verdict beside it.
"""
from __future__ import annotations

import itertools
import json
import os

import numpy as np

from experiments.oracle import protocol as P
from experiments.oracle import report as round2
from experiments.oracle import round3 as R
from experiments.oracle.stats import corrected_verdict, holm, paired_interval

REPO = round2.REPO
TABLE = os.path.join(R.RESULTS, "round3.md")
FIGURE = os.path.join(REPO, "docs", "results_round3.png")
# KL budgets for part 1, per task: chosen after seeing the range the runs' checkpoints span (every run
# passes through 1.5-3 nats on arithmetic and 2-6 on interval), so part 1 is exploratory; its intervals
# sit in the Holm family with the rest.
KL_BUDGETS = {"arithmetic": (1.5, 2.0, 2.5, 3.0), "interval": (2.0, 3.0, 4.0, 6.0)}
# The decided verdicts after Holm over the whole family, as docs/results.md states them:
# (round, task, claim id) -> verdict. Every other interval of the family is pinned inconclusive.
PINNED: dict[tuple[int, str, str], str] = {
    **{(2, t, c): "held" for t in ("arithmetic", "interval")
       for c in ("bco_gt_sft", "bco_pairs_gt_sft", "bco_likert_gt_sft", "nca_gt_bco_pairs")},
    (2, "arithmetic", "bco_pairs_gt_dpo"): "held", (2, "arithmetic", "bco_pairs_gt_ipo"): "held",
    (2, "arithmetic", "udm_gt_none_95"): "did not hold",
    **{(3, t, c): "held" for t in ("arithmetic", "interval") for c in ("success_rises_with_delta", "likert5_gt_sft")},
    **{(3, t, "fixed-1_gt_fixed0"): "did not hold" for t in ("arithmetic", "interval")},
    (3, "arithmetic", "fixed+0.5_gt_fixed0"): "held", (3, "arithmetic", "fixed-0.5_gt_fixed0"): "did not hold",
    (3, "arithmetic", "bco_gt_bce_kl3"): "did not hold", (3, "arithmetic", "bco_eq7_gt_bce"): "did not hold",
    (3, "arithmetic", "bco_ema_corrected_gt_bce"): "did not hold",
    (3, "interval", "regime0.0001_bco_gt_sft"): "held", (3, "interval", "redraw_bco_gt_bce"): "did not hold",
}
FAMILY_SIZE = 84  # 28 round-2 claims + 56 round-3 comparisons


def load() -> dict:
    out = {}
    for name in sorted(P.TASKS):
        path = os.path.join(R.RESULTS, f"round3_{name}.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                out[name] = json.load(f)
            with open(round2.RESULTS[name], encoding="utf-8") as f:
                out[name]["round2"] = json.load(f)
    return out


def values(data: dict, part: str, method: str, key: str = "success", lr: float | None = None) -> dict:
    """seed -> `key` of a part's finished runs; part "round2" reads round 2's test runs at beta 0.1."""
    if part == "round2":
        return round2.test_values(data["round2"]["runs"], method, key, P.BETA)
    return {r["seed"]: r[key] for r in data["runs"] if r["phase"] == part and r["method"] == method
            and r.get("status") == "ok" and (lr is None or np.isclose(r["lr"], lr))}


def _ms(v: dict) -> str:
    return round2._ms(v.values())


# ---------------------------------------------------------------------------------- comparisons


def best_within(curve: list[dict], budget: float) -> float:
    """The best success a run reaches at KL <= budget: over its scored checkpoints and the straight
    segments between consecutive ones (read at the budget where a segment crosses it). A run's KL to SFT
    is not monotone in steps (it overshoots early, then falls back while success climbs), so "the
    success at the first crossing" would compare the runs' early, near-identical phase; the budgeted
    best compares what each method reaches within the same movement. Step 0 (SFT, KL 0) is a point."""
    best = max(p["success"] for p in curve if p["kl"] <= budget)
    for a, b in itertools.pairwise(curve):
        if min(a["kl"], b["kl"]) < budget < max(a["kl"], b["kl"]):
            w = (budget - a["kl"]) / (b["kl"] - a["kl"])
            best = max(best, (1 - w) * a["success"] + w * b["success"])
    return best


def comparisons(by_task: dict) -> list[dict]:
    """Every round-3 interval: (task, id, claim, a values, b values)."""
    out = []

    def add(name, cid, text, va, vb):
        seeds = sorted(set(va) & set(vb))
        if len(seeds) >= 2:
            out.append({"task": name, "id": cid, "claim": text, "seeds": seeds,
                        "interval": paired_interval([va[s] for s in seeds], [vb[s] for s in seeds])})

    for name, data in by_task.items():
        curves = {m: values(data, "curves", m, "kl_curve") for m in ("bco", "bce")}
        for budget in KL_BUDGETS.get(name, ()):
            add(name, f"bco_gt_bce_kl{budget:g}", f"within KL {budget:g}: BCO's best beats BCE's",
                *({s: best_within(c, budget) for s, c in curves[m].items()} for m in ("bco", "bce")))
        for lr in R.REGIME_RATES:
            bco = values(data, "regime", "bco", lr=lr)
            for other in ("bce", "dpo", "kto"):
                add(name, f"regime{lr:g}_bco_gt_{other}", f"1 epoch at {lr:g}: BCO beats {other.upper()}", bco,
                    values(data, "regime", other, lr=lr))
            add(name, f"regime{lr:g}_bco_gt_sft", f"1 epoch at {lr:g}: BCO raises success over SFT", bco,
                values(data, "round2", "sft"))
        ema = values(data, "curves", "bco")  # round 2's BCO rerun (this code, this machine)
        for m, what in (("bco_eq7", "Eq. 7 per step"), ("bco_ema_corrected", "the bias-corrected EMA")):
            add(name, f"{m}_gt_ema", f"{what} beats the EMA (round 2's BCO)", values(data, "shift", m), ema)
            add(name, f"{m}_gt_bce", f"BCO with {what} beats BCE", values(data, "shift", m),
                values(data, "curves", "bce"))
        zero = values(data, "sweep", R.fixed(0.0))
        for d in R.DELTAS:
            if d != 0:
                add(name, f"fixed{d:+g}_gt_fixed0", f"delta fixed at {d:+g} beats delta = 0",
                    values(data, "sweep", R.fixed(d)), zero)
        slopes = sweep_slopes(data)
        if len(slopes) >= 2:
            add(name, "success_rises_with_delta", "success rises with delta (per-seed slope > 0)", slopes,
                dict.fromkeys(slopes, 0.0))
        add(name, "redraw_bco_gt_bce", "on redrawn feedback: BCO beats BCE", values(data, "redraw", "bco"),
            values(data, "redraw", "bce"))
        add(name, "likert5_gt_sft", "BCO on Likert at the top grade raises success over SFT",
            values(data, "likert", "bco_likert5"), values(data, "round2", "sft"))
    return out


def sweep_slopes(data: dict) -> dict:
    """seed -> least-squares slope of success on delta over the sweep (success points per unit delta)."""
    per = {d: values(data, "sweep", R.fixed(d)) for d in R.DELTAS}
    out = {}
    for s in R.SEEDS:
        pts = [(d, per[d][s]) for d in R.DELTAS if s in per[d]]
        if len(pts) == len(R.DELTAS):
            x, y = np.array(pts).T
            out[s] = float(np.polyfit(x, y, 1)[0])
    return out


def family(by_task: dict) -> list[dict]:
    """Round 2's claims and round 3's comparisons, one Holm family; each with adjusted p and verdicts."""
    rows = [{"task": name, "round": 2, **c} for name, data in by_task.items()
            for c in round2.claims(data["round2"])]
    rows += [{"round": 3, **c} for c in comparisons(by_task)]
    adjusted = holm([r["interval"].p for r in rows])
    for r, a in zip(rows, adjusted):
        r.update(adjusted_p=a, uncorrected=r["interval"].verdict(), verdict=corrected_verdict(r["interval"], a))
    return rows


# --------------------------------------------------------------------------------------- tables


def curves_table(by_task: dict) -> str:
    lines = ["| task | KL (nats) | BCO success | BCE success | BCO - BCE |", "|---|---|---|---|---|"]
    for name, data in by_task.items():
        curves = {m: values(data, "curves", m, "kl_curve") for m in ("bco", "bce")}
        for budget in KL_BUDGETS.get(name, ()):
            a, b = ({s: best_within(c, budget) for s, c in curves[m].items()} for m in ("bco", "bce"))
            if a and b:
                diff = paired_interval([a[s] for s in sorted(a)], [b[s] for s in sorted(a)])
                lines.append(f"| {name} | <= {budget:g} | {_ms(a)} | {_ms(b)} | {diff} |")
        for m in ("bco", "bce"):
            end, kl = values(data, "curves", m), values(data, "curves", m, "kl")
            if end:
                lines.append(f"| {name} | end: {_ms(kl)} | {_ms(end) if m == 'bco' else ''} | "
                             f"{_ms(end) if m == 'bce' else ''} | {m.upper()} at step {R.STEPS} |")
    return "\n".join(lines)


def regime_table(by_task: dict) -> str:
    lines = ["| task | regime | method | test success | KL (nats) |", "|---|---|---|---|---|"]
    for name, data in by_task.items():
        for lr in R.REGIME_RATES:
            for m in R.REGIME_METHODS:
                v = values(data, "regime", m, lr=lr)
                if v:
                    lines.append(f"| {name} | 1 epoch at {lr:g} | {m.upper()} | {_ms(v)} | "
                                 f"{_ms(values(data, 'regime', m, 'kl', lr=lr))} |")
        rates = data["settings"]["round2_rates"]
        for m in R.REGIME_METHODS:
            part = "curves" if m in ("bco", "bce") else "round2"  # round 2's DPO and KTO runs, 5 seeds
            lines.append(f"| {name} | tuned: 200 steps at {rates[m]:g} | {m.upper()} | "
                         f"{_ms(values(data, part, m))} | {_ms(values(data, part, m, 'kl'))} |")
    return "\n".join(lines)


def shift_table(by_task: dict) -> str:
    lines = ["| task | delta | test success | KL (nats) | final delta | last-window class midpoint |",
             "|---|---|---|---|---|---|"]
    rows = (("curves", "bco", "EMA, decay 0.99 (BCO: part 1's runs)"),
            ("shift", "bco_ema_corrected", "EMA, bias-corrected"), ("shift", "bco_eq7", "Eq. 7: this batch's midpoint"),
            ("round2", "bco_trl_shift", "TRL's running mean (round 2's runs)"),
            ("curves", "bce", "0 (BCE: part 1's runs)"))
    for name, data in by_task.items():
        for part, m, what in rows:
            v = values(data, part, m)
            if not v:
                continue
            mids = {s: midpoint(c) for s, c in values(data, part, m, "curve").items()}
            lines.append(f"| {name} | {what} | {_ms(v)} | {_ms(values(data, part, m, 'kl'))} | "
                         f"{_ms(values(data, part, m, 'delta'))} | {_ms(mids)} |")
    return "\n".join(lines)


def midpoint(curve: list[dict]) -> float:
    last = curve[-1]
    return 0.5 * (last["rewards/chosen"] + last["rewards/rejected"])


def sweep_table(by_task: dict) -> str:
    lines = ["| task | delta | test success | KL (nats) | minus delta = 0 |", "|---|---|---|---|---|"]
    for name, data in by_task.items():
        zero = values(data, "sweep", R.fixed(0.0))
        for d in R.DELTAS:
            v = values(data, "sweep", R.fixed(d))
            if v:
                diff = "-" if d == 0 else str(paired_interval([v[s] for s in sorted(v)], [zero[s] for s in sorted(v)]))
                kl = values(data, "sweep", R.fixed(d), "kl")
                lines.append(f"| {name} | {d:+g} | {_ms(v)} | {_ms(kl)} | {diff} |")
        slopes = sweep_slopes(data)
        if slopes:
            lines.append(f"| {name} | slope (success per unit delta) | {_ms(slopes)} | | |")
    return "\n".join(lines)


def redraw_table(by_task: dict) -> str:
    lines = ["| task | feedback | BCO success | BCE success | BCO KL | BCE KL |", "|---|---|---|---|---|---|"]
    for name, data in by_task.items():
        for part, what in (("curves", "the shipped draw, seeds 0-4 (part 1's runs)"),
                           ("redraw", "redrawn per seed (seeds 1-5)")):
            lines.append(f"| {name} | {what} | {_ms(values(data, part, 'bco'))} | {_ms(values(data, part, 'bce'))} | "
                         f"{_ms(values(data, part, 'bco', 'kl'))} | {_ms(values(data, part, 'bce', 'kl'))} |")
    return "\n".join(lines)


def family_table(rows: list[dict]) -> str:
    lines = ["| round | task | claim | difference [95% CI] | p | Holm p | verdict (uncorrected) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['round']} | {r['task']} | {r['claim']} | {r['interval']} | {r['interval'].p:.3g} | "
                     f"{r['adjusted_p']:.3g} | {r['verdict']} ({r['uncorrected']}) |")
    return "\n".join(lines)


def figure(by_task: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(by_task), figsize=(6 * len(by_task), 4.5), squeeze=False)
    for ax, (name, data) in zip(axes[0], by_task.items()):
        for m, colour in (("bco", "tab:blue"), ("bce", "tab:orange")):
            curves = list(values(data, "curves", m, "kl_curve").values())
            if not curves:
                continue
            top = max(p["kl"] for c in curves for p in c)
            grid = np.linspace(0.0, top, 200)
            best = np.array([[best_within(c, g) for g in grid] for c in curves])
            ax.plot(grid, best.mean(0), color=colour, lw=2,
                    label=f"{m.upper()}: best success within the KL budget (mean of {len(curves)} seeds)")
            ax.fill_between(grid, best.min(0), best.max(0), color=colour, alpha=0.15)
            mean_kl = np.mean([[p["kl"] for p in c] for c in curves], 0)
            mean_success = np.mean([[p["success"] for p in c] for c in curves], 0)
            ax.plot(mean_kl, mean_success, ":o", ms=3, color=colour, alpha=0.8,
                    label=f"{m.upper()}: mean checkpoint every {R.CURVE_EVERY} steps")
        for d in R.DELTAS:
            s, kl = values(data, "sweep", R.fixed(d)), values(data, "sweep", R.fixed(d), "kl")
            if s:
                ax.scatter(np.mean(list(kl.values())), np.mean(list(s.values())), marker="s", color="tab:green",
                           zorder=3)
                ax.annotate(f"{d:+g}", (np.mean(list(kl.values())), np.mean(list(s.values()))), fontsize=7)
        ax.scatter([], [], marker="s", color="tab:green", label="BCO, delta fixed (mean of 5 seeds)")
        ax.set(xlabel="KL to SFT on test answers (nats): budget or checkpoint", ylabel="test success", title=name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(FIGURE, dpi=110)
    plt.close(fig)
    return FIGURE


def markdown(by_task: dict) -> str:
    rows = family(by_task)
    return "\n\n".join([
        "## Best success within a KL budget (part 1)", curves_table(by_task),
        "## The paper's regime (part 2)", regime_table(by_task),
        "## delta's estimators (part 3)", shift_table(by_task),
        "## delta held fixed (part 4)", sweep_table(by_task),
        "## Redrawn feedback (part 5)", redraw_table(by_task),
        f"## Every interval, Holm over {len(rows)} (part 6)", family_table(rows)]) + "\n"


def write() -> int:
    by_task = load()
    if not by_task:
        print("no round-3 results yet")
        return 1
    text = markdown(by_task)
    with open(TABLE, "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    print("wrote", os.path.relpath(TABLE, REPO), os.path.relpath(figure(by_task), REPO))
    return 0


def mismatches(by_task: dict) -> list[str]:
    """Every verdict of the family that differs from PINNED (absent: inconclusive), every pinned claim
    the family lacks, every run that did not finish, and a family of another size."""
    out = [f"run did not finish: {n}:{P.run_key(r)}" for n, d in by_task.items() for r in d["runs"]
           if r.get("status") != "ok"]
    rows = {(r["round"], r["task"], r["id"]): r["verdict"] for r in family(by_task)}
    if len(rows) != FAMILY_SIZE:
        out.append(f"the family has {len(rows)} intervals, not {FAMILY_SIZE}")
    out += [f"{k}: {v} (pinned: {PINNED.get(k, 'inconclusive')})" for k, v in rows.items()
            if v != PINNED.get(k, "inconclusive")]
    out += [f"{k}: missing (pinned: {v})" for k, v in PINNED.items() if k not in rows]
    return out


def check() -> int:
    """Every verdict recomputed from the saved runs and compared with PINNED; exit 1 on any difference."""
    bad = mismatches(load())
    for line in bad:
        print("FAIL", line)
    print(f"{FAMILY_SIZE - len(bad)} of {FAMILY_SIZE} verdicts as pinned" if not bad else f"{len(bad)} failures")
    return 1 if bad else 0
