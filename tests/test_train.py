"""End-to-end trainer: CLI, metrics and files, export, mesh equivalence, resume, SIGTERM, validation."""

import gc
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from train_fixtures import feedback_file, read_metrics, tiny_model_dir

from bco_jax import train
from bco_jax.config import ConfigError, parse_args
from bco_jax.data import DataError

TRL_KEYS = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
            "delta", "count/chosen", "count/rejected", "step", "epoch", "learning_rate", "grad_norm",
            "tokens_per_second"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return {
        "model": tiny_model_dir(root / "model"),
        "train": feedback_file(root / "train.jsonl", 64),
        "eval": feedback_file(root / "eval.jsonl", 32, seed=1),
        "paired": feedback_file(root / "paired.jsonl", 32, paired=True),
    }


def args(assets, out, *extra):
    return ["--model", assets["model"], "--train_data", assets["train"], "--eval_data", assets["eval"],
            "--output_dir", str(out), "--batch_size", "16", "--max_steps", "6", "--learning_rate", "1e-3",
            "--logging_steps", "1", "--warmup_ratio", "0", "--max_length", "16", "--length_buckets", "16",
            "--tensorboard", "false", *extra]


def test_end_to_end_bco_learns_writes_and_exports(assets, tmp_path):
    out = tmp_path / "run"
    # Evaluated on its own training feedback: a random tiny model cannot generalise arithmetic in 12
    # steps, but its implicit reward must come to separate the examples it was trained on.
    result = train.fit(parse_args(args(assets, out, "--max_steps", "12", "--save_steps", "5",
                                       "--save_total_limit", "2", "--eval_data", assets["train"])))
    records = [r for r in read_metrics(out) if "loss" in r]
    assert len(records) == 12 and set(records[0]) >= TRL_KEYS
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[-1]["rewards/margins"] > records[0]["rewards/margins"]
    assert result["eval_reward_auc"] > 0.7 and result["eval_reward_accuracy"] > 0.6
    assert sorted(os.listdir(out / "checkpoints")) == ["10", "12"]
    # delta moved (the state is really updated) and is what the logs say.
    assert any(abs(r["delta"]) > 0 for r in records[1:])

    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out / "hf")
    ids = torch.tensor([[1, 5, 6, 7]])
    assert torch.isfinite(hf(ids).logits).all()


def _run_losses(assets, out, *extra):
    train.fit(parse_args(args(assets, out, *extra)))
    return np.array([r["loss"] for r in read_metrics(out) if "loss" in r])


def test_mesh_shapes_give_the_same_loss_curve(assets, tmp_path):
    curves = {mesh: _run_losses(assets, tmp_path / mesh.replace(",", "_"), "--mesh", mesh, "--max_steps", "5",
                                "--eval_data", "", "--export_hf", "false")
              for mesh in ("1,1,1", "8,1,1", "2,4,1", "2,2,2")}
    for mesh, curve in curves.items():
        np.testing.assert_allclose(curve, curves["1,1,1"], rtol=2e-5, err_msg=mesh)


def test_precomputed_reference_gives_the_same_losses(assets, tmp_path, monkeypatch):
    live_bytes, loop = [], train.train_loop

    def measured(run, *a, **k):  # device memory held while training: the reference's weights go with precompute
        gc.collect()
        live_bytes.append(sum(x.nbytes for x in jax.live_arrays()))
        return loop(run, *a, **k)

    monkeypatch.setattr(train, "train_loop", measured)
    live = _run_losses(assets, tmp_path / "live", "--export_hf", "false")
    pre = _run_losses(assets, tmp_path / "pre", "--export_hf", "false", "--precompute_ref_log_probs", "true")
    np.testing.assert_allclose(pre, live, rtol=1e-5)
    assert any(name.startswith("reference_logps-") for name in os.listdir(tmp_path / "pre"))
    reference_bytes = os.path.getsize(os.path.join(assets["model"], "model.safetensors"))  # float32, as ref_dtype
    assert live_bytes[0] - live_bytes[1] > 0.9 * reference_bytes, (live_bytes, reference_bytes)


@pytest.mark.parametrize("loss_type", ["dpo", "kto"])
def test_other_losses_run(assets, tmp_path, loss_type):
    data = assets["paired"] if loss_type == "dpo" else assets["train"]
    losses = _run_losses(assets, tmp_path / loss_type, "--loss_type", loss_type, "--train_data", data,
                         "--eval_data", "", "--export_hf", "false", "--max_steps", "3")
    assert np.all(np.isfinite(losses))


