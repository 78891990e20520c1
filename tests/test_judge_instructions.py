"""The verifiable-instructions judge: every checker on hand-written answers that pass and that fail,
`judge` over a mixed batch (strings, message lists, a record without constraints), and the shipped
prompt set: what the generator builds, split by topic, from the kept families only."""
from __future__ import annotations

import json
import os

import pytest

from bco_jax.judges import instructions as ins


def ok(family: str, text: str, **params) -> bool:
    return ins.passes(text, {"family": family, **params})


# (family, params, passing answers, failing answers)
CASES = [
    ("lowercase", {}, ["hello there.\n", "the moon is 384,400 km away!  "], ["Hello there.", "ok I", "123 456"]),
    ("all_caps", {}, ["HELLO THERE!", "TEA IS GOOD.\n\n* 2 CUPS  "], ["HELLO there", "42"]),
    ("max_words", {"n": 5}, ["One two three four five.", "don't well-known words   \n"],
     ["one two three four five six"]),
    ("min_words", {"n": 5}, ["one two three four five", "a b c d e f g"], ["one two three four", "don't well-known"]),
    ("sentence_limit", {"n": 3}, ["One here. Two here!  ", "Is it? Yes.\n", "Version 2.5 is out. Nice.",
                                  "1. Tea is hot.\n2. Milk is cold."],
     ["One. Two. Three.", "One line\nanother line\nthird line", "1. Tea.\n2. Milk.\n3. Sugar"]),
    ("include_keyword", {"word": "morning"}, ["Good Morning!", "Mornings are calm."],
     ["Mourning doves.", "The mornin' sun", "morningside"]),
    ("forbid_keyword", {"word": "owl"}, ["Birds of the night.", "Howls and bowls."],
     ["An owl hoots.", "OWLS are wise.", "owl"]),
    ("end_phrase", {"phrase": "That is all."}, ["Tea is nice. That is all.", "Tea. that is all.  \n"],
     ["That is all. Bye.", "Tea is nice. That is all"]),
    ("bullets", {"n": 3}, ["* one\n* two\n* three", "Intro:\n- one\n* two\n  - three\n\nDone.", "-  a\n- b\n- c  "],
     ["* one\n* two", "1. one\n2. two\n3. three", "• one\n• two\n• three", "**Bold**\n* one\n* two",
      "* one\n* two\n* three\n* four", "*one\n*two\n*three"]),
    ("json_keys", {"keys": ["title", "text"]},
     ['{"title": "Tea", "text": "Hot."}', '```json\n{"title": "Tea", "text": "Hot.", "more": 1}\n```\n',
      '```\n{"title": 1, "text": null}\n```', '  {"title": "a", "text": "b"}  \n',
      'Here it is:\n```json\n{"title": "a", "text": "b"}\n```\nEnjoy!'],
     ['{"title": "Tea"}', '["title", "text"]', '{"title": "Tea", "text": "Hot."', 'Sure! {"title": "a", "text": "b"}',
      '```json\n{"title": "Tea", "text": "Hot."}']),
    ("no_commas", {}, ["Tea is hot and sweet.", "One two three.\n"], ["Tea, hot.", "中文，逗号"]),
    ("starts_with", {"word": "Yes"}, ["Yes, of course.", "  yes it is", "**Yes** indeed", '"Yes!" she said.'],
     ["Yesterday was fine.", "Oh yes.", "Well"]),
    ("min_paragraphs", {"n": 2}, ["First one.\n\nSecond one.", "First\nstill first\n\n  \n\nSecond.\n\n",
                                  "A\n\nB\n\nC"],
     ["Just one.", "One.\nTwo.", "One.\n\n  \n"]),
    ("title", {}, ["<<Tea Time>>\nTea is hot.", "Here: <<a>> rest"], ["<<>> no title", "<Tea Time>", "<<Tea\nTime>>"]),
    ("quotation", {}, ['"Tea is hot."', '  "Tea, always."\n', "“Curly quotes.”"], ['Tea is "hot".', '"Unclosed', '"']),
    ("highlight", {}, ["Tea is *hot*.", "**Tea**: hot", "* one\n* two *and* three"],
     ["* one\n* two", "2 * 3 * 4", "Tea is **", "no stars"]),
    ("ends_with_question", {}, ["Do you like tea?", "Want some?  \n", '"Why not?"'], ["Tea? Yes.", "Tea is hot."]),
]


