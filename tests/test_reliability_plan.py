"""The planner's hostile corpus (docs/reliability.md): `python -m bco_jax.plan`, run in-process through
`plan.main(argv)`, refuses bad keys, options and model configs with exit 2 and one line `error: ...`
naming the key or file, no traceback and no plan printed; `read_config` names the file and the key
of a bad size. Every case is refused before the step compiles."""
import json
import os

import pytest
from test_gguf_io import sentencepiece_vocab, tiny_model
from test_plan import TINY

from bco_jax import plan
from bco_jax.errors import ConfigError
from bco_jax.models import read_config

SIMULATION_ENV = ("XLA_FLAGS", "JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL")  # plan_devices.simulate_devices sets them


@pytest.fixture
def run_plan(monkeypatch, capsys):
    """plan.main(argv) -> (code, stdout, stderr), the environment it changes restored afterwards."""
    for name in SIMULATION_ENV:
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.delenv(name, raising=False)

    def run(args):
        code = plan.main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return run


def assert_error(code, out, err, *needles):
    """Exit 2, the last stderr line `error: ...` naming every needle, no traceback, no plan printed."""
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    for needle in needles:
        assert needle in last, (needle, last)
    assert out == "", out[:300]


def write_config(folder, config) -> str:
    """`folder`/config.json holding `config` (a dict as JSON, or bytes as they are)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "config.json")
    with open(path, "wb") as f:
        f.write(config if isinstance(config, bytes) else json.dumps(config).encode())
    return str(folder)


def base_argv(model) -> list:
    return ["--model", model, "--mesh", "1,2,1", "--batch_size", "4", "--max_length", "32", "--json"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return write_config(tmp_path_factory.mktemp("tiny"), TINY)


@pytest.mark.parametrize("args, key", [
    # the trainer's keys, held to the trainer's own checks
    (["--batch_size", "0"], "batch_size"),
    (["--batch_size", "-8"], "batch_size"),
    (["--batch_size", "many"], "batch_size"),
    (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps"),
    (["--batch_size", "6", "--gradient_accumulation_steps", "4"], "batch_size"),
    (["--batch_size", "3"], "batch_size"),  # not divisible by the 2 data-parallel devices
    (["--max_length", "0"], "max_length"),
    (["--max_length", "-5"], "max_length"),
    (["--use_peft", "true", "--lora_r", "0"], "lora_r"),
    (["--use_peft", "true", "--lora_r", "-4"], "lora_r"),
    (["--use_peft", "true", "--lora_target_modules", "q_proj,bogus"], "lora_target_modules"),
    (["--lora_r", "8"], "lora_r"),  # without use_peft a full fine-tune would be planned
    (["--load_in_8bit", "true"], "load_in_8bit"),
    (["--remat", "sometimes"], "remat"),
    (["--mesh", "0,2,1"], "mesh"),
    (["--mesh", "1,-1,1"], "mesh"),  # -1 without --devices
    # the online loop's keys, held to its own checks
    (["--num_generations", "0"], "num_generations"),
    (["--prompts_per_round", "-4"], "prompts_per_round"),
    (["--max_completion_length", "0"], "max_completion_length"),
    (["--max_completion_length", "32"], "max_completion_length"),  # no room for a prompt in max_length 32
    (["--prompts_per_round", "3", "--num_generations", "1"], "prompts_per_round"),  # 3 answers over 2 devices
    (["--online", "--precompute_ref_log_probs", "true"], "precompute_ref_log_probs"),
    # the planner's own options
    (["--devices", "0"], "devices"),
    (["--devices", "-2"], "devices"),
    (["--devices", "two"], "devices"),
    (["--device_memory", "1e999"], "device_memory"),
    (["--device_memory", "inf"], "device_memory"),
    (["--device_memory", "nan"], "device_memory"),
    (["--device_memory", "-inf"], "device_memory"),
    (["--device_memory", "0"], "device_memory"),
    (["--device_memory", "-8GiB"], "device_memory"),
    (["--device_memory", "lots"], "device_memory"),
    (["--device_memory", "16XB"], "device_memory"),
    (["--config", "plan.yaml"], "--config"),  # the planner takes no YAML file: unknown, not ignored
    (["--no_such_key", "1"], "--no_such_key"),
])
def test_bad_keys_are_refused_naming_the_key(run_plan, tiny, args, key):
    assert_error(*run_plan(base_argv(tiny) + args), key)


def test_missing_model_key_is_one_line(run_plan):
    assert_error(*run_plan(["--mesh", "1,2,1"]), "--model")


BAD_CONFIGS = {
    "no_layers": ({k: v for k, v in TINY.items() if k != "num_hidden_layers"}, "num_hidden_layers"),
    "negative_layers": (dict(TINY, num_hidden_layers=-3), "num_hidden_layers"),
    "string_width": (dict(TINY, hidden_size="big"), "hidden_size"),
    "zero_vocab": (dict(TINY, vocab_size=0), "vocab_size"),
    "float_heads": (dict(TINY, num_attention_heads=4.5), "num_attention_heads"),
    "zero_head_dim": (dict(TINY, head_dim=0), "head_dim"),
    "kv_heads_not_dividing": (dict(TINY, num_key_value_heads=3), "num_key_value_heads"),
    "garbled": (b'{"vocab_size": ', "config.json"),
    "not_utf8": (b'{"vocab_size": "\xff\xfe"}', "config.json"),
    "not_an_object": (b"[1, 2, 3]", "config.json"),
}


@pytest.mark.parametrize("role", ["model", "ref_model"])
@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_model_configs_are_refused_naming_the_key_and_file(run_plan, tiny, tmp_path, name, role):
    config, needle = BAD_CONFIGS[name]
    folder = write_config(tmp_path / name, config)
    args = base_argv(folder) if role == "model" else base_argv(tiny) + ["--ref_model", folder]
    assert_error(*run_plan(args), f"{role}: ", needle, "config.json")


@pytest.mark.parametrize("role", ["model", "ref_model"])
def test_missing_model_folder_is_named(run_plan, tiny, tmp_path, role):
    missing = str(tmp_path / "nowhere")
    args = base_argv(missing) if role == "model" else base_argv(tiny) + ["--ref_model", missing]
    assert_error(*run_plan(args), f"{role}: ", missing)


def test_config_json_under_another_name_is_read_and_named(run_plan, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(dict(TINY, num_hidden_layers=-3)))
    assert_error(*run_plan(base_argv(bad)), "model: ", str(bad), "num_hidden_layers")
    good = tmp_path / "tiny.json"
    good.write_text(json.dumps(TINY))
    assert read_config(str(good)) == read_config(TINY)  # that file itself, not a config.json beside it


def test_gguf_metadata_is_checked_as_a_config_json(run_plan, tmp_path):
    path = tiny_model(tmp_path, "llama", sentencepiece_vocab(), block_count=0)
    with pytest.raises(ConfigError, match="num_hidden_layers must be a positive integer"):
        read_config(path)
    assert_error(*run_plan(base_argv(path)), "model: ", path, "num_hidden_layers")


ABSENT = object()


@pytest.mark.parametrize("key, value, got", [
    ("num_hidden_layers", ABSENT, "missing"),
    ("num_hidden_layers", None, "got None"),
    ("num_hidden_layers", -3, "got -3"),
    ("hidden_size", "big", "got 'big'"),
    ("intermediate_size", True, "got True"),
    ("vocab_size", 512.0, "got 512.0"),
    ("num_key_value_heads", 0, "got 0"),
])
def test_read_config_names_the_file_and_the_key(tmp_path, key, value, got):
    config = {k: v for k, v in TINY.items() if k != key} | ({} if value is ABSENT else {key: value})
    with pytest.raises(ConfigError) as refused:
        read_config(write_config(tmp_path, config))
    assert str(refused.value) == f"{tmp_path / 'config.json'}: {key} must be a positive integer ({got})"
    with pytest.raises(ConfigError, match=f"^config.json: {key} must be"):  # a dict: no file to name
        read_config(config)


def test_read_config_keeps_optional_sizes_optional():
    cfg = read_config({k: v for k, v in TINY.items() if k not in ("head_dim", "num_key_value_heads")})
    assert (cfg.num_kv_heads, cfg.head_dim) == (TINY["num_attention_heads"], TINY["hidden_size"] // 4)
    assert read_config(dict(TINY, head_dim=None, num_key_value_heads=None)).head_dim == 16
