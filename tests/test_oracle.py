"""The oracle task: the checker on hand cases, the tokenizer, and the shipped model and feedback sets."""
import json
import os

import jax
import numpy as np
import pytest

from bco_jax.oracle import ASSETS, MODEL_DIR, task
from bco_jax.oracle.tokenizer import VOCAB, build_tokenizer

FEEDBACK = os.path.join(ASSETS, "feedback")


def read_jsonl(name):
    with open(os.path.join(FEEDBACK, name)) as f:
        return [json.loads(line) for line in f]


def manifest():
    with open(os.path.join(FEEDBACK, "manifest.json")) as f:
        return json.load(f)


# ---------------------------------------------------------------------------- the oracle


@pytest.mark.parametrize("prompt,completion,expected", [
    ("17+25=", "42", 1.0), ("17+25=", "32", 0.0), ("17+25=", " 42", 1.0), ("17+25=", "42<eos>", 1.0),
    ("17+25=", "042", 0.0), ("17+25=", "", 0.0), ("17+25=", "4 2", 0.0), ("99+99=", "198", 1.0),
    ("52-17=", "35", 1.0), ("52-17=", "45", 0.0), ("5-5=", "0", 1.0), ("0+0=", "0", 1.0),
    ("0+0=", "00", 0.0), ("10-9=", "1", 1.0), ("10-9=", "-1", 0.0),
])
def test_reward_hand_cases(prompt, completion, expected):
    assert task.reward(prompt, completion) == expected
    assert task.is_success(prompt, completion) == (expected == 1.0)


@pytest.mark.parametrize("completion,rating", [
    ("42", 5), ("43", 4), ("32", 4), ("52", 4), ("50", 3), ("33", 3), ("99", 2), ("4", 2), ("39", 3), ("142", 2),
    ("", 1), ("042", 1), ("4+2", 1), ("-42", 1),
])
def test_rating_hand_cases(completion, rating):
    assert task.rating("17+25=", completion) == rating
    assert task.graded_reward("17+25=", completion) == (rating - 1) / 4


def test_rating_five_is_success_on_random_answers():
    rng = np.random.default_rng(0)
    for prompt in rng.choice(task.all_prompts("add") + task.all_prompts("sub"), 300):
        for completion in {task.answer(prompt), task.noisy_answer(prompt, rng, 1.0), str(rng.integers(200))}:
            assert (task.rating(prompt, completion) == 5) == task.is_success(prompt, completion)


def test_prompts_and_errors():
    assert task.parse_prompt("7+35=") == (7, 35, "add")
    assert task.answer("52-17=") == "35" and task.answer("99+99=") == "198"
    assert len(task.all_prompts("add")) == 10000 and len(task.all_prompts("sub")) == 5050
    for bad in ("17+25", "1+2+3=", "117+2=", "a+b=", "3*4="):
        with pytest.raises(ValueError):
            task.parse_prompt(bad)
    with pytest.raises(ValueError):
        task.make_prompt(3, 4, "sub")


def test_mistakes_are_wrong_and_plausible():
    assert task.dropped_carry("17+25=") == "32" and task.dropped_carry("52-17=") == "45"
    assert task.dropped_carry("12+13=") is None  # no carry: no such mistake
    rng = np.random.default_rng(0)
    for prompt in rng.choice(task.all_prompts("add") + task.all_prompts("sub"), 500):
        wrong = task.slipped_digit(prompt, rng)
        assert not task.is_success(prompt, wrong) and task.rating(prompt, wrong) >= 2
    demos = [task.noisy_answer("38+47=", rng, 0.45) for _ in range(4000)]
    assert abs(np.mean([d == "85" for d in demos]) - 0.55) < 0.03


