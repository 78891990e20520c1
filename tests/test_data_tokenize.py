"""Tokenization: the same ids and loss mask as TRL 1.13.0's BCOTrainer, and our truncation rules."""
import logging
import os

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from test_data_fixtures import make_tokenizer

from bco_jax.data import DataConfig, DataError, assemble, pad_token_id
from bco_jax.data.dataset import TokenizedDataset
from bco_jax.data.errors import Issues
from bco_jax.data.formats import Example, extract_prompt
from bco_jax.data.tokenize import TruncationStats, encode, split_ids, tokenize_examples

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

TEXT_EXAMPLES = [
    ("The sky is", " blue.", True),
    ("The sky is bl", "ue and the sea is blue too.", False),  # "bl" + "ue" merge into "blue"
    ("What color is the sky?", " It is blue.", True),
    ("Hello!", " How are you today? I am fine, thank you.", False),
    ("Grass is green, blood is red,", " the night is black.</s>", True),  # completion already ends in EOS
]


def trl_ids(tok, examples, max_length):
    """TRL's own functions on the same examples: (ids, loss mask) per example."""
    from trl.experimental.bco.bco_trainer import _process_tokens, _tokenize

    batch = {"prompt": [e[0] for e in examples], "completion": [e[1] for e in examples]}
    toks = _tokenize(batch, tok)
    out = []
    for i, (prompt, completion, label) in enumerate(examples):
        # datasets.map stores TRL's intermediate arrays as lists; do the same.
        ex = {k: [int(x) for x in v[i]] for k, v in toks.items()}
        ex.update(prompt=prompt, completion=completion, label=label)
        res = _process_tokens(ex, prefix="", is_encoder_decoder=False, tokenizer=tok,
                              max_length=max_length, max_completion_length=None)
        ids = res["completion_input_ids"]
        out.append((ids, [int(x != -100) for x in res["completion_labels"]]))
    return out


def our_ids(tok, examples, max_length, **cfg_kw):
    cfg = DataConfig(max_length=max_length, **cfg_kw)
    records = [Example(p, c, lab, f"ex{i}") for i, (p, c, lab) in enumerate(examples)]
    stats = TruncationStats()
    seqs, labels, keep = tokenize_examples(tok, records, cfg, Issues(), stats)
    data = TokenizedDataset({"completion": seqs}, labels, np.zeros(len(keep), np.int32), pad_token_id(tok))
    batch = assemble(data, cfg, np.arange(len(keep)), 0, 1, cfg.buckets())
    out = []
    for r in range(len(keep)):
        n = batch.main.attention_mask[r].sum()
        out.append((batch.main.input_ids[r, :n].tolist(), batch.main.loss_mask[r, :n].tolist()))
    return out, stats


@pytest.mark.parametrize("bos", [True, False])
def test_token_ids_match_trl(bos):
    tok = make_tokenizer(bos=bos)
    p = tok(TEXT_EXAMPLES[1][0], add_special_tokens=False)["input_ids"]
    f = tok(TEXT_EXAMPLES[1][0] + TEXT_EXAMPLES[1][1], add_special_tokens=False)["input_ids"]
    assert f[:len(p)] != p, "the merge case must really merge"
    ours, _ = our_ids(tok, TEXT_EXAMPLES, 64)
    assert ours == trl_ids(tok, TEXT_EXAMPLES, 64)
    if bos:
        assert all(ids[0] == tok.bos_token_id for ids, _ in ours)
    assert all(ids[-1] == tok.eos_token_id and mask[-1] == 1 for ids, mask in ours)


@pytest.mark.parametrize("max_length", [8, 10, 12])
def test_completion_truncation_matches_trl_where_trl_is_sane(max_length):
    tok = make_tokenizer()
    examples = [e for e in TEXT_EXAMPLES if len(tok(e[0])["input_ids"]) + 2 < max_length]
    ours, stats = our_ids(tok, examples, max_length)
    trl = trl_ids(tok, examples, max_length)
    assert stats.completion_truncated > 0 and stats.prompt_truncated == 0
    assert all(len(ids) <= max_length for ids, _ in ours)
    for (_, c, _), mine, theirs in zip(examples, ours, trl):
        if c.endswith("</s>") and len(theirs[0]) > max_length:
            # TRL reserves no EOS slot for a completion ending in EOS, cuts it off, then appends
            # one: max_length + 1 tokens. We keep the slot, so only the last kept token differs.
            assert mine[0] == theirs[0][:max_length - 1] + [theirs[0][-1]]
        else:
            assert mine == theirs


