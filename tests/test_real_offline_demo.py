"""experiments/real: the SmolLM2 offline demonstration's pairing, cache key, training keys, result tables
and the GPU script's offline part, without a model (the script itself is run by hand:
experiments/real/README.md)."""
import os
import shutil
import stat
import subprocess

import numpy as np
import pytest

from experiments.real import offline_smollm2 as demo
from experiments.real import online_smollm2

GPU_SH = os.path.join(demo.ROOT, "experiments", "real", "gpu.sh")


def _answers(labels_by_prompt: dict) -> list[dict]:
    return [{"index": p, "k": k, "text": f"{p}-{k}", "label": label}
            for p, labels in labels_by_prompt.items() for k, label in enumerate(labels)]


def test_pairs_are_disjoint_passes_with_fails_of_one_prompt():
    answers = _answers({3: [1, 0, 1, 1], 5: [1, 1, 1, 1], 8: [0, 1, 0, 1], 9: [0, 0, 0, 0], 11: [0, -1, 1, 0]})
    pairs = demo.disjoint_pairs([a for a in answers if a["label"] >= 0])
    assert [(u["text"], d["text"]) for u, d in pairs] == [("3-0", "3-1"), ("8-1", "8-0"), ("8-3", "8-2"),
                                                        ("11-2", "11-0")]
    used = [a["text"] for pair in pairs for a in pair]
    assert len(used) == len(set(used))  # no answer twice: DPO sees a subset of BCO's answers
    assert all(u["index"] == d["index"] and u["label"] == 1 and d["label"] == 0 for u, d in pairs)


