"""experiments/real: the SmolLM2 online demonstration's settings, statistics and GPU script, without a
model (the script itself is run by hand: experiments/real/README.md)."""
import os
import subprocess

import numpy as np
import pytest

from experiments.real import online_smollm2 as demo

GPU_SH = os.path.join(demo.ROOT, "experiments", "real", "gpu.sh")


def _keys(method, args) -> dict:
    flat = demo.method_keys(method, args)
    return dict(a.removeprefix("--").split("=", 1) for a in flat if "=" in a)


@pytest.mark.parametrize("preset", list(demo.PRESETS))
def test_methods_see_the_same_rounds_and_answers(preset):
    args = demo.parse(["--preset", preset])
    bco, grpo = _keys("bco", args), _keys("grpo", args)
    for key in ("rounds", "prompts_per_round", "num_generations", "max_completion_length", "temperature", "seed"):
        assert bco[key] == grpo[key]
    answers = args.prompts_per_round * args.num_generations
    assert int(bco["batch_size"]) * int(bco["steps_per_round"]) == answers  # each answer once per round
    assert (grpo["steps_per_round"], grpo["batch_size"], grpo["loss_type"], grpo["beta"]) == ("1", str(answers),
                                                                                             "dapo", "0.0")
    for keys in (bco, grpo):
        assert int(keys["batch_size"]) % int(keys["gradient_accumulation_steps"]) == 0


def test_flags_override_the_preset():
    args = demo.parse(["--preset", "cpu", "--rounds", "3", "--use_peft", "false", "--lr_grpo", "1e-4"])
    assert (args.rounds, args.use_peft, args.lr_grpo, args.prompts_per_round) == (3, False, 1e-4, 32)
    assert "--use_peft=false" in demo.method_keys("grpo", args)


def test_wilson_and_paired_intervals():
    lo, hi = demo.wilson(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    after, before = np.array([[1], [1], [1], [0], [1]]), np.array([[0], [0], [1], [0], [1]])
    out = demo.paired(after, before, seed=0)
    assert out["mean"] == pytest.approx(0.4)
    assert out["ci95"][0] <= 0.4 <= out["ci95"][1]
    assert out["mcnemar"] == {"only_first_passes": 2, "only_second_passes": 0, "exact_p": 0.5}
    many = demo.rate(np.ones((4, 3), bool), seed=0)  # several samples per prompt: a prompt bootstrap too
    assert many["pass_rate"] == 1.0 and many["prompt_bootstrap95"] == [1.0, 1.0]


def test_gpu_script_names_a_missing_half():
    if os.path.exists(os.path.join(demo.ROOT, "outputs", "gpu_payload", "a")):
        pytest.skip("a payload is here (gpu.sh --split ran): the missing-half message is not reachable")
    online = subprocess.run(["bash", GPU_SH, "--part", "online"], capture_output=True, text=True)
    assert online.returncode == 2 and online.stderr.startswith("error: half a of the GGUF")