def test_udm_weights_reach_the_loss_and_resume_exactly(assets, tmp_path):
    common = ["--eval_data", "", "--export_hf", "false", "--lr_scheduler_type", "constant", "--save_steps", "2"]
    udm = ["--udm", "true", "--prompt_sample_size", "16"]
    plain = _run_losses(assets, tmp_path / "plain", *common, "--max_steps", "3")
    straight = tmp_path / "straight"
    result = train.fit(parse_args(args(assets, straight, *common, *udm, "--max_steps", "3")))
    weighted = np.array([r["loss"] for r in read_metrics(straight) if "loss" in r])
    assert 0.0 <= result["udm/accuracy_chosen"] <= 1.0
    assert abs(weighted[0] - plain[0]) > 1e-6  # the density-ratio weights reach the first loss
    # Stopped after step 2 and resumed from the checkpoint (UDM weights and classifier restored, not refit):
    # step 3 is the same, bit for bit.
    resumed = tmp_path / "resumed"
    train.fit(parse_args(args(assets, resumed, *common, *udm, "--max_steps", "2")))
    train.fit(parse_args(args(assets, resumed, *common, *udm, "--max_steps", "3")))
    again = [r for r in read_metrics(resumed) if "loss" in r]
    assert [r["step"] for r in again] == [1, 2, 3]
    np.testing.assert_array_equal([r["loss"] for r in again], weighted)


def _cli(argv, env=None, **kw):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    return subprocess.run([sys.executable, "-m", "bco_jax.train", *argv], capture_output=True, text=True,
                          env=env, **kw)


def test_sigkill_at_named_points_then_rerun_ends_bit_identical(assets, tmp_path):
    # Four seeded crashes chained in one output_dir (inside a step, with a checkpoint write in flight,
    # between the final state and the export), each followed by the same command: the run ends with
    # the weights of one uninterrupted run, bit for bit.
    common = ["--max_steps", "6", "--save_steps", "2", "--eval_data", ""]
    whole, chained = tmp_path / "whole", tmp_path / "chained"
    assert _cli(args(assets, whole, *common)).returncode == 0
    rng, outcomes = np.random.default_rng(0), []
    early = ["step:2", "step:3", "checkpoint:1", "checkpoint:2"]  # reached before the run's end
    for trial in range(4):
        fault = str(rng.choice(early)) if trial < 3 else "export:1"
        proc = _cli(args(assets, chained, *common), env={"BCO_JAX_FAULT": fault})
        assert proc.returncode in (0, -signal.SIGKILL), (fault, proc.stderr[-2000:])
        outcomes.append((fault, proc.returncode))
    assert sum(code == -signal.SIGKILL for _, code in outcomes) >= 2, outcomes
    assert _cli(args(assets, chained, *common)).returncode == 0
    assert (whole / "hf" / "model.safetensors").read_bytes() == (chained / "hf" / "model.safetensors").read_bytes()
    assert not [p for p in os.listdir(chained / "checkpoints") if "tmp" in p]  # no half checkpoint left behind


def test_kill_and_resume_is_bit_exact(assets, tmp_path):
    common = ["--max_steps", "8", "--save_steps", "2", "--eval_data", ""]
    whole = tmp_path / "whole"
    assert _cli(args(assets, whole, *common)).returncode == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "bco_jax.train", *args(assets, killed, *common)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill it once it has written its second checkpoint (step 4).
    import time
    deadline = time.time() + 240
    while time.time() < deadline and not (killed / "checkpoints" / "4").exists() and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed midway, not finished
    assert not (killed / "hf").exists()
    assert _cli(args(assets, killed, *common)).returncode == 0
    # Same final weights, bit for bit.
    assert (whole / "hf" / "model.safetensors").read_bytes() == (killed / "hf" / "model.safetensors").read_bytes()
    a, b = read_metrics(whole), read_metrics(killed)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in ra:
            if key not in ("tokens_per_second",):
                assert ra[key] == rb[key], (key, ra["step"])


