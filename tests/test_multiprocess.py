"""Two JAX processes (4 CPU devices each) train exactly like one process with 8 devices: each reads its
own rows, delta and the loss are reduced over both hosts, checkpoints and the HF export are written once."""

import os
import socket
import subprocess
import sys

import numpy as np
from safetensors.numpy import load_file

from bco_jax import train
from bco_jax.config import parse_args
from train_fixtures import feedback_file, read_metrics, tiny_model_dir

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


def test_two_processes_match_one(tmp_path):
    model = tiny_model_dir(tmp_path / "model")
    data = feedback_file(tmp_path / "train.jsonl", 64)
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    worker = os.path.join(HERE, "multiprocess_worker.py")
    procs = [subprocess.Popen([sys.executable, worker, str(i), port, *flags(model, data, tmp_path / "multi")],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        errors = [p.communicate(timeout=300)[1] for p in procs]  # a missing peer aborts, bounded here
    finally:
        for p in procs:
            p.kill()
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