def test_the_cache_key_follows_every_data_setting(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x" * 10)
    args = demo.parse(["--preset", "cpu"])
    key = demo.data_key(demo.data_settings(args, str(model)))
    assert key == demo.data_key(demo.data_settings(demo.parse(["--preset", "cpu", "--lr_tuned", "1"]), str(model)))
    for flags in (["--train_prompts", "65"], ["--num_generations", "3"], ["--seed", "1"],
                  ["--max_completion_length", "47"]):
        assert demo.data_key(demo.data_settings(demo.parse(["--preset", "cpu", *flags]), str(model))) != key
    model.write_bytes(b"x" * 11)  # another model file
    assert demo.data_key(demo.data_settings(args, str(model))) != key


def _keys(method, rate, args) -> dict:
    flat = demo.train_keys(method, rate, 5, args, "/data")
    return dict(a.removeprefix("--").split("=", 1) for a in flat)


@pytest.mark.parametrize("preset", list(demo.PRESETS))
def test_methods_see_the_same_sequences_per_step(preset):
    args = demo.parse(["--preset", preset])
    for rate in demo.RATES:
        bco, bce, dpo = (_keys(m, rate, args) for m in demo.METHODS)
        assert bco["train_data"] == bce["train_data"] == "/data/unpaired.jsonl" and bco["paired"] == "false"
        assert dpo["train_data"] == "/data/paired.jsonl" and dpo["paired"] == "true"
        assert int(bco["batch_size"]) == int(bce["batch_size"]) == 2 * int(dpo["batch_size"]) == args.batch_size
        assert (bco["loss_type"], bce["loss_type"], dpo["loss_type"]) == demo.METHODS
        assert bco["reward_shift"] == "ema" and "reward_shift" not in bce
        for keys in (bco, bce, dpo):
            assert int(keys["batch_size"]) % int(keys["gradient_accumulation_steps"]) == 0
            assert (keys["seed"], keys["use_peft"], keys["beta"]) == ("5", str(args.use_peft).lower(), "0.1")
            lr, epochs = (args.lr_small, args.epochs_small) if rate == "small" else (args.lr_tuned, args.epochs_tuned)
            assert (float(keys["learning_rate"]), float(keys["num_train_epochs"])) == (lr, epochs)
    assert args.lr_small < args.lr_tuned and args.epochs_small == 1


def _score(passes) -> dict:
    x = np.array(passes, int)[:, None]
    return {**online_smollm2.rate(x, seed=0), "passes": x.tolist()}


def test_comparisons_and_table():
    args = demo.parse(["--preset", "smoke", "--rates", "small"])
    before = _score([0, 0, 1, 1])
    scores = {"instruct": before, "bco_small": _score([1, 1, 1, 1]), "bce_small": _score([1, 0, 1, 1]),
              "dpo_small": _score([0, 0, 1, 1])}
    for name in ("bco_small", "bce_small", "dpo_small"):
        scores[name].update(kl_to_base=0.05, minus_before=demo.paired(scores[name]["passes"], before["passes"], 0))
    runs = {name: {"learning_rate": 7e-5, "epochs": 1.0, "optimizer_steps": 4, "wall_s": 100.0, "cpu_s": 150.0}
            for name in scores if name != "instruct"}
    result = {"scores": scores, "runs": runs}
    result["comparisons"] = demo.compare(result, args)
    assert list(result["comparisons"]) == ["bco_small_minus_bce_small", "bco_small_minus_dpo_small"]
    assert result["comparisons"]["bco_small_minus_bce_small"]["mean"] == pytest.approx(0.25)
    assert result["comparisons"]["bco_small_minus_dpo_small"]["mcnemar"]["only_first_passes"] == 2
    text = demo.table(result)
    assert "| bco_small | 7e-05 x 1 (4) | 1.000 (4/4) |" in text and "+0.500 [" in text
    assert "| instruct |  | 0.500 (2/4) |" in text and "bco_small minus dpo_small: +0.500" in text
    assert (demo.run_name("bco", "tuned", 2, 3), demo.run_name("dpo", "small", 0, 1)) == ("bco_tuned_seed2",
                                                                                          "dpo_small")


def test_gpu_script_runs_the_offline_preset(tmp_path):
    """`--part offline [--smoke]` runs offline_smollm2's gpu (smoke) preset on the reassembled GGUF, or says
    which half of the payload is missing; the gpu preset refuses a machine without nvidia-smi. A stand-in
    python records the command instead of running it, a stand-in nvidia-smi plays the GPU."""
    if not os.path.exists(os.path.join(demo.ROOT, "outputs", "gpu_payload", "b")):
        out = subprocess.run(["bash", GPU_SH, "--part", "offline", "--smoke"], capture_output=True, text=True)
        assert out.returncode == 2 and out.stderr.startswith("error: half a of the GGUF")
        return
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "$@" >> "$CALLS"\n[ "$1" = - ] && cat > /dev/null\nexit 0\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PYTHON=str(fake), OUT=str(tmp_path / "out"), CALLS=str(tmp_path / "calls"))
    if not shutil.which("nvidia-smi"):  # the full preset refuses a machine without a GPU, at once
        out = subprocess.run(["bash", GPU_SH, "--part", "offline"], capture_output=True, text=True, env=env)
        assert out.returncode == 2 and "no GPU here" in out.stderr and not (tmp_path / "calls").exists()
    (tmp_path / "bin").mkdir()
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho stand-in GPU\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    env["PATH"] = f"{tmp_path / 'bin'}:{env['PATH']}"
    for flags, preset in ((["--smoke"], "smoke"), ([], "gpu")):
        name = "offline_smollm2_gpu" + ("_smoke" if flags else "")
        (tmp_path / "calls").write_text("")
        out = subprocess.run(["bash", GPU_SH, "--part", "offline", *flags], capture_output=True, text=True, env=env,
                             stdin=subprocess.DEVNULL)
        assert out.returncode == 0 and "stand-in GPU" in out.stdout, out.stderr
        run = [c for c in (tmp_path / "calls").read_text().splitlines() if "offline_smollm2" in c]
        assert len(run) == 1 and run[0].startswith(f"-m experiments.real.offline_smollm2 --preset {preset} --model ")
        assert run[0].endswith(f"--out {tmp_path}/out/{name}.json")
