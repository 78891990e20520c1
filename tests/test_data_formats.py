"""Formats and sources -> records, bad-input messages, the tokenization cache."""
import functools
import json
import os

import numpy as np
import pytest
from test_data_fixtures import make_tokenizer, unpaired_rows, write_jsonl

from bco_jax.data import DataConfig, DataError, load_dataset, records_from_rows
from bco_jax.data.formats import TRL_UNPAIR_BLOCK, Example, Pair


def MSG(role, text):
    return {"role": role, "content": text}


def load(specs, **kw):
    cfg = DataConfig(**{"max_length": 64, **kw})
    return load_dataset(specs, make_tokenizer(), cfg)


def texts(ds, tok=None):
    tok = tok or make_tokenizer()
    s = ds.seqs["completion"]
    return [tok.decode(s.ids(i)[s.prompt_lens[i]:-1]) for i in range(len(s))]


# ---- formats ---------------------------------------------------------------------------------

def test_unpaired_labels_bool_and_01():
    rows = [{"prompt": "a", "completion": " b", "label": True}, {"prompt": "a", "completion": " c", "label": 0}]
    recs = records_from_rows(rows, DataConfig())
    assert recs == [Example("a", " b", True, "<rows> row 0"), Example("a", " c", False, "<rows> row 1")]


def test_paired_unpairs_in_trl_block_order():
    rows = [{"prompt": f"p{i}", "chosen": f" good{i}", "rejected": f" bad{i}"} for i in range(TRL_UNPAIR_BLOCK + 2)]
    recs = records_from_rows(rows, DataConfig())
    assert [r.label for r in recs[:TRL_UNPAIR_BLOCK]] == [True] * TRL_UNPAIR_BLOCK
    assert recs[TRL_UNPAIR_BLOCK].completion == " bad0" and not recs[TRL_UNPAIR_BLOCK].label
    assert [r.completion for r in recs[-4:]] == [" good1000", " good1001", " bad1000", " bad1001"]
    pairs = records_from_rows(rows[:2], DataConfig(paired=True))
    assert pairs[0] == Pair("p0", " good0", " bad0", "<rows> row 0")


def test_implicit_prompt_pairs():
    rows = [{"chosen": "The sky is blue.", "rejected": "The sky is green."},
            {"chosen": [MSG("user", "q"), MSG("assistant", "a")],
             "rejected": [MSG("user", "q"), MSG("assistant", "b")]}]
    recs = records_from_rows(rows, DataConfig(paired=True))
    assert recs[0].prompt == "The sky is" and recs[0].chosen == " blue."
    assert recs[1].prompt == [MSG("user", "q")] and recs[1].rejected == [MSG("assistant", "b")]


def test_rated_threshold_and_custom_columns():
    cfg = DataConfig(prompt_column="q", completion_column="a", rating_column="helpfulness",
                     rating_threshold=4, rating_range=[0, 4])
    rows = [{"q": "x", "a": " y", "helpfulness": r} for r in (0, 3, 3.5, 4)]
    assert [r.label for r in records_from_rows(rows, cfg)] == [False, False, False, True]


def test_conversational_dataset_tokenizes(tmp_path):
    rows = [{"prompt": [MSG("user", f"What color is the sky {i}?")],
             "completion": [MSG("assistant", "It is blue.")], "label": i % 2 == 0} for i in range(4)]
    ds = load([write_jsonl(tmp_path / "chat.jsonl", rows)])
    assert texts(ds)[0] == "It is blue.<|end|>\n"


# ---- sources ---------------------------------------------------------------------------------

def test_json_parquet_glob_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = unpaired_rows(6)
    write_jsonl(tmp_path / "d" / "a.jsonl", rows[:2])
    (tmp_path / "d" / "b.json").write_text(json.dumps(rows[2:4]))
    (tmp_path / "d" / "c.json").write_text(json.dumps({k: [r[k] for r in rows[4:]] for k in rows[0]}))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "e.parquet")
    expected = [r["completion"].strip() for r in rows]
    assert [t.strip() for t in texts(load([str(tmp_path / "d")]))] == expected
    assert [t.strip() for t in texts(load([str(tmp_path / "d" / "*.json")]))] == expected[2:]
    assert [t.strip() for t in texts(load([str(tmp_path / "e.parquet")]))] == expected


