"""The interval task (`bco_jax.oracle.interval`): the oracle on hand cases, the noisy demonstrations,
the splits, and the shipped SFT model and feedback sets (with one short trainer run on them)."""
import json
import os
from collections import Counter

import numpy as np
import pytest

from bco_jax.oracle import INTERVAL_ASSETS, INTERVAL_FEEDBACK_DIR, INTERVAL_MODEL_DIR, TOKENIZER_DIR, interval
from bco_jax.oracle.sampling import PROMPT_WIDTH
from bco_jax.oracle.tokenizer import VOCAB, build_tokenizer

FEEDBACK_FILES = ("binary.jsonl", "likert.jsonl", "paired.jsonl", "eval_binary.jsonl", "eval_paired.jsonl",
                  "eval_prompts.jsonl", "manifest.json")


def read_jsonl(name):
    with open(os.path.join(INTERVAL_FEEDBACK_DIR, name)) as f:
        return [json.loads(line) for line in f]


def manifest():
    with open(os.path.join(INTERVAL_FEEDBACK_DIR, "manifest.json")) as f:
        return json.load(f)


# ---------------------------------------------------------------------------- the oracle


@pytest.mark.parametrize("prompt,completion,expected", [
    ("(12 57)", "30", 1.0), ("(12 57)", "13", 1.0), ("(12 57)", "56", 1.0), ("(12 57)", "12", 0.0),
    ("(12 57)", "57", 0.0), ("(12 57)", "11", 0.0), ("(12 57)", "58", 0.0), ("(12 57)", " 30 ", 1.0),
    ("(12 57)", "30<eos>", 1.0), ("(12 57)", "3<eos>0", 0.0), ("(12 57)", "030", 0.0), ("(12 57)", "", 0.0),
    ("(12 57)", "3 0", 0.0), ("(12 57)", "+30", 0.0), ("(12 57)", "-30", 0.0), ("(12 57)", "<unk>", 0.0),
    ("(0 2)", "1", 1.0), ("(0 2)", "0", 0.0), ("(0 2)", "01", 0.0), ("(97 99)", "98", 1.0), ("(0 99)", "0", 0.0),
])
def test_reward_hand_cases(prompt, completion, expected):
    assert interval.reward(prompt, completion) == expected
    assert interval.is_success(prompt, completion) == (expected == 1.0)


@pytest.mark.parametrize("completion,rating", [
    ("30", 5), ("13", 5), ("56", 5), ("30<eos>", 5),
    ("12", 4), ("57", 4), ("12<eos>", 4), (" 57", 4),  # the boundaries: the closed-interval mistake
    ("11", 3), ("7", 3), ("58", 3), ("62", 3),  # within 5 of the interval
    ("6", 2), ("63", 2), ("0", 2), ("99", 2), ("130", 2),  # any other number
    ("", 1), ("030", 1), ("012", 1), ("00", 1), ("3 0", 1), ("-5", 1), ("+30", 1), ("1<eos>2", 1), ("<unk>", 1),
    ("(12 57)", 1),
])
def test_rating_hand_cases(completion, rating):
    assert interval.rating("(12 57)", completion) == rating
    assert interval.graded_reward("(12 57)", completion) == (rating - 1) / 4


def test_rating_five_is_success_on_random_answers():
    rng = np.random.default_rng(0)
    prompts = interval.all_prompts("narrow") + interval.all_prompts("wide")
    for prompt in rng.choice(prompts, 300):
        for completion in {interval.noisy_answer(prompt, rng, 0.5), str(rng.integers(120)), f"0{rng.integers(10)}"}:
            assert (interval.rating(prompt, completion) == 5) == interval.is_success(prompt, completion)


def test_prompts_parse_and_fit_the_tokenizer():
    assert interval.parse_prompt("(12 57)") == (12, 57, "wide")
    assert interval.parse_prompt("(0 2)") == (0, 2, "narrow")
    assert interval.prompt_family("(10 40)") == "narrow" and interval.prompt_family("(10 41)") == "wide"
    for bad in ("(12 13)", "(13 12)", "(5 5)", "(05 10)", "(12 100)", "12 57", "(12  57)", "(12 57) ", "(-1 5)",
                "(1,5)", "17+25="):
        with pytest.raises(ValueError):
            interval.parse_prompt(bad)
    with pytest.raises(ValueError):
        interval.make_prompt(3, 4)
    narrow, wide = interval.all_prompts("narrow"), interval.all_prompts("wide")
    assert (len(narrow), len(wide)) == (2436, 2415) and len(set(narrow + wide)) == 4851
    assert all(interval.prompt_family(p) == "narrow" for p in narrow)
    assert all(interval.prompt_family(p) == "wide" for p in wide)
    tok = build_tokenizer()
    for text in narrow + wide:
        assert len(text) + 1 <= PROMPT_WIDTH  # BOS + the prompt fits sampling's fixed width
        assert tok(text, add_special_tokens=False).input_ids == [VOCAB[c] for c in text]


