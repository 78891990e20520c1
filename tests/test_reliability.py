"""A hostile corpus: configs, model folders, output locations, checkpoints, disk faults and signals.

Each case runs the CLI in-process (`train.main(argv)`, output captured) and asserts the documented
outcome (docs/reliability.md): an exit code, one line `error: ...` naming the key, file or folder, no
traceback unless --debug, and nothing the user had modified; or the documented recovery.
"""

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from train_fixtures import feedback_file, read_metrics, tiny_model_dir

from bco_jax import files, train
from bco_jax.checkpoint import classify
from bco_jax.config import key_table, parse_args, run_name


def digest(folder) -> str:
    """Hash of every file's name and bytes under `folder`: what the user had, before and after."""
    h = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def write_jsonl(path, rows):
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    model = tiny_model_dir(root / "model")
    thumbs_up = [{"prompt": f"{a}+1=", "completion": str(a + 1), "label": True} for a in range(8)]
    return {
        "root": root, "model": model,
        "train": feedback_file(root / "train.jsonl", 64),
        "other_train": feedback_file(root / "other.jsonl", 64, seed=5),
        "one_class_eval": write_jsonl(root / "eval_up.jsonl", thumbs_up),
    }


def argv(assets, out, *extra):
    return ["--model", assets["model"], "--train_data", assets["train"], "--output_dir", str(out),
            "--batch_size", "16", "--max_steps", "4", "--save_steps", "2", "--learning_rate", "1e-3",
            "--logging_steps", "2", "--warmup_ratio", "0", "--max_length", "16", "--length_buckets", "16",
            "--tensorboard", "false", "--mesh", "1,1,1", *extra]


def cli(capsys, args) -> tuple[int, str]:
    code = train.main([str(a) for a in args])
    return code, capsys.readouterr().err


def assert_error(code, err, expected, *needles):
    """Exit code `expected`, the last stderr line `error: ...` naming every needle, no traceback."""
    assert code == expected, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    for needle in needles:
        assert needle in last, (needle, last)


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory):
    """A finished 4-step run (checkpoints 2 and 4, a one-class evaluation), its stderr and export."""
    out = tmp_path_factory.mktemp("finished") / "run"
    err = io.StringIO()  # a module fixture cannot use capsys
    with contextlib.redirect_stderr(err):
        code = train.main(argv(assets, out, "--eval_data", assets["one_class_eval"]))
    assert code == 0, err.getvalue()[-3000:]
    return {"out": out, "err": err.getvalue(), "hf": (out / "hf" / "model.safetensors").read_bytes()}


