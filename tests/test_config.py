"""The one-namespace config: YAML + flags, types, validation messages, deterministic run names."""

import pytest

from bco_jax.config import ConfigError, key_table, parse_args, run_name


def test_yaml_flat_or_grouped_and_flags_override(tmp_path):
    flat = tmp_path / "flat.yaml"
    flat.write_text("beta: 0.2\nshuffle: false\ntrain_data: [a.jsonl, b.jsonl]\nmesh: '2,2,2'\n")
    cfg = parse_args(["--config", str(flat), "--beta", "0.3"])
    assert cfg.loss.beta == 0.3 and cfg.data.shuffle is False
    assert cfg.data.train_data == ["a.jsonl", "b.jsonl"] and cfg.run.mesh == "2,2,2"
    grouped = tmp_path / "grouped.yaml"
    grouped.write_text("loss:\n  loss_type: kto\nrun:\n  batch_size: 32\n")
    cfg = parse_args(["--config", str(grouped)])
    assert cfg.loss.loss_type == "kto" and cfg.run.batch_size == 32
    assert cfg.data.kl_pairs  # KTO needs its mismatched KL pairs


def test_types_and_special_values():
    cfg = parse_args(["--save_total_limit", "none", "--rating_threshold", "4", "--length_buckets", "64,128",
                      "--udm", "true", "--loss_type", "bce"])
    assert cfg.run.save_total_limit is None and cfg.data.rating_threshold == 4.0
    assert cfg.data.length_buckets == [64, 128] and cfg.loss.udm is True
    assert cfg.loss.reward_shift == "none"  # bce is bco with delta = 0


@pytest.mark.parametrize("argv, message", [
    (["--beta", "-1"], "beta: must be > 0"),
    (["--batch_size", "10", "--gradient_accumulation_steps", "4"], "batch_size: 10 is not divisible"),
    (["--reward_shift", "median"], "reward_shift"),
    (["--label_smoothing", "0.1"], "label_smoothing: applies to loss_type=dpo only"),
    (["--udm", "true", "--loss_type", "dpo"], "udm: applies to loss_type bco or bce only"),
    (["--reward_shift_value", "0.3"], "reward_shift_value: applies with reward_shift=fixed and loss_type=bco only; "
                                      "here reward_shift=ema"),
    (["--reward_shift", "fixed", "--reward_shift_value", "0.3", "--loss_type", "kto"], "reward_shift_value: applies"),
    (["--mesh", "2,2"], "mesh: must be three integers"),
    (["--max_steps", "2.5"], "--max_steps: cannot read"),
    (["--learning_rat", "1"], "unknown config key 'learning_rat' \\(did you mean learning_rate"),
    (["positional"], "unexpected argument 'positional'"),
])
def test_invalid_values_are_rejected_naming_the_key(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)


def test_bad_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("beta: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        parse_args(["--config", str(bad)])
    with pytest.raises(ConfigError, match="unknown config key 'nope'"):
        (tmp_path / "k.yaml").write_text("nope: 1\n")
        parse_args(["--config", str(tmp_path / "k.yaml")])


def test_run_name_is_deterministic_and_changes_with_the_config():
    a = run_name(parse_args(["--model", "/m/Llama-3", "--train_data", "fb.jsonl"]))
    assert a == run_name(parse_args(["--model", "/m/Llama-3", "--train_data", "fb.jsonl"]))
    assert a.startswith("Llama-3-fb-bco-")
    assert a != run_name(parse_args(["--model", "/m/Llama-3", "--train_data", "fb.jsonl", "--beta", "0.2"]))


def test_run_names_of_existing_configs_stay_fixed():
    """Names pinned before reward_shift_value existed: a later key at its default renames nothing
    (a renamed run would not resume); set, it names a new run."""
    base = ["--model", "/m/Llama-3", "--train_data", "fb.jsonl"]
    assert run_name(parse_args([])) == "oracle-sft-oracle-feedback-bco-de8345f0"
    assert run_name(parse_args(base)) == "Llama-3-fb-bco-bf533a2c"
    assert run_name(parse_args([*base, "--reward_shift", "trl"])) == "Llama-3-fb-bco-7a6a9012"
    assert run_name(parse_args([*base, "--reward_shift_value", "0"])) == "Llama-3-fb-bco-bf533a2c"
    fixed = run_name(parse_args([*base, "--reward_shift", "fixed"]))
    assert fixed != run_name(parse_args([*base, "--reward_shift", "fixed", "--reward_shift_value", "0.3"]))
    cfg = parse_args([*base, "--reward_shift", "fixed", "--reward_shift_value", "-0.3"])
    assert cfg.loss.reward_shift_value == -0.3


def test_keys_are_unique_and_documented():
    table = key_table()
    for key, (_, field) in table.items():
        assert field.metadata["help"], key
    for trl_key in ("beta", "learning_rate", "max_length", "max_steps", "num_train_epochs",
                    "gradient_accumulation_steps", "warmup_ratio", "lr_scheduler_type", "weight_decay",
                    "max_grad_norm", "seed", "logging_steps", "save_steps", "save_total_limit", "eval_steps",
                    "precompute_ref_log_probs", "prompt_sample_size", "min_density_ratio", "max_density_ratio",
                    "output_dir"):
        assert trl_key in table, trl_key
