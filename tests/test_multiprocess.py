"""Two JAX processes (4 CPU devices each), launched through the CLI's own flags, train exactly like one
process with 8 devices: each reads its own rows, delta and the loss are reduced over both hosts,
checkpoints and the HF export are written once. A missing peer ends the run with a one-line error."""

import os
import socket
import subprocess
import sys

import numpy as np
from safetensors.numpy import load_file
from train_fixtures import feedback_file, read_metrics, tiny_model_dir

from bco_jax import train
from bco_jax.config import parse_args

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flags(model, data, out):
    return ["--model", model, "--train_data", data, "--eval_data", data, "--output_dir", str(out),
            "--batch_size", "16", "--max_steps", "4", "--save_steps", "2", "--learning_rate", "1e-3",
            "--logging_steps", "1", "--warmup_ratio", "0", "--max_length", "16", "--length_buckets", "16",
            "--tensorboard", "false", "--mesh", "4,2,1"]


def launch(n, argv, *, devices=4, timeout=300):
    """`python -m bco_jax.train` as processes 0 .. n-1 of one job on 127.0.0.1; returns them finished."""
    port = free_port()
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    procs = [subprocess.Popen([sys.executable, "-m", "bco_jax.train", *argv, "--coordinator_address",
                               f"127.0.0.1:{port}", "--num_processes", str(n), "--process_id", str(i)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(n)]
    try:
        errors = [p.communicate(timeout=timeout)[1] for p in procs]  # bounded: never a hang
    finally:
        for p in procs:
            p.kill()
    return procs, errors


def test_two_processes_match_one(tmp_path):
    model = tiny_model_dir(tmp_path / "model")
    data = feedback_file(tmp_path / "train.jsonl", 64)
    procs, errors = launch(2, flags(model, data, tmp_path / "multi"))
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-3000:] for e in errors)

    train.run(parse_args(flags(model, data, tmp_path / "single")))
    multi, single = read_metrics(tmp_path / "multi"), read_metrics(tmp_path / "single")
    assert [r["step"] for r in multi] == [r["step"] for r in single]
    for a, b in zip(multi, single):
        for key in ("loss", "delta", "rewards/chosen", "rewards/rejected", "grad_norm", "count/chosen",
                    "eval_loss", "eval_reward_auc"):
            if key in b:
                np.testing.assert_allclose(a[key], b[key], rtol=2e-5, atol=1e-7, err_msg=key)
    assert sorted(os.listdir(tmp_path / "multi" / "checkpoints")) == ["2", "4"]
    w_multi = load_file(str(tmp_path / "multi" / "hf" / "model.safetensors"))
    w_single = load_file(str(tmp_path / "single" / "hf" / "model.safetensors"))
    for name in w_single:
        np.testing.assert_allclose(w_multi[name], w_single[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_a_missing_peer_is_a_one_line_error(tmp_path):
    # Process 0 of a 2-process job whose process 1 never starts.
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "bco_jax.train", "--model", "m", "--train_data", "d",
                           "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
                           "--process_id", "0", "--distributed_timeout", "10"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: could not join the multi-process job within distributed_timeout=10s")
    assert "Traceback" not in proc.stderr