def test_long_prompt_keeps_its_end_and_min_completion():
    tok = make_tokenizer()
    prompt = "Grass is green, blood is red, the night is black. " * 4 + "What color is the sky?"
    ex = [(prompt, " It is blue and the sea is blue too.", True)]
    ours, stats = our_ids(tok, ex, 16, min_completion_length=5)
    ids, mask = ours[0]
    assert len(ids) <= 16 and sum(mask) == 5
    assert stats.prompt_truncated == 1 and stats.completion_truncated == 1
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    n_prompt = len(ids) - sum(mask) - 1  # minus BOS
    assert ids[0] == tok.bos_token_id and ids[1:1 + n_prompt] == p_ids[-n_prompt:]
    capped, _ = our_ids(tok, ex, 16, max_prompt_length=4)
    assert len(capped[0][0]) - sum(capped[0][1]) == 4


def test_unfittable_example_is_dropped_and_counted():
    tok = make_tokenizer(bos=False)
    cfg = DataConfig(max_length=3, min_completion_length=2)
    stats = TruncationStats()
    out = encode(tok, [("The sky is", " blue.", "f.jsonl:3")], cfg, Issues(), stats)
    assert out == [None] and stats.dropped_too_long == 1 and stats.dropped[0][0] == "f.jsonl:3"


def test_chat_rendering_matches_trl():
    from trl.data_utils import maybe_apply_chat_template

    tok = make_tokenizer()
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What color is the sky?"}]
    completion = [{"role": "assistant", "content": "It is blue."}]
    trl = maybe_apply_chat_template({"prompt": prompt, "completion": completion, "label": True}, tok)
    ours = encode(tok, [(prompt, completion, "x")], DataConfig(max_length=128), Issues(), TruncationStats())
    ids, plen = ours[0]
    assert ids == trl_ids(tok, [(trl["prompt"], trl["completion"], True)], 128)[0][0]
    assert tok.decode(ids[plen:]) == "It is blue.<|end|>\n</s>"
    cont = encode(tok, [(prompt + [{"role": "assistant", "content": "It"}],
                         [{"role": "assistant", "content": " is"}], "y")],
                  DataConfig(max_length=128), Issues(), TruncationStats())
    assert cont[0] is not None


def test_extract_prompt_matches_trl():
    from trl.data_utils import extract_prompt as trl_extract

    cases = [("The sky is blue.", "The sky is green."), ("Same start, then A", "Same start, then B"),
             ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
              [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}])]
    for chosen, rejected in cases:
        t = trl_extract({"chosen": chosen, "rejected": rejected})
        assert extract_prompt(chosen, rejected) == (t["prompt"], t["chosen"], t["rejected"])


def test_split_ids_merge_fixup():
    assert split_ids([1, 2, 3], [1, 2, 3, 4]) == ([1, 2, 3], [4])
    assert split_ids([1, 2, 3], [1, 2, 9, 4]) == ([1, 2], [9, 4])


def test_pad_token_chosen_once(caplog):
    tok = make_tokenizer(pad=False)
    with caplog.at_level(logging.WARNING, logger="bco_jax.data"):
        assert pad_token_id(tok) == tok.eos_token_id
        pad_token_id(tok)
    assert sum("no pad token" in r.message for r in caplog.records) <= 1


WORDS = ["The", "sky", "is", "blue", "and", "the", "sea", "green.", "What", "color?", "It", "is", "bl", "ue", "bird",
         "berry", "Hello!", ","]


@given(st.lists(st.sampled_from(WORDS), min_size=1, max_size=8),
       st.lists(st.sampled_from(WORDS), min_size=1, max_size=12),
       st.integers(0, 3), st.booleans(), st.booleans(), st.integers(6, 40))
