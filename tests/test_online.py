"""The online loop (`python -m bco_jax.online`) on the shipped arithmetic model and its oracle judge:
rounds train on the judge's labels of fresh answers, a kill at any named point resumes to the same
weights (a refreshed reference included), a failing or slow judge ends the run in one line naming it,
two processes sample and train what one does, and GRPO's later steps of a round clip against the
policy that sampled it."""
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import jax
import numpy as np
import pytest
from test_multiprocess import launch

from bco_jax import online, oracle, rounds
from bco_jax.judges import UNJUDGED, JudgeError, load_judge, run_judge
from bco_jax.load import load_tokenizer
from bco_jax.oracle import task

PROMPTS = os.path.join(oracle.FEEDBACK_DIR, "train_prompts.jsonl")
ROUNDS = 3


def argv(out, *extra):
    return ["--model", oracle.MODEL_DIR, "--prompts", PROMPTS, "--judge", "arithmetic", "--output_dir", str(out),
            "--rounds", str(ROUNDS), "--prompts_per_round", "8", "--num_generations", "2", "--steps_per_round", "2",
            "--batch_size", "8", "--max_completion_length", "5", "--max_length", "16", "--learning_rate", "1e-3",
            "--tensorboard", "false", "--seed", "5", *extra]


def records(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_rounds_train_on_the_judges_labels_of_fresh_answers(tmp_path):
    out = tmp_path / "run"
    assert online.main(argv(out, "--export_hf", "false")) == 0
    rows = records(out)
    assert [r["round"] for r in rows] == [1, 2, 3] and [r["step"] for r in rows] == [2, 4, 6]
    tok = load_tokenizer(oracle.MODEL_DIR)
    prompts = [json.loads(line)["prompt"] for line in open(PROMPTS)]
    seen = set()
    for r, row in enumerate(rows):
        saved = np.load(out / "rounds" / f"{r:06d}.npz")
        assert row["thumbs_up"] + row["thumbs_down"] == 16 and row["unjudged"] == 0
        # The saved labels are the oracle's verdicts on the saved answers, decoded independently.
        for p, tokens, mask, label in zip(saved["prompt"], saved["tokens"], saved["mask"], saved["labels"]):
            answer = [t for t, m in zip(tokens, mask) if m and t != tok.eos_token_id]
            assert label == task.reward(prompts[p], tok.decode(answer, skip_special_tokens=False))
        assert (saved["prompt"][::2] == saved["prompt"][1::2]).all()  # K = 2 answers per prompt, prompt-major
        seen.update(saved["prompt"].tolist())
        assert row["count/chosen"] == row["thumbs_up"]  # 2 steps of 8 cover the 16 answers once
    assert len(seen) == 3 * 8  # fresh prompts every round
    deltas = [r["delta"] for r in rows]
    assert deltas[0] != deltas[-1] and all(np.isfinite(deltas))  # delta moves and carries across rounds
    state = json.loads((out / "bco_state.json").read_text())
    assert state["step"] == 6 and state["delta"] != 0.0


def _cli(args, env=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    return subprocess.run([sys.executable, "-m", "bco_jax.online", *args], capture_output=True, text=True, env=env)


def saved_arrays(out, step):
    """Checkpoint `step`'s arrays as NumPy: {"train": TrainState fields, "reference": ...}."""
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as checkpointer, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sharding info not provided")  # one CPU device: nothing to place
        return jax.tree.map(np.asarray, checkpointer.restore((out / "checkpoints" / str(step) / "state").absolute()))


def test_a_kill_at_every_named_point_then_rerun_ends_bit_identical(tmp_path):
    # The reference is refreshed after step 3 (mid round 2) and step 6: it must be resumed too.
    sync = ("--sync_ref_model", "true", "--ref_model_sync_steps", "3", "--ref_model_mixup_alpha", "0.6")
    whole, chained = tmp_path / "whole", tmp_path / "chained"
    assert _cli(argv(whole, *sync)).returncode == 0
    # Round 2 is cut after sampling (its answers not saved yet: sampled again), then between its two
    # steps (its saved answers reused). (A checkpoint write in flight: the trainer's chain, same Checkpointer.)
    for fault in ("sampled:2", "step:1"):
        proc = _cli(argv(chained, *sync), env={"BCO_JAX_FAULT": fault})
        assert proc.returncode == -signal.SIGKILL, (fault, proc.stderr[-2000:])
    assert _cli(argv(chained, *sync)).returncode == 0
    assert (whole / "hf" / "model.safetensors").read_bytes() == (chained / "hf" / "model.safetensors").read_bytes()
    for r in range(ROUNDS):
        a, b = (np.load(d / "rounds" / f"{r:06d}.npz") for d in (whole, chained))
        assert all((a[k] == b[k]).all() for k in a.files)
    assert [r["round"] for r in records(chained)] == [1, 2, 3]
    # The reference after step 6 is TRL's mix of the policy then and the reference after step 3 (the
    # one checkpoint 4 holds); the resumed run's equals the uninterrupted one's.
    at4, at6, chained6 = saved_arrays(whole, 4), saved_arrays(whole, 6), saved_arrays(chained, 6)
    mixed = jax.tree.map(lambda p, ref: 0.6 * p.astype(np.float64) + 0.4 * ref, at6["train"]["params"],
                         at4["reference"])
    jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6), at6["reference"],
                 mixed)
    jax.tree.map(np.testing.assert_array_equal, chained6["reference"], at6["reference"])
    assert not np.array_equal(at4["reference"]["embed"], at6["reference"]["embed"])