def test_hf_save_to_disk(tmp_path):
    import datasets

    rows = unpaired_rows(5)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:3]),
                          "test": datasets.Dataset.from_list(rows[3:])}).save_to_disk(str(tmp_path / "hfd"))
    assert len(load([str(tmp_path / "hf")])) == 5
    assert len(load([str(tmp_path / "hfd")])) == 3
    assert len(load([str(tmp_path / "hfd")], split="test")) == 2
    with pytest.raises(DataError, match="no split 'validation'"):
        load([str(tmp_path / "hfd")], split="validation")


@functools.cache
def _tfds_builder_class(chat: bool = False):
    import tensorflow_datasets as tfds

    def _info(self):
        text = tfds.features.Text()
        if chat:
            text = tfds.features.Sequence({"role": tfds.features.Text(), "content": tfds.features.Text()})
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "prompt": text, "completion": text, "label": np.bool_}))

    def _generate_examples(self):
        for i, r in enumerate(unpaired_rows(6)):
            if chat:
                r = dict(r, prompt=[MSG("user", r["prompt"])], completion=[MSG("assistant", r["completion"])])
            yield i, r

    # TFDS registers builders by class name, so each variant gets its own.
    return type("ChatToy" if chat else "FeedbackToy", (tfds.core.GeneratorBasedBuilder,), {
        "VERSION": tfds.core.Version("1.0.0"), "_info": _info, "_generate_examples": _generate_examples,
        "_split_generators": lambda self, dl_manager: {"train": self._generate_examples()}})


def _tfds_builder(data_dir, file_format, chat=False):
    return _tfds_builder_class(chat)(data_dir=str(data_dir), file_format=file_format)


def test_tfds_array_record_by_dir_and_name(tmp_path):
    builder = _tfds_builder(tmp_path / "tfds", "array_record")
    builder.download_and_prepare()
    by_dir = load([str(builder.data_dir)])
    by_name = load(["tfds:feedback_toy"], tfds_data_dir=str(tmp_path / "tfds"))
    assert len(by_dir) == len(by_name) == 6
    # The cache key of tfds:NAME covers the prepared files, not just the name.
    from bco_jax.data.sources import fingerprint
    key = fingerprint("tfds:feedback_toy", str(tmp_path / "tfds"))
    assert len(key) > 1 and all(str(builder.data_dir) in entry[0] for entry in key)
    assert sorted(texts(by_dir)) == sorted(r["completion"] for r in unpaired_rows(6))
    chat = _tfds_builder(tmp_path / "tfds", "array_record", chat=True)
    chat.download_and_prepare()
    assert sorted(texts(load([str(chat.data_dir)]))) == sorted(
        r["completion"] + "<|end|>\n" for r in unpaired_rows(6))


def test_tfds_tfrecord_only_is_a_clear_error(tmp_path):
    builder = _tfds_builder(tmp_path / "tfds", "array_record")
    builder.download_and_prepare()
    info_path = os.path.join(builder.data_dir, "dataset_info.json")
    info = json.load(open(info_path))
    info["fileFormat"] = "tfrecord"
    json.dump(info, open(info_path, "w"))
    with pytest.raises(DataError, match="needs TensorFlow.*array_record"):
        load([str(builder.data_dir)])


# ---- bad input -------------------------------------------------------------------------------

BAD_LINES = [
    ('{"prompt": "a", "completion": " b", "label": tru}', "invalid JSON"),
    ({"prompt": "a", "label": True}, "missing field 'completion'"),
    ({"completion": " b", "label": True}, "missing field 'prompt'"),
    ({"prompt": 3, "completion": " b", "label": True}, "must be text or a list of chat messages"),
    ({"prompt": "a", "completion": " b", "label": "yes"}, "must be true/false or 0/1"),
    ({"prompt": "a", "completion": " b", "label": 2}, "must be true/false or 0/1"),
    ({"prompt": "a", "completion": "", "label": True}, "empty completion"),
    ({"prompt": [MSG("wizard", "a")], "completion": [MSG("assistant", "b")], "label": True},
     "unknown chat role 'wizard'"),
    ({"prompt": "a", "completion": [MSG("assistant", "b")], "label": True}, "same kind"),
]