def test_splits_are_disjoint_and_balanced():
    splits = interval.split_prompts()
    sets = {k: set(v) for k, v in splits.items()}
    assert {k: len(v) for k, v in splits.items()} == {"eval": 300, "heldout_feedback": 400, "train": 4151}
    assert sets["eval"] | sets["heldout_feedback"] | sets["train"] == set(interval.all_prompts("narrow")
                                                                          + interval.all_prompts("wide"))
    assert sum(map(len, sets.values())) == 4851  # no prompt twice
    for name in ("eval", "heldout_feedback"):
        assert sum(interval.prompt_family(p) == "narrow" for p in splits[name]) == len(splits[name]) // 2
    # Each family keeps more than the 1,500 training prompts make_feedback.py draws from it.
    assert min(Counter(map(interval.prompt_family, splits["train"])).values()) > 1500
    assert splits == interval.split_prompts() and splits != interval.split_prompts(seed=1)


# ---------------------------------------------------------------------------- noisy demonstrations


def kinds(prompt, answers):
    a, b, _ = interval.parse_prompt(prompt)
    return Counter("inside" if a < int(x) < b else "boundary" if int(x) in (a, b) else "near" for x in answers)


def test_noisy_answers_have_the_stated_error_kinds_and_rates():
    rng = np.random.default_rng(0)
    n = 20000
    answers = [interval.noisy_answer("(12 57)", rng, 0.5) for _ in range(n)]
    assert all(x.isdigit() and str(int(x)) == x for x in answers)  # plain decimal, no leading zeros
    assert all(interval.rating("(12 57)", x) >= 3 for x in answers)  # inside, a boundary, or just outside
    count = kinds("(12 57)", answers)
    for kind, p in (("inside", 0.5), ("boundary", 0.25), ("near", 0.25)):
        assert abs(count[kind] / n - p) < 0.015, count  # binomial sd <= 0.0036
    values = Counter(answers)
    assert abs(values["12"] - values["57"]) < 0.03 * n  # both boundaries alike
    assert {int(x) for x in values} == set(range(7, 63))  # all of the interior and the ten near misses
    # Each right answer is individually unlikely, each mistake concentrated: the exact distribution.
    dist = interval.answer_distribution("(12 57)", 0.5)
    assert sum(dist.values()) == pytest.approx(1.0)
    assert dist[30] == pytest.approx(0.5 / 44) and dist[12] == dist[57] == 0.125 and dist[7] == dist[62] == 0.025
    for x, p in dist.items():
        assert abs(values[str(x)] / n - p) < 4 * np.sqrt(p * (1 - p) / n) + 1e-3, (x, p)


def test_noisy_answers_at_the_edges_of_the_range():
    rng = np.random.default_rng(1)
    near_zero = Counter(interval.noisy_answer("(2 9)", rng, 1.0) for _ in range(4000))
    assert set(near_zero) == {"0", "1", "2", "9", "10", "11", "12", "13", "14"}  # kept within 0..99
    assert set(interval.near_misses("(0 40)")) == set(range(41, 46))
    top = Counter(interval.noisy_answer("(0 99)", rng, 1.0) for _ in range(2000))
    assert set(top) == {"0", "99"}  # no number just outside 0..99: a boundary instead
    assert {x: p for x, p in interval.answer_distribution("(0 99)", 1.0).items() if p} == {0: 0.5, 99: 0.5}
    for prompt in ("(2 9)", "(95 99)", "(0 99)", "(40 43)"):
        assert sum(interval.answer_distribution(prompt, 0.3).values()) == pytest.approx(1.0)
    assert all(interval.is_success("(40 43)", interval.noisy_answer("(40 43)", rng, 0.0)) for _ in range(200))
    assert not any(interval.is_success("(40 43)", interval.noisy_answer("(40 43)", rng, 1.0)) for _ in range(200))


def test_demonstrations_draw_both_families_equally():
    rng = np.random.default_rng(0)
    stream = interval.demonstrations(interval.split_prompts()["train"], rng, 0.5)
    demos = [next(stream) for _ in range(4000)]
    assert abs(np.mean([interval.prompt_family(p) == "narrow" for p, _ in demos]) - 0.5) < 0.03
    assert abs(np.mean([interval.is_success(p, x) for p, x in demos]) - 0.5) < 0.03


# ---------------------------------------------------------------------------- shipped assets