def test_splits_are_disjoint_and_balanced():
    splits = task.split_prompts()
    sets = {k: set(v) for k, v in splits.items()}
    assert sum(map(len, sets.values())) == 15050
    assert not (sets["eval"] & sets["train"]) and not (sets["heldout_feedback"] & sets["train"])
    assert not (sets["eval"] & sets["heldout_feedback"])
    assert sum(task.prompt_family(p) == "add" for p in splits["eval"]) == len(splits["eval"]) // 2
    assert splits == task.split_prompts()  # deterministic


# ---------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_every_prompt_and_answer():
    tok = build_tokenizer()
    texts = task.all_prompts("add") + task.all_prompts("sub")
    texts += [task.answer(p) for p in texts] + [" 1 + 2 = 3", "(4*5)"]
    for text in texts:
        ids = tok(text, add_special_tokens=False).input_ids
        assert ids == [VOCAB[c] for c in text]  # one token per character
        assert tok.decode(ids) == text
    assert tok("1+2=").input_ids == [VOCAB["<bos>"], VOCAB["1"], VOCAB["+"], VOCAB["2"], VOCAB["="]]
    assert tok.apply_chat_template([{"role": "user", "content": "1+2="}], tokenize=False,
                                   add_generation_prompt=True) == "1+2="


@pytest.mark.parametrize("folder", ["tokenizer", "sft"])
def test_shipped_tokenizer_matches_the_built_one(folder):
    from transformers import AutoTokenizer
    shipped, built = AutoTokenizer.from_pretrained(os.path.join(ASSETS, folder)), build_tokenizer()
    for text in ("17+25=42", "99-9=90", " "):
        assert shipped(text).input_ids == built(text).input_ids
    assert (shipped.bos_token_id, shipped.eos_token_id, shipped.pad_token_id) == (1, 2, 0)
    assert shipped.chat_template == built.chat_template


# ---------------------------------------------------------------------------- shipped feedback sets


def test_shipped_feedback_parses_and_agrees_with_the_oracle():
    binary, likert = read_jsonl("binary.jsonl"), read_jsonl("likert.jsonl")
    for rows in (binary, read_jsonl("eval_binary.jsonl"), read_jsonl("mismatch_binary.jsonl")):
        assert rows and all(set(r) == {"prompt", "completion", "label"} for r in rows)
        assert all(r["completion"].isdigit() and r["label"] == task.is_success(r["prompt"], r["completion"])
                   for r in rows)
        assert 0.3 < np.mean([r["label"] for r in rows]) < 0.7  # both labels, neither rare
    assert all(set(r) == {"prompt", "completion", "rating"} for r in likert)
    assert [r["completion"] for r in likert] == [r["completion"] for r in binary]
    assert all(r["rating"] == task.rating(r["prompt"], r["completion"]) for r in likert)
    for name in ("paired.jsonl", "eval_paired.jsonl"):
        rows = read_jsonl(name)
        assert rows and all(set(r) == {"prompt", "chosen", "rejected"} for r in rows)
        assert all(task.is_success(r["prompt"], r["chosen"]) and r["rejected"]
                   and not task.is_success(r["prompt"], r["rejected"]) for r in rows)
    assert len(binary) >= 2000 and len(read_jsonl("eval_binary.jsonl")) >= 200


def test_shipped_feedback_keeps_held_out_prompts_out():
    splits = task.split_prompts()
    train = {r["prompt"] for n in ("binary.jsonl", "paired.jsonl", "mismatch_binary.jsonl")
             for r in read_jsonl(n)}
    assert train <= set(splits["train"])
    assert {r["prompt"] for r in read_jsonl("eval_binary.jsonl")} <= set(splits["heldout_feedback"])
    assert [r["prompt"] for r in read_jsonl("eval_prompts.jsonl")] == splits["eval"]


def test_mismatch_set_ties_labels_to_families():
    rows = read_jsonl("mismatch_binary.jsonl")
    up = [task.prompt_family(r["prompt"]) == "add" for r in rows if r["label"]]
    down = [task.prompt_family(r["prompt"]) == "sub" for r in rows if not r["label"]]
    assert np.mean(up) > 0.75 and np.mean(down) > 0.75