def test_every_family_has_a_case():
    assert {case[0] for case in CASES} == set(ins.FAMILIES)


@pytest.mark.parametrize("family,params,good,bad", CASES, ids=[c[0] for c in CASES])
def test_checker(family, params, good, bad):
    for text in good:
        assert ok(family, text, **params), (family, text)
    for text in bad:
        assert not ok(family, text, **params), (family, text)
    for empty in ("", "  \n "):  # an empty answer follows no instruction
        assert not ok(family, empty, **params)


def test_instruction_text_names_the_parameters():
    assert ins.instruction({"family": "max_words", "n": 17}) == "Answer in at most 17 words."
    assert '"topic" and "summary"' in ins.instruction({"family": "json_keys", "keys": ["topic", "summary"]})


def test_judge_over_a_mixed_batch():
    lower = [{"family": "lowercase"}]
    both = [{"family": "no_commas"}, {"family": "max_words", "n": 3}]
    prompt = [{"role": "user", "content": "Write about tea."}]
    completions = [
        "tea is hot.",  # plain text, passes
        "Tea is hot.",  # plain text, fails
        [{"role": "assistant", "content": "tea is hot."}],  # a message list, passes
        [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "no commas here"}],
        [{"role": "assistant", "content": "one, two"}],  # meets one of its two constraints: fails
        "Anything at all.",  # its record has no constraints
        "Also anything.",
        [{"role": "assistant", "content": [{"type": "text", "text": "tea"}]}],  # content parts
    ]
    constraints = [lower, lower, lower, both, both, None, [], lower]
    verdicts = ins.judge(prompts=[prompt] * len(completions), completions=completions,
                         completion_ids=[[1, 2]] * len(completions), constraints=constraints,
                         topic=["tea"] * len(completions))
    assert verdicts == [True, False, True, True, False, None, None, True]
    assert ins.judge(prompts=["a"], completions=["b"]) == [None]  # no constraints column at all


def test_the_shipped_prompt_set_is_what_the_generator_builds():
    built = ins.build_prompt_set(ins.SEED)
    for split in ins.SPLITS:
        with open(os.path.join(ins.ASSETS, f"{split}.jsonl"), encoding="utf-8") as f:
            assert f.read() == ins.to_jsonl(built[split]), f"rerun instructions.write_prompt_set() ({split})"


def test_the_splits_share_no_topic_and_use_the_kept_families():
    built = ins.build_prompt_set(ins.SEED)
    topics = {split: {r["topic"] for r in records} for split, records in built.items()}
    assert not topics["train"] & topics["validation"] and not topics["train"] & topics["test"]
    assert not topics["validation"] & topics["test"]
    assert len(set().union(*topics.values())) == len(ins.TOPICS)
    assert len(built["test"]) >= 128
    for records in built.values():
        assert {r["constraints"][0]["family"] for r in records} == set(ins.KEPT_FAMILIES)
        for r in records:
            rule = r["constraints"][0]
            assert r["prompt"][0]["content"].endswith(ins.instruction(rule)) and r["prompt"][0]["role"] == "user"
    # A family's prompts do not depend on which other families are in the set.
    alone = ins.build_prompt_set(ins.SEED, families=ins.KEPT_FAMILIES[:1])
    assert alone["test"] == [r for r in built["test"] if r["constraints"][0]["family"] == ins.KEPT_FAMILIES[0]]


def test_kept_families_are_the_measured_ones():
    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "online", "results", "instruction_rates.json")
    with open(path, encoding="utf-8") as f:
        measured = json.load(f)
    assert tuple(measured["kept"]) == ins.KEPT_FAMILIES
    assert set(measured["settings"]["families"]) == set(ins.FAMILIES)