def copy_run(finished, tmp_path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(finished["out"], target)
    return target


# ------------------------------------------------------------------------------- configs (flags)

FLOAT_KEYS = [k for k, (section, f) in key_table().items() if "float" in str(f.type)]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_non_finite_numbers_are_refused_for_every_float_key(capsys, key, value):
    code, err = cli(capsys, [f"--{key}", value])
    assert_error(code, err, 2, key)


@pytest.mark.parametrize("args, key", [
    (["--max_steps", "-5"], "max_steps"),
    (["--max_steps", "0"], "max_steps"),
    (["--seed", "-3"], "seed"),
    (["--seed", str(2**32)], "seed"),
    (["--mesh", "0,1,1"], "mesh"),
    (["--mesh", "-1,-1,1"], "mesh"),
    (["--mesh", "-2,1,1"], "mesh"),
    (["--eval_batch_size", "0"], "eval_batch_size"),
    (["--eval_batch_size", "-4"], "eval_batch_size"),
    (["--save_total_limit", "0"], "save_total_limit"),
    (["--sigterm_exit_code", "300"], "sigterm_exit_code"),
    (["--min_density_ratio", "-.5"], "min_density_ratio"),
    (["--batch_size", "-16"], "batch_size"),
    (["--logging_steps", "-1"], "logging_steps"),
    (["--num_processes", "-2", "--process_id", "0"], "num_processes"),
])
def test_out_of_range_values_are_refused_naming_the_key(capsys, args, key):
    code, err = cli(capsys, args)
    assert_error(code, err, 2, key)


def test_negative_numbers_are_values_not_flags():
    cfg = parse_args(["--mesh", "-1,1,1", "--max_steps", "-1", "--rating_threshold", "-2.5"])
    assert cfg.run.mesh == "-1,1,1" and cfg.run.max_steps == -1 and cfg.data.rating_threshold == -2.5


def test_operational_keys_keep_the_default_run_name():
    base = ["--model", "/m/llama", "--train_data", "fb.jsonl"]
    name = run_name(parse_args(base))
    for extra in (["--max_steps", "100"], ["--mesh", "2,2,2"], ["--logging_steps", "1"], ["--debug", "true"]):
        assert run_name(parse_args(base + extra)) == name, extra
    assert run_name(parse_args(base + ["--beta", "0.3"])) != name
    assert run_name(parse_args(["--model", "/other/llama", "--train_data", "fb.jsonl"])) != name


# -------------------------------------------------------------------------------- configs (YAML)


@pytest.mark.parametrize("text, needles", [
    ("loss:\n  learning_rate: 0.1\n", ["learning_rate", "loss:", "optim:"]),
    ("beta: 0.2\nloss:\n  beta: 0.3\n", ["beta", "twice"]),
    ("run:\n  seed: 1\n  seed: 2\n", ["seed", "twice", "line 3"]),
    ("batch_size: true\n", ["batch_size"]),
    ("beta: .nan\n", ["beta", "finite"]),
    ("- beta\n- 0.1\n", ["cfg.yaml", "mapping"]),
    ("beta: [unclosed\n", ["cfg.yaml", "line"]),
])
def test_bad_yaml_is_refused_naming_the_key_or_line(capsys, tmp_path, text, needles):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    code, err = cli(capsys, ["--config", path])
    assert_error(code, err, 2, *needles)


def test_same_value_flat_and_grouped_is_accepted(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("beta: 0.2\nloss:\n  beta: 0.2\n")
    assert parse_args(["--config", str(path)]).loss.beta == 0.2


def test_debug_shows_the_traceback(capsys):
    code, err = cli(capsys, ["--learning_rate", "inf", "--debug", "true"])
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error: learning_rate")


# ------------------------------------------------------------------------------ output locations


@pytest.mark.parametrize("where", ["model", "inside_model", "contains_model", "ref_model"])
def test_output_dir_overlapping_a_model_folder_is_refused_before_writing(capsys, assets, tmp_path, where):
    model = tiny_model_dir(tmp_path / "zoo" / "m")
    before = digest(tmp_path / "zoo")
    args = argv(assets, tmp_path / "unused")
    args[args.index("--model") + 1] = model
    out = {"model": model, "inside_model": f"{model}/out", "contains_model": str(tmp_path / "zoo"),
           "ref_model": model}[where]
    if where == "ref_model":
        args[args.index("--model") + 1] = assets["model"]
        args += ["--ref_model", model]
    args[args.index("--output_dir") + 1] = out
    code, err = cli(capsys, args)
    assert_error(code, err, 2, "output_dir", model if where != "contains_model" else str(tmp_path / "zoo"))
    assert digest(tmp_path / "zoo") == before


def test_output_dir_that_is_a_file_is_refused(capsys, assets, tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("mine")
    code, err = cli(capsys, argv(assets, path))
    assert_error(code, err, 2, "output_dir", "is a file")
    assert path.read_text() == "mine"


@pytest.mark.parametrize("code_name", ["ENOSPC", "EROFS", "EACCES"])
def test_full_or_read_only_disk_is_one_line(capsys, monkeypatch, finished, tmp_path, assets, code_name):
    out = copy_run(finished, tmp_path)
    number = getattr(errno, code_name)

    def refuse(path, write):
        raise OSError(number, os.strerror(number), path)

    monkeypatch.setattr(files, "atomic_write", refuse)
    code, err = cli(capsys, argv(assets, out))
    assert_error(code, err, 1, os.strerror(number))


# ---------------------------------------------------------------------------------- model folders


def _broken_model(tmp_path, how):
    folder = Path(shutil.copytree(tiny_model_dir(tmp_path / "src"), tmp_path / "broken"))
    weights = folder / "model.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "garbage":
        weights.write_bytes(b"\xff" * 64)
    elif how == "bad_config":
        (folder / "config.json").write_text('{"vocab_size": ')
    elif how == "no_config":
        (folder / "config.json").unlink()
    elif how == "pickle":
        weights.unlink()
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    elif how == "nan_weight":
        from safetensors.numpy import load_file, save_file

        tensors = load_file(str(weights))
        name = sorted(tensors)[0]
        tensors[name] = tensors[name].copy()
        tensors[name].flat[0] = np.nan
        save_file(tensors, str(weights), metadata={"format": "pt"})
    return str(folder)


@pytest.mark.parametrize("how, needle", [
    ("truncated", "model.safetensors"), ("garbage", "model.safetensors"), ("bad_config", "config.json"),
    ("no_config", "config.json"), ("pickle", "pytorch_model.bin"), ("nan_weight", "non-finite"),
])
@pytest.mark.parametrize("role", ["model", "ref_model"])
def test_broken_model_folders_are_named(capsys, assets, tmp_path, how, needle, role):
    folder = _broken_model(tmp_path, how)
    before = digest(folder)
    args = argv(assets, tmp_path / "out")
    if role == "model":
        args[args.index("--model") + 1] = folder
    else:
        args += ["--ref_model", folder]
    code, err = cli(capsys, args)
    assert_error(code, err, 2, needle)
    assert digest(folder) == before
    assert not (tmp_path / "out" / "hf").exists()


@pytest.mark.parametrize("change", [{"vocab_size": 40}, {"hidden_size": 48}])
def test_reference_of_another_vocabulary_or_width_is_refused(capsys, assets, tmp_path, change):
    ref = tiny_model_dir(tmp_path / "ref", **{"vocab_size" if "vocab_size" in change else "hidden":
                                               next(iter(change.values()))})
    code, err = cli(capsys, argv(assets, tmp_path / "out", "--ref_model", ref))
    assert_error(code, err, 2, "ref_model", next(iter(change)))


# ------------------------------------------------------------------------------------ checkpoints


def test_finished_run_writes_strict_json_and_progress_lines(finished):
    out = finished["out"]
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))
    final = read_metrics(out)[-1]
    assert final["eval_reward_auc"] is None  # one class: no AUC, written as null
    assert "step 2/4: loss" in finished["err"] and "tokens/s" in finished["err"]  # no terminal: log lines
    history = [json.loads(line) for line in (out / "config_history.jsonl").read_text().splitlines()]
    assert len(history) == 1 and history[0]["step"] == 0 and history[0]["identity"]["model_weights"]


def test_stray_empty_step_folder_is_ignored(capsys, assets, finished, tmp_path):
    out = copy_run(finished, tmp_path)
    (out / "checkpoints" / "99").mkdir()
    code, err = cli(capsys, argv(assets, out))
    assert code == 0, err[-3000:]
    assert "checkpoint 99 is incomplete" in err and (out / "checkpoints" / "99.torn").is_dir()
    assert classify(out / "checkpoints") == ([2, 4], [])


def _tear(out, how):
    step = out / "checkpoints" / "4"
    if how == "no_metadata":
        (step / "state" / "_METADATA").unlink()
    elif how == "truncated_arrays":
        for path in (step / "state").rglob("*"):
            if path.is_file() and path.parent.name == "d":
                path.write_bytes(path.read_bytes()[:10])
    elif how == "garbled_extras":
        (step / "extras" / "metadata").write_text("{not json")


@pytest.mark.parametrize("how", ["no_metadata", "truncated_arrays", "garbled_extras"])
def test_torn_newest_checkpoint_falls_back_to_the_previous_one(capsys, assets, finished, tmp_path, how):
    out = copy_run(finished, tmp_path)
    shutil.rmtree(out / "hf")
    _tear(out, how)
    code, err = cli(capsys, argv(assets, out, "--eval_data", assets["one_class_eval"]))
    assert code == 0, err[-3000:]
    assert "resumed" in err and "at step 2" in err
    # Steps 3 and 4 again from checkpoint 2: the same export, bit for bit.
    assert (out / "hf" / "model.safetensors").read_bytes() == finished["hf"]
    assert [r["step"] for r in read_metrics(out)] == [r["step"] for r in read_metrics(finished["out"])]


def test_no_readable_checkpoint_is_one_line_and_moves_nothing(capsys, assets, finished, tmp_path):
    out = copy_run(finished, tmp_path)
    for step in ("2", "4"):
        (out / "checkpoints" / step / "extras" / "metadata").write_text("{not json")
    before = digest(out / "checkpoints")
    code, err = cli(capsys, argv(assets, out))
    assert_error(code, err, 2, "no checkpoint", "reads", str(out / "checkpoints"))
    assert digest(out / "checkpoints") == before


@pytest.mark.parametrize("args, keys", [
    (["--beta", "0.3"], ["beta: 0.1 -> 0.3"]),
    (["--loss_type", "kto"], ["loss_type"]),
    (["--seed", "7"], ["seed"]),
    (["--learning_rate", "1e-4", "--lr_scheduler_type", "cosine"], ["learning_rate", "lr_scheduler_type"]),
    (["--max_length", "15"], ["max_length"]),
    (["--train_data", "OTHER"], ["train_data_content"]),
])
def test_resume_with_keys_that_change_past_steps_is_refused(capsys, assets, finished, tmp_path, args, keys):
    out = copy_run(finished, tmp_path)
    before = digest(out)
    args = [assets["other_train"] if a == "OTHER" else a for a in args]
    code, err = cli(capsys, argv(assets, out, *args))
    assert_error(code, err, 2, "resume", "allow_config_change", *keys)
    assert digest(out) == before


def test_resume_with_operational_changes_is_allowed_and_recorded(capsys, assets, finished, tmp_path):
    out = copy_run(finished, tmp_path)
    code, err = cli(capsys, argv(assets, out, "--max_steps", "6", "--logging_steps", "1", "--save_steps", "3"))
    assert code == 0, err[-3000:]
    history = [json.loads(line) for line in (out / "config_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [0, 4]
    assert {"max_steps", "logging_steps", "save_steps", "output_dir"} <= set(history[1]["changed"])
    assert json.loads((out / "config.json").read_text())["max_steps"] == 6
    assert classify(out / "checkpoints")[0][-1] == 6


def test_allow_config_change_continues_and_records(capsys, assets, finished, tmp_path):
    out = copy_run(finished, tmp_path)
    code, err = cli(capsys, argv(assets, out, "--beta", "0.3", "--allow_config_change", "true"))
    assert code == 0, err[-3000:]
    assert "changed keys" in err and "beta" in err
    changed = json.loads((out / "config_history.jsonl").read_text().splitlines()[-1])["changed"]
    assert {"allow_config_change", "beta"} <= set(changed) and "seed" not in changed


def test_resume_with_fewer_steps_than_the_checkpoint_is_refused(capsys, assets, finished, tmp_path):
    out = copy_run(finished, tmp_path)
    code, err = cli(capsys, argv(assets, out, "--max_steps", "3"))
    assert_error(code, err, 2, "max_steps", "checkpoint 4")


def test_resume_with_another_models_shapes_names_them(capsys, assets, finished, tmp_path):
    out = copy_run(finished, tmp_path)
    deeper = tiny_model_dir(tmp_path / "deeper", layers=3)
    args = argv(assets, out, "--ref_model", assets["model"], "--allow_config_change", "true")
    args[args.index("--model") + 1] = deeper
    code, err = cli(capsys, args)
    assert_error(code, err, 2, "another model", "params/layers", "(2, ", "(3, ")


def test_death_before_the_first_checkpoint_leaves_no_stale_rows(capsys, assets, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "bco_jax_run.txt").write_text("")  # the mark the dead start wrote first
    (out / "metrics.jsonl").write_text('{"step": 0, "udm/x": 1}\n{"step": 1, "loss": 9}\n{"step": 2, "loss": 9}\n')
    code, err = cli(capsys, argv(assets, out, "--max_steps", "2"))
    assert code == 0, err[-3000:]
    records = read_metrics(out)
    assert [r["step"] for r in records] == [2] and records[0]["loss"] != 9


# ------------------------------------------------------------------------- garbage must not export


def test_diverging_learning_rate_does_not_export(capsys, assets, tmp_path):
    out = tmp_path / "diverge"
    code, err = cli(capsys, argv(assets, out, "--learning_rate", "1e30", "--max_steps", "4"))
    assert_error(code, err, 2, "skipped", "not exported")
    assert not (out / "hf").exists() and not (out / "bco_state.json").exists()


# -------------------------------------------------------------------------------------- signals


def _signal_at_step(monkeypatch, signum, at):
    add = train.Reporter.add

    def add_and_signal(self, step, metrics):
        add(self, step, metrics)
        if step == at:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(train.Reporter, "add", add_and_signal)


@pytest.mark.parametrize("signum, expected", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_and_exits_with_128_plus_the_signal(capsys, monkeypatch, assets, tmp_path, signum, expected):
    out = tmp_path / "sig"
    _signal_at_step(monkeypatch, signum, 1)
    code, err = cli(capsys, argv(assets, out, "--max_steps", "50", "--save_steps", "100", "--logging_steps", "1",
                                 "--export_hf", "false"))
    assert code == expected, err[-3000:]
    complete, torn = classify(out / "checkpoints")
    assert len(complete) == 1 and 0 < complete[0] < 50 and not torn


def test_ctrl_c_before_training_is_one_line(capsys, monkeypatch, assets, tmp_path):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "build", interrupted)
    code, err = cli(capsys, argv(assets, tmp_path / "out"))
    assert_error(code, err, 130, "interrupted")


# --------------------------------------------- third round: folders the user owns, launch keys, YAML


def _user_folder(tmp_path, kind):
    folder = tmp_path / "mine"
    if kind == "hf_model":
        return Path(tiny_model_dir(folder))
    (folder / "hf").mkdir(parents=True)
    (folder / "config.json").write_text('{"my": "settings"}')
    (folder / "metrics.jsonl").write_text('{"my": 1}\n')
    (folder / "hf" / "notes.txt").write_text("mine")
    return folder


@pytest.mark.parametrize("kind, needle", [("hf_model", "an HF model folder"),
                                          ("not_a_run", "not empty and not a bco-jax run")])
def test_output_dir_the_user_owns_is_refused_and_untouched(capsys, assets, tmp_path, kind, needle):
    folder = _user_folder(tmp_path, kind)
    before = digest(folder)
    code, err = cli(capsys, argv(assets, folder))
    assert_error(code, err, 2, "output_dir", str(folder), needle, "overwrite_output_dir")
    assert digest(folder) == before


def test_overwrite_output_dir_writes_into_a_folder_that_is_not_a_run(capsys, assets, tmp_path):
    folder = _user_folder(tmp_path, "not_a_run")
    code, err = cli(capsys, argv(assets, folder, "--overwrite_output_dir", "true", "--max_steps", "2"))
    assert code == 0, err[-3000:]
    assert (folder / "hf" / "model.safetensors").exists() and (folder / "bco_jax_run.txt").exists()
    code, err = cli(capsys, argv(assets, folder, "--max_steps", "2"))  # now a run: resumed without the key
    assert code == 0 and "resumed" in err, err[-3000:]


@pytest.mark.parametrize("where, needle", [("/proc/bco_jax_out", "/proc/bco_jax_out"),
                                           ("/dev/null/out", "/dev/null/out")])
def test_output_dir_that_cannot_be_created_is_one_line_exit_2(capsys, assets, where, needle):
    code, err = cli(capsys, argv(assets, where))
    assert_error(code, err, 2, "output_dir", needle)


def test_a_damaged_run_record_is_named_with_its_line(capsys, assets, finished, tmp_path):
    out = copy_run(finished, tmp_path)
    history = out / "config_history.jsonl"
    history.write_text(history.read_text() + "{torn\n")
    before = digest(out)
    code, err = cli(capsys, argv(assets, out))
    assert_error(code, err, 2, "output_dir", "config_history.jsonl line 2")
    assert digest(out) == before


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path):
    from bco_jax.metrics import truncate_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1}\n{"step": 2, "lo')
    truncate_metrics(str(tmp_path), 2, finished=False)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1}\n'


@pytest.mark.parametrize("args, key", [
    (["--num_processes", "2", "--process_id", "1"], "num_processes"),
    (["--coordinator_address", "127.0.0.1:1234"], "coordinator_address"),
    (["--coordinator_address", "garbage", "--num_processes", "2", "--process_id", "0"], "coordinator_address"),
    (["--coordinator_address", "host:99999", "--num_processes", "2", "--process_id", "0"], "coordinator_address"),
    (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps"),
    (["--num_train_epochs", "-3"], "num_train_epochs"),
    (["--lora_r", "8"], "lora_r"),
    (["--lora_target_modules", "q_proj"], "lora_target_modules"),
    (["--lora_adapter", "some/adapter"], "lora_adapter"),
    (["--load_in_8bit", "true"], "load_in_8bit"),
])
def test_keys_that_cannot_take_effect_are_refused(capsys, assets, tmp_path, args, key):
    code, err = cli(capsys, argv(assets, tmp_path / "out", *args))
    assert_error(code, err, 2, key)
    assert not (tmp_path / "out").exists()


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize("content, needles", [
    (BOMB, ["values once its aliases are expanded"]),
    ("lora_target_modules: &r [q_proj, *r]\n", ["values once its aliases are expanded"]),
    (b"beta: 0.1\nlearning_rate: \xff\xfe\n", ["not UTF-8", "byte 25"]),
    ("nosuch_key: 1\n", ["unknown config key 'nosuch_key'"]),
    ("run: 5\n", ["section run"]),
    ("beta: " + "9" * 5000 + "x\n", ["beta"]),
    ("/dev/zero", ["larger than 1 MiB"]),
])
def test_hostile_config_files_are_one_short_line_naming_the_file(capsys, tmp_path, content, needles):
    path = Path(content) if content == "/dev/zero" else tmp_path / "cfg.yaml"
    if content != "/dev/zero":
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, err = cli(capsys, ["--config", path])
    assert_error(code, err, 2, *needles)
    assert len(err) < 600 and (str(path) in err or "beta" in needles)


def test_unraisable_exceptions_go_to_the_debug_log(capsys, monkeypatch):
    import sys
    import types

    cli(capsys, ["--beta", "nan"])
    assert sys.unraisablehook is train._unraisable_to_debug_log
    sys.unraisablehook(types.SimpleNamespace(object=None, exc_value=RuntimeError("Event loop is closed")))
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------- adapters given to start from


def _adapter(folder, model, rank=4, change=None):
    """A PEFT adapter folder for `model` (rank `rank`), written by our own exporter; `change`
    damages it as a download or a mix-up would."""
    from bco_jax.models import lora, read_config
    from bco_jax.models.decoder import layer_param_shapes

    cfg = read_config(model)
    shapes = {k: v[0] for k, v in layer_param_shapes(cfg).items()}
    targets = lora.resolve_targets([])
    adapters = lora.by_projection({"layers": {f"{n}_lora_{ab}": v[ab] for n, v in lora.init_adapters(
        shapes, cfg.num_layers, targets, rank, __import__("jax").random.key(0)).items() for ab in "ab"}})
    lora.save_peft(adapters, str(folder), rank=rank, alpha=8.0, dropout=0.0, targets=targets, base_model=model)
    weights = Path(folder) / "adapter_model.safetensors"
    if change == "corrupt":
        weights.write_bytes(b"\x10" + b"\x00" * 7 + b"{garbage}")
    elif change == "truncated":
        weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    elif change == "nan":
        from safetensors.numpy import load_file, save_file

        tensors = load_file(str(weights))
        name = sorted(tensors)[0]
        tensors[name] = np.full_like(tensors[name], np.nan)
        save_file(tensors, str(weights))
    return str(folder)


@pytest.mark.parametrize("case, needle", [
    ("other_base", "needs"), ("corrupt", "cannot read"), ("truncated", "cannot read"), ("wrong_rank", "r=8"),
    ("missing", "cannot read"), ("nan", "NaN"),
])
def test_a_bad_adapter_is_named_before_anything_is_written(capsys, assets, tmp_path, case, needle):
    model = tiny_model_dir(tmp_path / "wide", hidden=48) if case == "other_base" else assets["model"]
    adapter = tmp_path / "adapter"
    if case != "missing":
        _adapter(adapter, model, rank=8 if case == "wrong_rank" else 4, change=case)
    out = tmp_path / "out"
    code, err = cli(capsys, argv(assets, out, "--use_peft", "true", "--lora_r", "4", "--lora_adapter", adapter))
    assert_error(code, err, 2, "lora_adapter", str(adapter), needle)
    assert not out.exists()


def test_an_adapter_inside_output_dir_is_refused(capsys, assets, tmp_path):
    out = tmp_path / "run"
    adapter = _adapter(out / "adapter", assets["model"])
    before = digest(out)
    code, err = cli(capsys, argv(assets, out, "--use_peft", "true", "--lora_r", "4", "--lora_adapter", adapter))
    assert_error(code, err, 2, "output_dir", "lora_adapter")
    assert digest(out) == before


def test_a_reference_with_another_tokenizer_of_the_same_size_is_refused(capsys, assets, tmp_path):
    ref = Path(shutil.copytree(assets["model"], tmp_path / "ref"))
    doc = json.loads((ref / "tokenizer.json").read_text())
    vocab = doc["model"]["vocab"]
    vocab["1"], vocab["2"] = vocab["2"], vocab["1"]
    (ref / "tokenizer.json").write_text(json.dumps(doc))
    code, err = cli(capsys, argv(assets, tmp_path / "out", "--ref_model", ref))
    assert_error(code, err, 2, "ref_model", "tokenizer", "'1'")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- a full disk, for real


def test_a_full_disk_during_a_checkpoint_or_the_export_keeps_what_was_saved(capsys, assets, finished, tmp_path):
    """RLIMIT_FSIZE (SIGXFSZ ignored) from a named point on: every write past 2000 bytes fails with
    EFBIG, in Orbax's background threads too. The checkpoint at step 4 fails (step 2's is intact);
    then the export fails (hf/ is never half there); a rerun with room exports what one run would."""
    import subprocess
    import sys

    out = tmp_path / "run"
    for limit, message in (("checkpoint:2:2000", "checkpoint"), ("export:1:2000", "the export")):
        env = {**os.environ, "BCO_JAX_FILE_LIMIT": limit}
        done = subprocess.run([sys.executable, "-m", "bco_jax.train", *map(str, argv(assets, out))], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last and "File too large" in last, last
        assert not (out / "hf").exists()
    assert classify(out / "checkpoints")[0] == [2, 4]
    code, err = cli(capsys, argv(assets, out))
    assert code == 0 and "resumed" in err, err[-3000:]
    assert (out / "hf" / "model.safetensors").read_bytes() == finished["hf"]