JUDGES = '''
import math
import time
calls = 0

def raises(prompts, completions, **kw):
    global calls
    calls += 1
    if calls == 2:
        raise KeyError("answer")
    return [1.0] * len(prompts)

def short(prompts, completions, **kw):
    return [True] * (len(prompts) - 1)

def nan(prompts, completions, **kw):
    return [math.nan] * len(prompts)

def slow(prompts, completions, **kw):
    time.sleep(60)

def needs_column(prompts, completions, completion_ids, answer, family, **kw):
    assert len(answer) == len(prompts) == len(completion_ids) and all(isinstance(i, list) for i in completion_ids)
    return [None if f == "sub" else c.strip() == a for c, a, f in zip(completions, answer, family)]
'''


@pytest.fixture
def user_judges(tmp_path, monkeypatch):
    (tmp_path / "user_judges.py").write_text(JUDGES)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("user_judges", None)
    yield "user_judges"
    sys.modules.pop("user_judges", None)


@pytest.mark.parametrize("name, needle", [("raises", "raised KeyError: 'answer' (at "), ("short", "15 scores for 16"),
                                          ("nan", "returned nan"), ("slow", "past judge_timeout=1 s on 16 answers")])
def test_a_failing_judge_stops_the_run_in_one_line_and_keeps_what_was_done(tmp_path, capsys, user_judges, name,
                                                                           needle):
    out = tmp_path / "run"
    t0 = time.perf_counter()
    code = online.main(argv(out, "--judge", f"{user_judges}:{name}", "--export_hf", "false", "--mesh", "1,1,1",
                            "--judge_timeout", "1"))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: judge {user_judges}:{name} ") and needle in last, last
    if name == "raises":  # round 1 was trained and checkpointed; the user's frame is named
        assert "user_judges.py:10 in raises" in last and (out / "checkpoints" / "2").is_dir()
    if name == "slow":  # cut at the timeout, its round not saved as judged
        assert time.perf_counter() - t0 < 30 and not (out / "rounds").exists()


def test_columns_reach_the_judge_and_unjudged_answers_are_left_out(tmp_path, user_judges):
    out = tmp_path / "run"
    judge = f"{user_judges}:needs_column"
    assert online.main(argv(out, "--judge", judge, "--rounds", "1", "--export_hf", "false")) == 0
    row = records(out)[0]
    saved = np.load(out / "rounds" / "000000.npz")
    families = [json.loads(line)["family"] for line in open(PROMPTS)]
    sub = np.array([families[p] == "sub" for p in saved["prompt"]])
    assert (saved["labels"][sub] == UNJUDGED).all() and (saved["labels"][~sub] != UNJUDGED).all()
    assert row["unjudged"] == sub.sum() and row["count/chosen"] + row["count/rejected"] == (~sub).sum()


def test_run_judge_reads_bools_floats_and_none():
    judge = load_judge("arithmetic")
    labels = run_judge(judge, "arithmetic", 0.5, prompts=["1+2=", "1+2="], completions=["3", "4"],
                       completion_ids=[[], []], columns={})
    assert labels.tolist() == [1, 0]
    mixed = run_judge(lambda **kw: [True, 0.7, 0.2, None], "mixed", 0.5, prompts=[""] * 4, completions=[""] * 4,
                      completion_ids=[[]] * 4, columns={})
    assert mixed.tolist() == [1, 1, 0, UNJUDGED]
    with pytest.raises(JudgeError, match="returned 'yes' for answer 0"):
        run_judge(lambda **kw: ["yes"], "strings", 0.5, prompts=[""], completions=[""], completion_ids=[[]], columns={})


def test_a_judge_past_its_timeout_is_cut_even_if_it_catches_exceptions():
    def stubborn(**kw):
        try:
            time.sleep(20)
        except Exception:
            return [True]

    previous, t0 = signal.getsignal(signal.SIGALRM), time.perf_counter()
    with pytest.raises(JudgeError, match=r"judge stubborn ran past judge_timeout=0.2 s on 1 answers"):
        run_judge(stubborn, "stubborn", 0.5, prompts=[""], completions=[""], completion_ids=[[]], columns={},
                  timeout=0.2)
    assert time.perf_counter() - t0 < 3 and signal.getsignal(signal.SIGALRM) is previous
    assert run_judge(lambda **kw: [True], "fast", 0.5, prompts=[""], completions=[""], completion_ids=[[]],
                     columns={}, timeout=5).tolist() == [1]
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # no timer left running


