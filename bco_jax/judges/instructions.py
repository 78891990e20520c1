"""A verifiable-instructions judge, in the spirit of IFEval: each prompt asks for a short piece of
writing plus one checkable constraint ("answer in at most 20 words", "no commas", "exactly 3 bullet
points"), and the judge gives a thumbs-up to an answer that meets every constraint of its record.

`judge` has the TRL reward-function signature (`prompts`, `completions`, `completion_ids`, and the
prompt records' other columns as keywords); it reads the `constraints` column. `FAMILIES` maps each
constraint family to its checker, its instruction text and its parameter sampler. The shipped prompt
set (ASSETS: train / validation / test .jsonl, split by topic) is `build_prompt_set(SEED)`, built
from KEPT_FAMILIES: those SmolLM2-135M-Instruct meets 20-80% of the time at temperature 1 (measured
by experiments/online/instruction_rates.py), so its answers are a mix of thumbs up and down.
"""
from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable
from typing import NamedTuple

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "instructions")
SPLITS = ("train", "validation", "test")
SEED = 0

_WORD = re.compile(r"\w+(?:['’-]\w+)*")
_BULLET = re.compile(r"^\s*[*-]\s+\S")
_FENCE = re.compile(r"```(?:json)?[ \t]*\n(.*?)\n?```", re.S | re.I)


def words(text: str) -> list[str]:
    """Words as a reader counts them: "don't" and "well-known" are one word each."""
    return _WORD.findall(text)


def sentences(text: str) -> list[str]:
    """Pieces ended by . ! ? (followed by a space or the end) or by a line break, that hold a letter
    (so a list's "1." is not a sentence of its own)."""
    return [s for s in re.split(r"(?<=[.!?])\s+|\n+", text) if re.search(r"[^\W\d_]", s)]


def _mentions(text: str, word: str) -> bool:
    """`word`, or its plural with -s / -es, as a whole word, any case."""
    return re.search(rf"\b{re.escape(word)}(?:s|es)?\b", text, re.I) is not None


# The checkers: one per family, (answer text, **params) -> bool. An empty answer is handled by `passes`.

def lowercase(text: str) -> bool:
    return text == text.lower() and any(c.isalpha() for c in text)


def all_caps(text: str) -> bool:
    return text == text.upper() and any(c.isalpha() for c in text)


def max_words(text: str, n: int) -> bool:
    return len(words(text)) <= n


def min_words(text: str, n: int) -> bool:
    return len(words(text)) >= n


def sentence_limit(text: str, n: int) -> bool:
    return len(sentences(text)) < n


def include_keyword(text: str, word: str) -> bool:
    return _mentions(text, word)


def forbid_keyword(text: str, word: str) -> bool:
    return not _mentions(text, word)


def end_phrase(text: str, phrase: str) -> bool:
    return text.strip().lower().endswith(phrase.lower())


def bullets(text: str, n: int) -> bool:
    """Exactly n lines that start with "* " or "- " (a bold "**x**" line is not a bullet)."""
    return sum(bool(_BULLET.match(line)) and not line.lstrip().startswith("**") for line in text.splitlines()) == n


def json_keys(text: str, keys: list[str]) -> bool:
    """The answer is a JSON object that has every key in `keys`: the whole answer, or the first
    ``` / ```json fenced block in it ("Here it is: ```json ...```")."""
    text = text.strip()
    fenced = _FENCE.search(text)
    try:
        value = json.loads(fenced.group(1) if fenced else text)
    except ValueError:
        return False
    return isinstance(value, dict) and all(k in value for k in keys)


def no_commas(text: str) -> bool:
    return "," not in text and "，" not in text


def starts_with(text: str, word: str) -> bool:
    """The first word, ignoring markdown and quotes before it (`# Yes`, `**Yes**`, `"Yes,`)."""
    first = words(text)
    return bool(first) and first[0].lower() == word.lower()


def min_paragraphs(text: str, n: int) -> bool:
    """At least n non-empty blocks separated by blank lines (at least: an answer cut at the token limit
    may have begun one more)."""
    return len([p for p in re.split(r"\n\s*\n", text) if p.strip()]) >= n


def title(text: str) -> bool:
    return re.search(r"<<[^<>\n]*\w[^<>\n]*>>", text) is not None


def quotation(text: str) -> bool:
    text = text.strip()
    return len(text) >= 2 and text[0] in "\"“" and text[-1] in "\"”"