def test_sigterm_saves_and_exits_with_the_configured_code(assets, tmp_path):
    out = tmp_path / "term"
    proc = subprocess.Popen([sys.executable, "-m", "bco_jax.train",
                             *args(assets, out, "--max_steps", "500", "--save_steps", "1000", "--eval_data", "",
                                   "--sigterm_exit_code", "3", "--export_hf", "false")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import time
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err[-2000:]
    steps = [int(s) for s in os.listdir(out / "checkpoints") if s.isdigit()]
    assert len(steps) == 1 and 0 < steps[0] < 500


def test_validation_errors_name_the_key(assets, tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'betaa'"):
        parse_args(["--betaa", "0.1"])
    with pytest.raises(ConfigError, match="loss_type"):
        parse_args(["--loss_type", "simpo"])
    with pytest.raises(ConfigError, match="--shuffle"):
        parse_args(["--shuffle", "maybe"])
    with pytest.raises(ConfigError, match="batch_size"):
        train.fit(parse_args(args(assets, tmp_path / "x", "--batch_size", "12", "--mesh", "8,1,1")))
    with pytest.raises(DataError, match="train.jsonl:1: paired=true needs chosen/rejected"):
        train.fit(parse_args(args(assets, tmp_path / "y", "--loss_type", "dpo")))
    bad = feedback_file(tmp_path / "bad.jsonl", 8, bad_line=3)
    proc = _cli(args(assets, tmp_path / "z", "--train_data", bad))
    assert proc.returncode == 2 and "bad.jsonl" in proc.stderr and ":4" in proc.stderr


def test_help_lists_every_key_with_default():
    proc = _cli(["--help"])
    assert proc.returncode == 0
    for key in ("--beta", "--reward_shift", "--prompt_column", "--rating_threshold", "--mesh", "--udm"):
        assert key in proc.stdout
    assert "(default: 0.1)" in proc.stdout


def test_resume_onto_a_different_mesh_continues_the_same_curve(assets, tmp_path):
    common = ["--eval_data", "", "--export_hf", "false", "--lr_scheduler_type", "constant", "--save_steps", "3"]
    straight = _run_losses(assets, tmp_path / "straight", *common, "--mesh", "1,1,1")
    resumed = tmp_path / "resumed"
    _run_losses(assets, resumed, *common, "--mesh", "8,1,1", "--max_steps", "3")
    curve = _run_losses(assets, resumed, *common, "--mesh", "2,2,2")
    np.testing.assert_allclose(curve, straight, rtol=2e-5)


def test_nonfinite_steps_in_a_row_stop_the_run(assets, tmp_path):
    # A learning rate of 1e30 sends the weights to inf after one update: every later loss is NaN.
    proc = _cli(args(assets, tmp_path / "nan", "--learning_rate", "1e30", "--max_nonfinite_steps", "2",
                     "--eval_data", "", "--max_steps", "20", "--save_steps", "1"))
    assert proc.returncode == 2 and "non-finite steps in a row" in proc.stderr, proc.stderr[-2000:]


def test_dry_run_reports_per_device_memory(assets, tmp_path, capsys):
    report = train.fit(parse_args(args(assets, tmp_path / "dry", "--dry_run", "true", "--mesh", "2,2,2")))
    assert report["temp_size_in_bytes"] > 0 and report["argument_size_in_bytes"] > 0
    assert "MiB per device" in capsys.readouterr().out
    assert not (tmp_path / "dry" / "checkpoints").exists()


def test_evaluate_cli_on_a_training_output(assets, tmp_path):
    out = tmp_path / "for_eval"
    train.fit(parse_args(args(assets, out, "--max_steps", "3")))
    state = json.loads((out / "bco_state.json").read_text())
    report_path = tmp_path / "report" / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "bco_jax.evaluate", "--model", str(out), "--data", assets["eval"],
                           "--num_samples", "8", "--max_new_tokens", "4", "--batch_size", "8",
                           "--reward_fn", "bco_jax.oracle:reward", "--output", str(report_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["delta"] == state["delta"] and report["reference"] == assets["model"]
    assert 0 <= report["reward_accuracy"] <= 1 and 0 <= report["reward_auc"] <= 1
    assert np.isfinite(report["kl"]) and report["samples"] == 8 and 0 <= report["oracle_reward"] <= 1
    samples = [json.loads(line) for line in (tmp_path / "report" / "eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and {"prompt", "completion", "policy_logp", "reference_logp"} <= set(samples[0])
    # A model against itself: KL 0 and every reward 0, exactly.
    from bco_jax import evaluate
    same = evaluate.run(evaluate.parse(["--model", assets["model"], "--data", assets["eval"], "--num_samples", "8",
                                        "--max_new_tokens", "4", "--batch_size", "8",
                                        "--output", str(tmp_path / "same.json")]))
    assert same["kl"] == 0.0 and same["rewards/chosen"] == 0.0 and same["rewards/rejected"] == 0.0


def test_rerunning_a_finished_run_does_not_duplicate_records(assets, tmp_path):
    out = tmp_path / "again"
    common = ["--max_steps", "2", "--export_hf", "false"]
    train.fit(parse_args(args(assets, out, *common)))
    first = read_metrics(out)
    train.fit(parse_args(args(assets, out, *common)))
    second = read_metrics(out)
    assert [r["step"] for r in first] == [r["step"] for r in second] and len(first) == 3
    assert first[-1]["eval_loss"] == second[-1]["eval_loss"]