def test_two_processes_sample_and_train_like_one(tmp_path):
    extra = ["--rounds", "1", "--mesh", "2,1,1"]
    launch(2, argv(tmp_path / "multi", *extra), devices=1, module="bco_jax.online")
    assert online.main(argv(tmp_path / "single", *extra)) == 0
    a, b = (np.load(tmp_path / d / "rounds" / "000000.npz") for d in ("multi", "single"))
    assert all((a[k] == b[k]).all() for k in a.files)  # every answer and label alike
    from safetensors.numpy import load_file

    multi, single = (load_file(tmp_path / d / "hf" / "model.safetensors") for d in ("multi", "single"))
    for key in single:
        np.testing.assert_allclose(multi[key], single[key], rtol=2e-5, atol=1e-6, err_msg=key)


def test_online_dpo_pairs_the_first_thumbs_up_with_the_first_thumbs_down_of_each_prompt():
    prompts = rounds.Prompts(texts=["a", "b", "c"], ids=[np.array([1, 5]), np.array([1, 6]), np.array([1, 7])],
                             columns={}, fingerprint="")
    # 3 prompts x K = 3: prompt 0 has ups at 1 and 2, a down at 0; prompt 1 all down; prompt 2 one
    # unjudged, a down at 1, an up at 2.
    labels = np.array([0, 1, 1, 0, 0, 0, UNJUDGED, 0, 1], np.int8)
    answers = {"prompt": np.repeat([0, 1, 2], 3), "labels": labels,
               "tokens": np.arange(9)[:, None] + np.array([[10, 100]]), "mask": np.ones((9, 2), np.int32)}
    data = rounds.round_dataset(prompts, answers, 0, 3, paired=True)
    assert len(data) == 2 and data.paired
    chosen, rejected = data.seqs["chosen"], data.seqs["rejected"]
    assert [chosen.ids(i).tolist() for i in range(2)] == [[1, 5, 11, 101], [1, 7, 18, 108]]
    assert [rejected.ids(i).tolist() for i in range(2)] == [[1, 5, 10, 100], [1, 7, 17, 107]]
    assert chosen.prompt_lens.tolist() == [2, 2]
    unpaired = rounds.round_dataset(prompts, answers, 0, 3, paired=False)
    assert len(unpaired) == 8 and unpaired.labels.tolist() == [False, True, True, False, False, False, False, True]


def test_grpo_trains_on_group_relative_advantages_and_only_online(tmp_path, capsys, monkeypatch):
    steps = []

    class Steps(online.Window):  # every step's metrics, in order
        def add(self, metrics):
            steps.append(metrics)
            super().add(metrics)

    monkeypatch.setattr(online, "Window", Steps)
    out, grpo = tmp_path / "grpo", ("--loss_type", "dapo", "--batch_size", "16", "--rounds", "1", "--warmup_ratio",
                                    "0", "--export_hf", "false")
    assert online.main(argv(out, *grpo, "--steps_per_round", "1")) == 0
    row = records(out)[0]
    # Rewards are the advantages: each prompt's K = 2 answers sum to 0, so both classes' sums cancel.
    sums = row["rewards/chosen"] * row["count/chosen"] + row["rewards/rejected"] * row["count/rejected"]
    assert abs(sums) < 1e-4 and np.isfinite(row["loss"]) and row["grad_norm"] > 0
    config = json.loads((out / "config.json").read_text())
    assert config["beta"] == 0.0  # GRPO's default, as TRL's
    # Two steps on the round's 16 answers: the first at the sampling policy (ratio 1, the loss and
    # gradient of one step per round, also over 2 micro-batches), the second clipped against it.
    assert online.main(argv(tmp_path / "clipped", *grpo, "--steps_per_round", "2", "--epsilon", "0.1",
                            "--gradient_accumulation_steps", "2")) == 0
    one, first, second = steps
    np.testing.assert_allclose(first["grad_norm"], one["grad_norm"], rtol=1e-5)
    np.testing.assert_allclose(first["loss"], one["loss"], atol=1e-6)  # about 0: the advantages sum to 0
    assert np.isfinite(second["loss"]) and second["loss"] != first["loss"] and second["grad_norm"] > 0
    # TRL's clip logs: nothing is clipped at the sampling policy; a fraction of the step's tokens after.
    assert one["clip_ratio/region_mean"] == first["clip_ratio/region_mean"] == 0.0
    assert 0.0 <= second["clip_ratio/low_mean"] <= second["clip_ratio/region_mean"] <= 1.0
    # A reference refresh needs a reference of its own, in use.
    for extra, why in ((("--loss_type", "grpo"), "the reference is not used at beta 0"),
                       (("--use_peft", "true"), "not with use_peft")):
        assert online.main(argv(tmp_path / "x", "--sync_ref_model", "true", *extra)) == 2
        assert f"sync_ref_model: {why}" in capsys.readouterr().err
    from bco_jax import train

    assert train.main(["--model", oracle.MODEL_DIR, "--train_data", oracle.TRAIN_FEEDBACK, "--loss_type", "grpo",
                       "--output_dir", str(tmp_path / "t")]) == 2
    assert "run python -m bco_jax.online" in capsys.readouterr().err