def highlight(text: str) -> bool:
    """At least one span highlighted with markdown emphasis: *like this* or **like this**."""
    return re.search(r"\*[^\s*][^*\n]*\*", text) is not None


def ends_with_question(text: str) -> bool:
    return text.rstrip().rstrip("\"'”*").endswith("?")


# Parameter samplers: (rng, topic) -> params. A topic is (phrase, keyword), e.g. ("volcanoes", "volcano").

def _none(rng: random.Random, topic) -> dict:
    return {}


def _between(lo: int, hi: int) -> Callable:
    return lambda rng, topic: {"n": rng.randint(lo, hi)}


def _one_of(name: str, values: tuple) -> Callable:
    return lambda rng, topic: {name: rng.choice(values)}


KEYWORDS = ("morning", "simple", "history", "friend", "colour", "quiet", "surprise", "future", "travel", "careful")
OPENERS = ("Yes", "Today", "Imagine", "Honestly", "Once", "Sometimes")
ENDINGS = ("That is all.", "The end.", "Any questions?", "Thank you.")
KEY_PAIRS = (("title", "text"), ("topic", "summary"), ("name", "description"), ("question", "answer"))


class Family(NamedTuple):
    check: Callable[..., bool]
    text: str  # the instruction, str.format-ed with the params
    sample: Callable[[random.Random, tuple], dict]


FAMILIES: dict[str, Family] = {
    "lowercase": Family(lowercase, "Your entire answer must be in lowercase letters: no capital letters at all.",
                        _none),
    "all_caps": Family(all_caps, "Your entire answer must be in capital letters only (ALL CAPS).", _none),
    "max_words": Family(max_words, "Answer in at most {n} words.", _between(10, 25)),
    "min_words": Family(min_words, "Answer in at least {n} words.", _between(25, 38)),
    "sentence_limit": Family(sentence_limit, "Answer in fewer than {n} sentences.", _between(2, 3)),
    "include_keyword": Family(include_keyword, 'Include the word "{word}" in your answer.',
                              _one_of("word", KEYWORDS)),
    "forbid_keyword": Family(forbid_keyword, 'Do not use the word "{word}" anywhere in your answer.',
                             lambda rng, topic: {"word": topic[1]}),
    "end_phrase": Family(end_phrase, 'Finish your answer with the exact phrase "{phrase}" and nothing after it.',
                         _one_of("phrase", ENDINGS)),
    "bullets": Family(bullets, "Answer with exactly {n} bullet points, in markdown, like:\n* first point\n"
                      "* second point", _between(2, 3)),
    "json_keys": Family(json_keys, 'Answer only with a JSON object that has the keys "{keys[0]}" and "{keys[1]}".',
                        lambda rng, topic: {"keys": list(rng.choice(KEY_PAIRS))}),
    "no_commas": Family(no_commas, "Do not use any commas in your answer.", _none),
    "starts_with": Family(starts_with, 'Begin your answer with the word "{word}".', _one_of("word", OPENERS)),
    "min_paragraphs": Family(min_paragraphs, "Write at least {n} short paragraphs, separated by a blank line.",
                             _between(2, 3)),
    "title": Family(title, "Give your answer a title wrapped in double angular brackets, like <<my title>>.",
                    _none),
    "quotation": Family(quotation, "Wrap your entire answer in double quotation marks.", _none),
    "highlight": Family(highlight, "Highlight at least one phrase with markdown, like *this phrase*.", _none),
    "ends_with_question": Family(ends_with_question, "End your answer with a question.", _none),
}

# Families SmolLM2-135M-Instruct meets 20-80% of the time at temperature 1 with 48 new tokens
# (experiments/online/results/instruction_rates.json); the shipped prompt set uses only these.
KEPT_FAMILIES: tuple[str, ...] = ("max_words", "min_words", "sentence_limit", "include_keyword", "forbid_keyword",
                                   "bullets", "no_commas", "starts_with", "title", "highlight")


def passes(text: str, constraint: dict) -> bool:
    """Whether `text` meets one constraint {"family": name, **params}. An empty answer follows no
    instruction (else "no commas" or "do not use the word" would reward saying nothing)."""
    params = {k: v for k, v in constraint.items() if k != "family"}
    return bool(text.strip()) and FAMILIES[constraint["family"]].check(text, **params)


def instruction(constraint: dict) -> str:
    return FAMILIES[constraint["family"]].text.format(**constraint)


