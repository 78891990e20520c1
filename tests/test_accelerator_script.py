"""bench/accelerator.py cannot rot: its smoke mode runs the real step on CPU (two devices, one mesh)
and writes its JSON, and it imports nothing that the accelerator image lacks (grain, TFDS,
tensorboardX, transformers, torch)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("accelerator", os.path.join(ROOT, "bench", "accelerator.py"))
accelerator = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(accelerator)  # the standard library only: jax is imported by main()

CODE = ("import sys, runpy; sys.argv = ['accelerator.py', *sys.argv[1:]]\n"
        "try:\n    runpy.run_module('bench.accelerator', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as e:\n    code = e.code\n"
        "missing = [m for m in ('grain', 'tensorflow_datasets', 'tensorboardX', 'torch', 'transformers')"
        " if m in sys.modules]\n"
        "assert not missing, missing\n"
        "sys.exit(code)\n")


def run_smoke(tmp_path, *args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    proc = subprocess.run([sys.executable, "-c", CODE, "--smoke", "--out", str(tmp_path), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    (path,) = [p for p in tmp_path.iterdir() if p.name.startswith("accelerator-smoke-")]
    return proc, json.loads(path.read_text())


def test_smoke_mode_plans_checks_and_times_padded_rows(tmp_path):
    proc, record = run_smoke(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert record["status"] == "pass" and record["failures"] == []
    versions = record["versions"]
    assert {"python", "jax", "jaxlib", "flax", "optax", "device_kind", "platform_version"} <= set(versions)
    assert record["devices"] == 2 and record["mesh"] == {"data": 2, "fsdp": 1, "tensor": 1}
    # the plan: written before anything ran, from two probe compiles, the largest batch that fits
    plan = {(p["reference"], p["kernel"]): p for p in record["plan"]}
    assert list(plan) == [("live", "xla"), ("precomputed", "xla")]
    for p in plan.values():
        assert p["probe_rows"] == [2, 4] and p["probe_total_bytes"][0] < p["probe_total_bytes"][1]
        assert p["limited_by"] == "memory" and 1 <= p["rows_per_device"] == p["rows_fit"]  # a 12 MiB device
        assert p["predicted_total_bytes"] <= record["usable_bytes"] < p["predicted_total_bytes"] + p["per_row_bytes"]
        assert p["batch"] == 2 * p["rows_per_device"]
    # the fused-vs-XLA check: on CPU, splash in Pallas interpret mode, on right-padded rows of different lengths
    (check,) = record["kernel_checks"]
    assert check["kernel"] == "splash" and check["interpret_mode"] and check["status"] == "pass"
    assert check["max_relative_diff"] <= check["tolerance"] == 2e-2
    assert len(set(check["real_lengths"])) > 1 and max(check["real_lengths"]) == record["seq"]
    assert [(c["reference"], c["kernel"]) for c in record["configs"]] == list(plan)
    for config in record["configs"]:
        p = plan[(config["reference"], config["kernel"])]
        assert config["status"] == "ran" and config["batch"] == p["batch"] and config["devices"] == 2
        assert config["compiled_total_bytes"] <= record["usable_bytes"]
        assert abs(config["compiled_total_bytes"] - p["predicted_total_bytes"]) < p["per_row_bytes"]
        # padded rows in the timed steps; tokens/s counts the real ones
        assert 0 < config["padding_fraction"] < 0.5
        slots, real = config["token_slots_per_step"], config["real_tokens_per_step"]
        assert slots == config["batch"] * record["seq"] and real == round(slots * (1 - config["padding_fraction"]))
        assert config["tokens_per_s"] == pytest.approx(config["real_tokens_per_step"] / config["step_s_median"])
        assert config["mfu_measured_peak"] > 0 and config["xla_memory"]["temp_size_in_bytes"] > 0
        assert config["loss"] > 0
    assert "real tokens/s" in proc.stdout and "MFU" in proc.stdout and "kernel check splash vs xla: pass" in proc.stdout


def test_budget_skips_configurations_and_still_reports(tmp_path):
    proc, record = run_smoke(tmp_path, "--budget", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert record["plan"] is None  # nothing compiled
    assert [c["status"] for c in record["configs"]] == ["skipped", "skipped"]
    assert all(c["reason"].startswith("budget") for c in record["configs"])
    assert record["kernel_checks"] == [{"kernel": "splash", "status": "skipped"}]
    assert record["versions"]["jax"] and record["elapsed_s"] < 60


def test_choose_rows_is_the_largest_that_fits():
    # 10 fixed + 3 per row: 2 rows -> 16, 4 rows -> 22
    assert accelerator.choose_rows((2, 4), (16, 22), usable=40, max_rows=64) == {
        "fixed_bytes": 10, "per_row_bytes": 3, "rows_fit": 10, "rows_per_device": 10, "limited_by": "memory",
        "predicted_total_bytes": 40}
    assert accelerator.choose_rows((2, 4), (16, 22), usable=41, max_rows=8)["rows_per_device"] == 8
    assert accelerator.choose_rows((2, 4), (16, 22), usable=12, max_rows=64)["rows_per_device"] == 0  # not even one row


def test_the_kernel_check_is_relative_to_the_magnitude_and_fails_on_nan():
    import numpy as np

    xla = np.array([-12000.0, -0.5, -300.0])
    close = accelerator.compare(np, xla + np.array([120.0, 0.01, 3.0]), xla, 2e-2)  # 1% of |lp|, 0.01 of 1
    assert close["status"] == "pass" and close["max_relative_diff"] == pytest.approx(0.01)
    assert accelerator.compare(np, xla + np.array([0.0, 0.03, 0.0]), xla, 2e-2)["status"] == "fail"  # 0.03 of 1
    nan = accelerator.compare(np, np.array([np.nan, -0.5, -300.0]), xla, 2e-2)
    assert nan["status"] == "fail" and nan["max_relative_diff"] == float("inf")