def test_token_ids_match_trl_property(prompt_words, completion_words, cut, space, bos, max_length):
    """Random texts, random split points (often mid-word, so tokens merge across the boundary)."""
    text = " ".join(prompt_words + completion_words)
    split = max(1, len(" ".join(prompt_words)) - cut)
    prompt, completion = text[:split], (" " if space else "") + text[split:]
    tok = make_tokenizer(bos=bos)
    assume(completion.strip() and len(tok(prompt)["input_ids"]) + 2 < max_length)
    try:
        theirs = trl_ids(tok, [(prompt, completion, True)], max_length)
    except IndexError:  # TRL fails when the whole prompt merges into the completion
        if bos:
            assert our_ids(tok, [(prompt, completion, True)], max_length)[0][0][1][0] == 0
        else:
            with pytest.raises(DataError, match="empty prompt"):
                our_ids(tok, [(prompt, completion, True)], max_length)
        return
    assert our_ids(tok, [(prompt, completion, True)], max_length)[0] == theirs


def trl_pipeline(rows, tok, max_length):
    """TRL 1.13.0 BCOTrainer's dataset preparation, step by step, with its own functions."""
    import datasets
    from trl.data_utils import maybe_apply_chat_template, maybe_extract_prompt, maybe_unpair_preference_dataset
    from trl.experimental.bco.bco_trainer import _process_tokens, _tokenize

    ds = datasets.Dataset.from_list(rows).map(maybe_extract_prompt)
    ds = maybe_unpair_preference_dataset(ds)
    ds = ds.map(maybe_apply_chat_template, fn_kwargs={"processing_class": tok})
    ds = ds.map(_tokenize, batched=True, fn_kwargs={"tokenizer": tok})
    ds = ds.map(_process_tokens, fn_kwargs={"prefix": "", "is_encoder_decoder": False, "tokenizer": tok,
                                            "max_length": max_length, "max_completion_length": None})
    return [(r["completion_input_ids"], [int(x != -100) for x in r["completion_labels"]], r["label"]) for r in ds]


@pytest.mark.parametrize("kind", ["text", "implicit_chat"])
def test_whole_dataset_matches_trl_in_order(tmp_path, kind):
    from test_data_fixtures import write_jsonl

    from bco_jax.data import load_dataset, ordered_batches

    def user(t):
        return {"role": "user", "content": t}
    def bot(t):
        return {"role": "assistant", "content": t}
    if kind == "text":
        rows = [{"prompt": f"What color is the sky {i}? It is bl", "chosen": "ue.", "rejected": " green."}
                for i in range(5)]
    else:
        rows = [{"chosen": [user(f"Sky color {i}?"), bot("Blue.")], "rejected": [user(f"Sky color {i}?"), bot("Red.")]}
                for i in range(5)]
    tok = make_tokenizer()
    cfg = DataConfig(train_data=[write_jsonl(tmp_path / "d.jsonl", rows)], max_length=24)
    data = load_dataset(cfg.train_data, tok, cfg)
    ours = []
    for b in ordered_batches(data, cfg, 4):
        for r in np.flatnonzero(b.example_mask):
            n = b.main.attention_mask[r].sum()
            ours.append((b.main.input_ids[r, :n].tolist(), b.main.loss_mask[r, :n].tolist(), bool(b.labels[r])))
    assert ours == trl_pipeline(rows, tok, 24)


def test_template_that_writes_bos_gets_no_second_bos():
    from test_data_fixtures import CHAT_TEMPLATE

    tok = make_tokenizer.__wrapped__()
    tok.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
    prompt, completion = [{"role": "user", "content": "Sky?"}], [{"role": "assistant", "content": "Blue."}]
    from trl.data_utils import maybe_apply_chat_template

    trl = maybe_apply_chat_template({"prompt": prompt, "completion": completion, "label": True}, tok)
    ours = encode(tok, [(prompt, completion, "x")], DataConfig(max_length=64), Issues(), TruncationStats())
    assert ours[0][0] == trl_ids(tok, [(trl["prompt"], trl["completion"], True)], 64)[0][0]
    assert ours[0][0][:2].count(tok.bos_token_id) == 1