def answer_text(completion) -> str:
    """A completion as plain text: a string as is; a message list's last assistant content."""
    if isinstance(completion, str):
        return completion
    said = [m for m in completion if m.get("role") == "assistant"] or list(completion)
    content = said[-1].get("content", "") if said else ""
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}]
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


def judge(prompts, completions, completion_ids=None, constraints=None, **_) -> list[bool | None]:
    """One verdict per answer: True when it meets every constraint of its record, None when the
    record has none (or there is no `constraints` column)."""
    constraints = [None] * len(completions) if constraints is None else constraints
    return [None if not rules else all(passes(answer_text(c), rule) for rule in rules)
            for c, rules in zip(completions, constraints)]


# The prompt set: topics x short writing tasks x one constraint each, split by topic.

TOPICS = (
    ("volcanoes", "volcano"), ("coffee", "coffee"), ("honeybees", "honeybee"), ("trains", "train"),
    ("chess", "chess"), ("gardens", "garden"), ("rain", "rain"), ("bread", "bread"), ("bicycles", "bicycle"),
    ("owls", "owl"), ("deserts", "desert"), ("music", "music"), ("lighthouses", "lighthouse"),
    ("winter", "winter"), ("robots", "robot"), ("islands", "island"), ("tea", "tea"), ("forests", "forest"),
    ("kites", "kite"), ("cheese", "cheese"), ("rivers", "river"), ("museums", "museum"), ("snow", "snow"),
    ("whales", "whale"), ("camping", "camping"), ("maps", "map"), ("clocks", "clock"), ("soup", "soup"),
    ("dragons", "dragon"), ("mountains", "mountain"), ("friendship", "friendship"), ("rockets", "rocket"),
    ("pizza", "pizza"), ("penguins", "penguin"), ("markets", "market"), ("puzzles", "puzzle"),
    ("stars", "star"), ("bridges", "bridge"), ("autumn", "autumn"), ("the moon", "moon"),
)
TASKS = (
    "Write a short note about {topic}.", "Describe {topic} to a child.", "Give some advice about {topic}.",
    "Explain why people care about {topic}.", "Write a very short story about {topic}.",
    "Tell a friend what you like about {topic}.", "Share a fun fact about {topic}.",
)
SPLIT_TOPICS = (24, 8, 8)  # train / validation / test topics
PER_FAMILY = 2  # prompts per topic and family in the shipped set: 8 test topics x 10 families x 2 = 160


def make_prompt(topic: tuple, family: str, seed: int, index: int) -> dict:
    """The index-th prompt of (topic, family): its own random stream, so a family's prompts do not move
    when other families are added or removed."""
    rng = random.Random(f"{seed}/{topic[0]}/{family}/{index}")
    task = rng.choice(TASKS).format(topic=topic[0])
    constraint = {"family": family, **FAMILIES[family].sample(rng, topic)}
    return {"prompt": [{"role": "user", "content": f"{task} {instruction(constraint)}"}],
            "constraints": [constraint], "topic": topic[0]}


def split_topics(seed: int = SEED) -> dict[str, list[tuple]]:
    topics = list(TOPICS)
    random.Random(seed).shuffle(topics)
    out, start = {}, 0
    for split, count in zip(SPLITS, SPLIT_TOPICS):
        out[split], start = topics[start:start + count], start + count
    return out


def build_prompt_set(seed: int = SEED, families=KEPT_FAMILIES, per_family: int = PER_FAMILY) -> dict[str, list]:
    """{split: records}: for every topic of the split, `per_family` prompts of each family."""
    return {split: [make_prompt(topic, family, seed, i) for topic in topics for family in families
                    for i in range(per_family)]
            for split, topics in split_topics(seed).items()}


def to_jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_prompt_set(folder: str = ASSETS, seed: int = SEED) -> dict[str, int]:
    """Write the shipped files, after a change to the families, topics or tasks:
    `.venv/bin/python -c "from bco_jax.judges import instructions; instructions.write_prompt_set()"`."""
    os.makedirs(folder, exist_ok=True)
    counts = {}
    for split, records in build_prompt_set(seed).items():
        with open(os.path.join(folder, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            f.write(to_jsonl(records))
        counts[split] = len(records)
    return counts


def load_prompts(split: str, folder: str = ASSETS) -> list[dict]:
    with open(os.path.join(folder, f"{split}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]
