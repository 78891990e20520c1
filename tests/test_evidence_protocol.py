"""The evidence protocol's decisions (experiments/oracle): paired t-intervals, verdicts, the learning-rate
grid's extension at an edge and the selection, on hand-made results (no training)."""
import math

import numpy as np
import pytest

from experiments.oracle import protocol as P
from experiments.oracle.stats import HELD, INCONCLUSIVE, NOT_HELD, corrected_verdict, holm, paired_interval


def test_paired_interval_matches_the_t_table():
    a, b = [0.70, 0.72, 0.65, 0.69, 0.74], [0.66, 0.70, 0.66, 0.64, 0.70]
    d = np.subtract(a, b)
    half = 2.7764451 * d.std(ddof=1) / math.sqrt(5)  # t(0.975, df=4), from a printed table
    ci = paired_interval(a, b)
    assert ci.mean == pytest.approx(d.mean()) and ci.n == 5
    assert (ci.low, ci.high) == pytest.approx((d.mean() - half, d.mean() + half), rel=1e-6)
    assert ci.verdict() == INCONCLUSIVE  # one seed goes the other way: the interval straddles 0


def test_verdicts_follow_the_interval():
    assert paired_interval([0.8, 0.82, 0.79], [0.7, 0.71, 0.7]).verdict() == HELD
    assert paired_interval([0.6, 0.61, 0.59], [0.7, 0.71, 0.7]).verdict() == NOT_HELD
    assert paired_interval([0.9], [0.1]).verdict() == INCONCLUSIVE  # one pair has no interval


def test_p_value_and_holm_against_hand_computation():
    a, b = [0.70, 0.72, 0.65, 0.69, 0.74], [0.66, 0.70, 0.66, 0.64, 0.70]
    # t = 0.018 / (0.015348 / sqrt 5) = 2.6224 on 4 df: two-sided p 0.0586 (scipy's ttest_rel agrees)
    assert paired_interval(a, b).p == pytest.approx(0.058649, abs=1e-5)
    # Holm on 0.01, 0.04, 0.03, 0.20: sorted x (4, 3, 2, 1) = 0.04, 0.09, 0.08 -> 0.09 (monotone), 0.20
    assert holm([0.01, 0.04, 0.03, 0.20]) == pytest.approx([0.04, 0.09, 0.09, 0.20])
    held = paired_interval([0.8, 0.82, 0.79], [0.7, 0.71, 0.7])
    assert held.p < 0.01 and corrected_verdict(held, held.p * 3) == HELD
    assert corrected_verdict(held, 0.06) == INCONCLUSIVE  # uncorrected it held; corrected it does not


def _grid(method, scores, seeds=(100,)):
    return [dict(P.make_run("grid", method, lr, P.BETA, s), status="ok", val_success=v)
            for lr, v in scores.items() for s in seeds]


def test_grid_grows_at_an_edge_until_the_best_is_inside():
    cfg = P.full_config("arithmetic")
    base = {1e-4: 0.5, 3e-4: 0.55, 1e-3: 0.6, 3e-3: 0.62, 1e-2: 0.7}  # best on the upper edge
    runs = _grid("dpo", base)
    assert P.grid_rates(runs, "dpo", cfg) == [*P.LR_GRID, 3e-2]  # one more rate, not yet run
    runs += _grid("dpo", {3e-2: 0.4})  # it was worse: 1e-2 is inside now
    assert P.grid_rates(runs, "dpo", cfg) == [*P.LR_GRID, 3e-2]
    runs = _grid("ipo", {**base, 1e-2: 0.3, 1e-4: 0.9}) + _grid("ipo", {3e-5: 0.95, 1e-5: 0.97})
    assert P.grid_rates(runs, "ipo", cfg) == [1e-5, 3e-5, *P.LR_GRID]  # at most two extensions per side


