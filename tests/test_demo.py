"""The README's first command: `python -m bco_jax.train` with no arguments runs the embedded demo
(BCO on the shipped oracle-task SFT model and feedback) and must visibly improve the model."""

import os
import subprocess
import sys


def test_embedded_default_run_raises_the_oracle_success_rate(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    # Only the output folder differs from the bare command (run in tmp_path, it writes outputs/ there).
    proc = subprocess.run([sys.executable, "-m", "bco_jax.train"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line[:46].strip(): line[46:].split() for line in proc.stdout.splitlines() if len(line) > 46}
    before, after = (float(x) for x in rows["oracle success rate (held-out prompts, T=1)"])
    # 1200 samples each: a standard error of ~1.4 points; the demo gains ~11.
    assert after > before + 0.05, proc.stdout
    accuracy_before, accuracy_after = (float(x) for x in rows["implicit-reward accuracy (held-out feedback)"])
    assert accuracy_after > 0.7
    (run_dir,) = os.listdir(tmp_path / "outputs")
    assert {"metrics.jsonl", "checkpoints", "hf", "bco_state.json"} <= set(os.listdir(tmp_path / "outputs" / run_dir))
