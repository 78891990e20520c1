"""Two JAX processes (4 CPU devices each), launched through the CLI's own flags, train exactly like one
process with 8 devices: each reads its own rows, delta and the loss are reduced over both hosts,
checkpoints and the HF export are written once. A missing peer ends the run with a one-line error."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file
from train_fixtures import feedback_file, read_metrics, tiny_model_dir

from bco_jax import train
from bco_jax.config import parse_args
from bco_jax.run_dir import samples_path

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


def launch(n, argv, *, devices=4, timeout=300, slurm=False, module="bco_jax.train"):
    """`python -m <module>` (the trainer) as processes 0 .. n-1 of one job on 127.0.0.1, joined through
    the CLI's flags, or (`slurm`) through the environment of an n-task SLURM job; returns them finished."""
    port = free_port()
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    procs = []
    for i in range(n):
        if slurm:
            extra, penv = [], {**env, "SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "127.0.0.1",
                               "SLURM_NTASKS": str(n), "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i),
                               "JAX_COORDINATOR_PORT": str(port)}
        else:
            extra, penv = ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", str(n),
                           "--process_id", str(i)], env
        procs.append(subprocess.Popen([sys.executable, "-m", module, *argv, *extra], env=penv,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        errors = [p.communicate(timeout=timeout)[1] for p in procs]  # bounded: never a hang
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-3000:] for e in errors)


def assert_same_records(a, b, keys, steps=None):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in keys:
            if key in rb and (steps is None or rb["step"] in steps):
                np.testing.assert_allclose(ra[key], rb[key], rtol=2e-5, atol=1e-7, err_msg=f"{key} {rb['step']}")


def test_two_processes_match_one_and_resume_without_model_folders(tmp_path):
    # BCO + UDM + precomputed reference log-probs + evaluation, 2 processes x 4 devices vs 1 x 8.
    model = tiny_model_dir(tmp_path / "model")
    data = feedback_file(tmp_path / "train.jsonl", 64)
    extra = ["--udm", "true", "--precompute_ref_log_probs", "true", "--prompt_sample_size", "16"]
    launch(2, flags(model, data, tmp_path / "multi") + extra)
    train.fit(parse_args(flags(model, data, tmp_path / "single") + extra))
    multi, single = read_metrics(tmp_path / "multi"), read_metrics(tmp_path / "single")
    assert_same_records(multi, single, ("loss", "delta", "rewards/chosen", "rewards/rejected", "grad_norm",
                                        "count/chosen", "eval_loss", "eval_reward_auc", "udm/accuracy_chosen"))
    assert sorted(os.listdir(tmp_path / "multi" / "checkpoints")) == ["2", "4"]
    # Written once (by process 0); train and eval data are the same file here, hence one table.
    assert len([f for f in os.listdir(tmp_path / "multi") if f.startswith("reference_logps-")]) == 1
    w_multi = load_file(str(tmp_path / "multi" / "hf" / "model.safetensors"))
    w_single = load_file(str(tmp_path / "single" / "hf" / "model.safetensors"))
    for name in w_single:
        np.testing.assert_allclose(w_multi[name], w_single[name], rtol=1e-5, atol=1e-6, err_msg=name)

    # The model folder is gone: the multi-process checkpoint resumes in one process from what the
    # run saved (config, tokenizer, reference weights, UDM weights, reference log-probs).
    shutil.move(model, tmp_path / "moved")
    more = [a if a != "4" else "6" for a in flags(model, data, tmp_path / "multi")]  # --max_steps 6
    train.fit(parse_args(more + extra))
    steps = [r["step"] for r in read_metrics(tmp_path / "multi") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6] and "6" in os.listdir(tmp_path / "multi" / "checkpoints")