# ---------------------------------------------------------------------------- shipped model


def test_shipped_model_is_small_and_loads_in_transformers():
    import torch
    from transformers import AutoModelForCausalLM
    size = sum(os.path.getsize(os.path.join(MODEL_DIR, f)) for f in os.listdir(MODEL_DIR))
    assert size < 2 * 2**20
    hf = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    assert type(hf).__name__ == "LlamaForCausalLM"
    ids = [[1] + [VOCAB[c] for c in "17+25=42"]]
    with torch.no_grad():
        hf_logits = hf(torch.tensor(ids)).logits.numpy()
    assert np.isfinite(hf_logits).all()
    from bco_jax.models import load_hf
    ours = np.asarray(load_hf(MODEL_DIR)(np.array(ids, np.int32)))
    np.testing.assert_allclose(ours, hf_logits, atol=1e-4, rtol=1e-4)


def test_shipped_model_reproduces_its_stated_success_rate():
    from transformers import AutoTokenizer

    from bco_jax.models import load_hf
    from bco_jax.oracle.sampling import success_rate
    model, tok = load_hf(MODEL_DIR), AutoTokenizer.from_pretrained(MODEL_DIR)
    stated = manifest()["sft_success_eval_prompts"]["success"]
    assert 0.4 <= stated <= 0.6
    measured = success_rate(model, tok, task.split_prompts()["eval"], jax.random.key(123),
                            batch_size=300)
    # 300 samples: binomial std ~0.029; a different key, so only agreement within noise is expected.
    assert abs(measured["success"] - stated) < 0.1, (measured, stated)


def test_trainer_data_pipeline_reads_every_shipped_set():
    from transformers import AutoTokenizer

    from bco_jax.data import DataConfig, load_dataset
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    binary = load_dataset([os.path.join(FEEDBACK, "binary.jsonl")], tok, DataConfig())
    likert = load_dataset([os.path.join(FEEDBACK, "likert.jsonl")], tok,
                          DataConfig(rating_threshold=5, rating_range=[1, 5]))
    np.testing.assert_array_equal(binary.labels, likert.labels)  # rating 5 <=> right answer
    for name in ("paired.jsonl", "mismatch_binary.jsonl", "eval_binary.jsonl", "eval_paired.jsonl"):
        assert len(load_dataset([os.path.join(FEEDBACK, name)], tok, DataConfig()))
    # BOS, question, answer, EOS: the layout the SFT model was trained on.
    first = read_jsonl("binary.jsonl")[0]
    seq = binary.seqs["completion"]
    assert list(seq.tokens[:seq.offsets[1]]) == (
        [1] + [VOCAB[c] for c in first["prompt"] + first["completion"]] + [2])


def test_sampled_junk_tokens_are_scored_as_malformed(monkeypatch):
    import bco_jax.oracle.sampling as sampling
    tok = build_tokenizer()
    # Generated rows (EOS = 2, then padding) and the text the oracle must see: an id past the
    # vocabulary (the model's spare rows) or a stray special token must not vanish from the answer.
    cases = {"12": [VOCAB["1"], VOCAB["2"], 2, 0, 0], "1<unk>2": [VOCAB["1"], 25, VOCAB["2"], 2, 0],
             "1<bos>": [VOCAB["1"], 1, 2, 0, 0]}
    for text, row in cases.items():
        mask = [1] * (row.index(2) + 1) + [0] * (len(row) - row.index(2) - 1)
        monkeypatch.setattr(sampling, "generate",
                            lambda *a, row=row, mask=mask, **k: (np.array([row] * 4), np.array([mask] * 4)))
        assert sampling.sample_completions(None, tok, ["5+7="], jax.random.key(0), batch_size=4) == [text]
    assert task.reward("5+7=", "12") == 1.0 and task.reward("5+7=", "1<unk>2") == 0.0
