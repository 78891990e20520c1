"""bench/accelerator.py cannot rot: its smoke mode runs the real step on CPU and writes its JSON, and
it imports nothing that the accelerator image lacks (grain, TFDS, tensorboardX)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_mode_runs_and_reports(tmp_path):
    code = ("import sys, runpy; sys.argv = ['accelerator.py', '--smoke', '--out', sys.argv[1]]\n"
            "try:\n    runpy.run_module('bench.accelerator', run_name='__main__', alter_sys=True)\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "missing = [m for m in ('grain', 'tensorflow_datasets', 'tensorboardX', 'torch') if m in sys.modules]\n"
            "assert not missing, missing\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = [p for p in tmp_path.iterdir() if p.name.startswith("accelerator-smoke-")]
    record = json.loads(path.read_text())
    assert [(c["reference"], c["kernel"]) for c in record["configs"]] == [("live", "xla"), ("precomputed", "xla")]
    for config in record["configs"]:
        assert config["tokens_per_s"] > 0 and config["mfu_measured_peak"] > 0
        assert config["xla_memory"]["temp_size_in_bytes"] > 0 and config["loss"] > 0
    assert "tokens/s" in proc.stdout and "MFU" in proc.stdout