@pytest.mark.parametrize("bad,reason", BAD_LINES)
def test_bad_record_names_file_line_and_reason(tmp_path, bad, reason):
    path = write_jsonl(tmp_path / "f.jsonl", unpaired_rows(2) + [bad] + unpaired_rows(2, 2))
    with pytest.raises(DataError, match=rf"f\.jsonl:3: .*{reason}"):
        load([path])
    ds = load([path], skip_invalid=True)
    assert len(ds) == 4 and ds.report["invalid"] == 1
    assert ds.report["invalid_records"][0][0].endswith("f.jsonl:3") and reason in ds.report["invalid_records"][0][1]


def test_rating_out_of_range(tmp_path):
    rows = [{"prompt": "a", "completion": " b", "rating": r} for r in (1, 5, 9)]
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    with pytest.raises(DataError, match=r"r\.jsonl:3: rating 9 outside the declared range \[0, 5\]"):
        load([path], rating_threshold=4, rating_range=[0, 5])


def test_parquet_bad_row_names_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = unpaired_rows(3)
    rows[1]["completion"] = ""
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet")
    with pytest.raises(DataError, match=r"x\.parquet row 1: empty completion"):
        load([str(tmp_path / "x.parquet")])


def test_empty_single_class_unreadable(tmp_path):
    with pytest.raises(DataError, match="the dataset is empty"):
        load([write_jsonl(tmp_path / "empty.jsonl", [])])
    one_class = [dict(r, label=True) for r in unpaired_rows(3)]
    with pytest.raises(DataError, match="all 3 examples are thumbs-up"):
        load([write_jsonl(tmp_path / "up.jsonl", one_class)])
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="broken.parquet: cannot read"):
        load([str(tmp_path / "broken.parquet")])
    with pytest.raises(DataError, match="no such file"):
        load([str(tmp_path / "missing.jsonl")])
    with pytest.raises(DataError, match="no .jsonl, .json or .parquet file matches"):
        load([str(tmp_path / "nothing*.jsonl")])


# ---- cache -----------------------------------------------------------------------------------

def test_cache_hit_and_invalidation(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", unpaired_rows(5))
    first = load([path], cache_dir=str(tmp_path / "cache"))
    second = load([path], cache_dir=str(tmp_path / "cache"))
    assert second.report.get("from_cache") and not first.report.get("from_cache")
    np.testing.assert_array_equal(first.seqs["completion"].tokens, second.seqs["completion"].tokens)
    np.testing.assert_array_equal(first.labels, second.labels)
    assert not load([path], cache_dir=str(tmp_path / "cache"), max_length=32).report.get("from_cache")
    write_jsonl(tmp_path / "c.jsonl", unpaired_rows(6))
    assert len(load([path], cache_dir=str(tmp_path / "cache"))) == 6


def test_json_lines_under_json_name_and_bad_json(tmp_path):
    path = write_jsonl(tmp_path / "lines.json", unpaired_rows(3))
    assert len(load([path])) == 3
    (tmp_path / "bad.json").write_text('[{"prompt": "a",\n "completion": }]')
    with pytest.raises(DataError, match=r"bad\.json:2: invalid JSON"):
        load([str(tmp_path / "bad.json")])


def test_paired_mode_needs_pairs_and_fingerprint(tmp_path):
    path = write_jsonl(tmp_path / "u.jsonl", unpaired_rows(4))
    with pytest.raises(DataError, match="paired=true needs chosen/rejected"):
        load([path], paired=True)
    assert load([path]).fingerprint() == load([path]).fingerprint() != load([path], max_length=8).fingerprint()