def test_shipped_assets_exist_and_are_small():
    assert sorted(os.listdir(INTERVAL_FEEDBACK_DIR)) == sorted(FEEDBACK_FILES)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(
        os.listdir(INTERVAL_MODEL_DIR))
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(INTERVAL_ASSETS) for f in fs)
    assert total < 2 * 2**20
    # The oracle task's tokenizer, unchanged.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(INTERVAL_MODEL_DIR, name)) as a, open(os.path.join(TOKENIZER_DIR, name)) as b:
            assert json.load(a) == json.load(b)


def test_shipped_model_is_the_arithmetic_recipe():
    from bco_jax.oracle import MODEL_DIR
    with open(os.path.join(INTERVAL_MODEL_DIR, "config.json")) as a, open(os.path.join(MODEL_DIR, "config.json")) as b:
        assert json.load(a) == json.load(b)  # the same tiny Llama
    with open(os.path.join(INTERVAL_MODEL_DIR, "training_log.json")) as f:
        log = json.load(f)
    assert log["args"]["task"] == "interval" and log["args"]["steps"] == 2000 and log["args"]["noise"] == 0.5


def test_success_rate_scores_with_the_task_it_is_given(monkeypatch):
    import jax

    import bco_jax.oracle.sampling as sampling
    tok = build_tokenizer()
    row, mask = [VOCAB["3"], VOCAB["0"], 2, 0, 0], [1, 1, 1, 0, 0]  # "30" <eos>
    monkeypatch.setattr(sampling, "generate", lambda *a, **k: (np.array([row] * 4), np.array([mask] * 4)))
    prompts = ["(12 57)", "(29 31)", "(30 40)", "(0 60)"]
    rate = sampling.success_rate(None, tok, prompts, jax.random.key(0), batch_size=4, task=interval)
    assert rate == {"success": 0.75, "n": 4, "success_narrow": 0.5, "success_wide": 1.0}


def test_shipped_feedback_agrees_with_the_oracle():
    splits = interval.split_prompts()
    assert read_jsonl("eval_prompts.jsonl") == [dict(prompt=p, family=interval.prompt_family(p))
                                                for p in splits["eval"]]
    binary, likert = read_jsonl("binary.jsonl"), read_jsonl("likert.jsonl")
    for rows, pool in ((binary, splits["train"]), (read_jsonl("eval_binary.jsonl"), splits["heldout_feedback"])):
        assert rows and all(set(r) == {"prompt", "completion", "label"} for r in rows)
        assert all(r["completion"].isdigit() and r["label"] == interval.is_success(r["prompt"], r["completion"])
                   for r in rows)
        assert {r["prompt"] for r in rows} <= set(pool)
        assert 0.3 < np.mean([r["label"] for r in rows]) < 0.7  # both labels, neither rare
    assert len(binary) >= 2900 and len({r["prompt"] for r in binary}) == len(binary)
    assert [(r["prompt"], r["completion"]) for r in likert] == [(r["prompt"], r["completion"]) for r in binary]
    assert all(r["rating"] == interval.rating(r["prompt"], r["completion"]) for r in likert)
    for name, pool in (("paired.jsonl", splits["train"]), ("eval_paired.jsonl", splits["heldout_feedback"])):
        rows = read_jsonl(name)
        assert len(rows) > 100 and all(set(r) == {"prompt", "chosen", "rejected"} for r in rows)
        assert all(interval.is_success(r["prompt"], r["chosen"]) and r["rejected"]
                   and not interval.is_success(r["prompt"], r["rejected"]) for r in rows)
        assert {r["prompt"] for r in rows} <= set(pool)
    stated = manifest()
    assert 0.4 <= stated["sft_success_eval_prompts"]["success"] <= 0.6
    assert stated["files"]["binary.jsonl"]["rows"] == len(binary)


def test_trainer_runs_on_the_shipped_interval_set(tmp_path):
    from bco_jax import train
    from bco_jax.config import parse_args
    # Two steps, no evaluation or export: the run reads the set, tokenizes it with the model's tokenizer and
    # trains (most of the ~15 s is compiling the step).
    result = train.fit(parse_args([
        "--model", INTERVAL_MODEL_DIR, "--train_data", os.path.join(INTERVAL_FEEDBACK_DIR, "binary.jsonl"),
        "--eval_data", "", "--output_dir", str(tmp_path / "run"), "--batch_size", "16", "--max_steps", "2",
        "--learning_rate", "1e-3", "--logging_steps", "1", "--warmup_ratio", "0", "--max_length", "16",
        "--length_buckets", "16", "--tensorboard", "false", "--export_hf", "false", "--save_reference", "false"]))
    assert np.isfinite(result["loss"]) and result["count/chosen"] + result["count/rejected"] == 16