def test_selection_and_variants():
    cfg = P.full_config("arithmetic")
    task = P.Task("t", None, "", "", P.method_table(mismatch=True))
    runs = _grid("bco", {1e-4: 0.5, 3e-4: 0.6, 1e-3: 0.6, 3e-3: 0.55, 1e-2: 0.2})
    chosen = P.selected_rates(runs, task, cfg)
    assert chosen["bco"] == 3e-4  # a tie goes to the smaller rate
    assert chosen["bco_trl_shift"] == chosen["bco_mm95_udm"] == 3e-4  # variants take their base's rate
    assert "dpo" not in chosen  # no grid runs, no selection
    tests = P.test_runs(task, chosen, cfg)
    assert {r["method"] for r in tests} == {m for m in task.methods if task.base_of(m) == "bco"}
    assert [r["beta"] for r in tests if r["method"] == "bco" and r["seed"] == 0] == [P.BETA, 0.05, 0.3]


@pytest.mark.parametrize("task", ["arithmetic", "interval"])
def test_committed_results_give_the_pinned_verdicts(task):
    """`run_all.py --check` on the shipped results.json: the report code still reads them and every
    verdict the protocol decided comes out the same."""
    import json

    from experiments.oracle import report

    with open(report.RESULTS[task], encoding="utf-8") as f:
        results = json.load(f)
    lines, failed = report.check(results, task)
    assert not failed, "\n".join(lines)
    assert sum(line.startswith("PASS") and "(pinned:" in line for line in lines) == len(report.PINNED[task])


def test_online_protocol_results_give_the_pinned_verdicts():
    """`experiments.online.protocol --check` on the shipped protocol_<task>.json: every claim docs/results.md
    states comes out with the same Holm-corrected verdict, and the family is the whole set of intervals."""
    import os

    from experiments.online import report

    by_task = report.load(os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments", "online", "results"))
    assert set(by_task) == {"arithmetic", "interval"}
    assert report.check(by_task) == []
    assert len(report.claims(by_task)) == len(report.PINNED) == 18


def test_round3_kl_budget_and_sweep_slope_against_hand_values():
    """Part 1 reads the best success a run reaches within a KL budget, over its checkpoints and the
    segments between them (KL is not monotone in steps); the sweep's slope is the least-squares slope of
    success on delta, per seed."""
    from experiments.oracle import round3 as R
    from experiments.oracle import round3_report as RR

    curve = [{"kl": 0.0, "success": 0.5}, {"kl": 1.0, "success": 0.7}, {"kl": 3.0, "success": 0.6},
             {"kl": 2.0, "success": 0.9}]
    assert RR.best_within(curve, 2.0) == pytest.approx(0.9)  # the later visit at 2 counts
    assert RR.best_within(curve, 1.5) == pytest.approx(0.7)  # checkpoint at 1 beats the 1 -> 3 segment's 0.675
    assert RR.best_within(curve, 0.25) == pytest.approx(0.55)  # on the segment 0 -> 1
    assert RR.best_within(curve, 2.5) == pytest.approx(0.9)
    assert RR.best_within([{"kl": 0.0, "success": 0.5}, {"kl": 4.0, "success": 0.9}, {"kl": 0.5, "success": 0.6}],
                          1.0) == pytest.approx(0.9 - 0.3 * 3 / 3.5)  # 0 -> 4 gives 0.6 at KL 1, 4 -> 0.5 more
    runs = [{"phase": "sweep", "method": R.fixed(d), "seed": s, "status": "ok", "success": 0.6 + (0.1 + s) * d}
            for s in R.SEEDS for d in R.DELTAS]
    slopes = RR.sweep_slopes({"runs": runs})
    assert slopes == pytest.approx({s: 0.1 + s for s in R.SEEDS})


def test_round3_results_give_the_pinned_verdicts():
    """`experiments.oracle.round3 --check` on the shipped round3_<task>.json and round 2's results: every
    verdict of the Holm family (84 intervals) is the one docs/results.md states."""
    from experiments.oracle import round3_report as RR

    by_task = RR.load()
    assert set(by_task) == {"arithmetic", "interval"}
    assert RR.mismatches(by_task) == []
    assert sum(v != "inconclusive" for v in RR.PINNED.values()) == len(RR.PINNED) == 24