def test_kto_two_processes_resume_a_one_process_checkpoint_under_slurm(tmp_path):
    model = tiny_model_dir(tmp_path / "model")
    data = feedback_file(tmp_path / "train.jsonl", 64)
    kto = ["--loss_type", "kto", "--eval_data", "", "--export_hf", "false", "--lr_scheduler_type", "constant"]
    straight = tmp_path / "straight"
    train.fit(parse_args(flags(model, data, straight) + kto))
    resumed = tmp_path / "resumed"
    train.fit(parse_args([a if a != "4" else "2" for a in flags(model, data, resumed)] + kto))
    launch(2, flags(model, data, resumed) + kto, slurm=True)  # joins through SLURM's variables
    assert_same_records(read_metrics(resumed), read_metrics(straight), ("loss", "delta", "grad_norm"))


@pytest.mark.parametrize("packing", ["false", "true"])
def test_processes_sharing_a_batch_block_evaluate_like_one(tmp_path, packing):
    # One process per device with the tensor axis across them (mesh 1,1,2 over 2 processes x 1 device,
    # the one-process-per-GPU layout): both feed the same rows, so evaluation counts every example once.
    model = tiny_model_dir(tmp_path / "model")
    data = feedback_file(tmp_path / "train.jsonl", 64)
    extra = ["--mesh", "1,1,2", "--max_steps", "2", "--export_hf", "false", "--packing", packing]
    launch(2, flags(model, data, tmp_path / "multi") + extra, devices=1)
    train.fit(parse_args(flags(model, data, tmp_path / "single") + extra))
    multi, single = read_metrics(tmp_path / "multi"), read_metrics(tmp_path / "single")
    assert_same_records(multi, single, ("loss", "grad_norm", "eval_loss", "eval_reward_auc", "eval_reward_accuracy",
                                        "eval_count/chosen", "eval_count/rejected"))
    last = [r for r in multi if "eval_loss" in r][-1]
    assert last["eval_count/chosen"] + last["eval_count/rejected"] == 64


def test_two_processes_evaluate_and_sample_like_one(tmp_path):
    # 2 hosts x 2 devices, data across hosts and tensor within: every process loads its weight shards,
    # scores and samples its own rows; the report and the sampled answers are the one-process ones.
    from bco_jax import evaluate

    model = tiny_model_dir(tmp_path / "model")
    data = feedback_file(tmp_path / "fb.jsonl", 24)
    argv = ["--model", model, "--data", data, "--num_samples", "12", "--max_new_tokens", "4", "--batch_size", "8",
            "--max_length", "16", "--seed", "3"]
    launch(2, argv + ["--mesh", "2,1,2", "--output", str(tmp_path / "multi" / "eval.json")], devices=2,
           module="bco_jax.evaluate")
    assert evaluate.main(argv + ["--mesh", "1,1,1", "--output", str(tmp_path / "single" / "eval.json")]) == 0
    multi, single = (json.loads((tmp_path / name / "eval.json").read_text()) for name in ("multi", "single"))
    assert multi.keys() == single.keys() and multi["samples"] == 12
    for key, value in single.items():
        if isinstance(value, float):
            np.testing.assert_allclose(multi[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    answers = [[json.loads(line)["completion"] for line in open(samples_path(str(tmp_path / name / "eval.json")))]
               for name in ("multi", "single")]
    assert answers[0] == answers[1]


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


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
    # JAX's preemption service owns SIGTERM with several processes: the one signalled tells the other
    # at which step to stop; both save that step together and exit with sigterm_exit_code.
    model = tiny_model_dir(tmp_path / "model")
    data = feedback_file(tmp_path / "train.jsonl", 64)
    out = tmp_path / "term"
    argv = [a if a != "4" else "400" for a in flags(model, data, out)]
    argv += ["--save_steps", "1000", "--eval_data", "", "--export_hf", "false", "--sigterm_exit_code", "3"]
    port = free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-m", "bco_jax.train", *argv, "--coordinator_address",
                               f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        deadline = time.time() + 200
        while time.time() < deadline and not (out / "metrics.jsonl").exists():
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)
        errors = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [3, 3], "\n".join(e[-2000:] for e in errors)
    steps = [int(s) for s in os.listdir(out / "checkpoints") if s.isdigit()]
    assert len(steps) == 1 and 0 < steps[0] < 400
