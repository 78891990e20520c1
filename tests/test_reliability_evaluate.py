"""The evaluator's hostile corpus: `python -m bco_jax.evaluate` held to the trainer's standard
(docs/reliability.md). Bad input: exit 2, one line `error: ...` naming the flag, file or folder, no
traceback, nothing the user owns written; a report is strict JSON, no NumPy RuntimeWarning.
Run in-process (`evaluate.main(argv)`) on tiny models built once per module.
"""

import errno
import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
from test_reliability import assert_error, digest
from train_fixtures import feedback_file, tiny_model_dir

from bco_jax import evaluate, files
from bco_jax.run_dir import RunDir, samples_path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    model = tiny_model_dir(root / "model")
    run = RunDir(str(root / "run"))  # a finished training output dir, as the trainer leaves it
    shutil.copytree(model, run.hf)
    Path(run.final_state).write_text(json.dumps({"beta": 0.1, "delta": 0.05, "reference_path": model}))
    Path(run.config).write_text(json.dumps({"max_length": 32}))
    return {"root": root, "model": model, "run": run.root, "data": feedback_file(root / "fb.jsonl", 16)}


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default report (outputs/eval/...) lands here, never in the repository


def argv(assets, output, *extra):
    args = ["--model", assets["model"], "--data", assets["data"], "--num_samples", "2", "--max_new_tokens", "4",
            "--batch_size", "4", "--max_length", "32", *extra]
    return args + (["--output", str(output)] if output is not None else [])


def cli(capsys, args) -> tuple[int, str]:
    """Exit code and stderr of one in-process run, with RuntimeWarnings raised as errors."""
    capsys.readouterr()  # what building the models printed is not the evaluator's
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        code = evaluate.main([str(a) for a in args])
    return code, capsys.readouterr().err


def refused(capsys, args, *needles, untouched=()):
    """Exit 2, one line naming every needle, the folders `untouched` unchanged, no report anywhere."""
    before = [digest(f) for f in untouched]
    code, err = cli(capsys, args)
    assert_error(code, err, 2, *needles)
    assert len(err.strip().splitlines()) == 1, err
    assert [digest(f) for f in untouched] == before
    report = Path(args[args.index("--output") + 1]) if "--output" in args else None
    assert report is None or not (report.is_file() or Path(samples_path(str(report))).exists())
    assert not Path("outputs").exists()


def strict_json(path) -> dict:
    return json.loads(Path(path).read_text(), parse_constant=lambda c: pytest.fail(f"bare {c} in {path}"))


def copy_model(assets, tmp_path) -> Path:
    return Path(shutil.copytree(assets["model"], tmp_path / "copy"))


# ------------------------------------------------------------------------------------------ flags


@pytest.mark.parametrize("flag, value", [
    ("temperature", "nan"), ("temperature", "inf"), ("temperature", "-1"), ("temperature", "warm"),
    ("top_p", "0"), ("top_p", "1.5"), ("top_p", "nan"), ("num_samples", "-1"), ("max_new_tokens", "0"),
    ("batch_size", "0"), ("delta", "nan"), ("beta", "inf"), ("beta", "0"), ("seed", "-1"),
])
def test_out_of_range_flags_are_refused_naming_the_flag(capsys, assets, tmp_path, flag, value):
    refused(capsys, argv(assets, tmp_path / "r" / "eval.json", f"--{flag}", value), f"--{flag}",
            untouched=[assets["model"]])


def test_a_missing_required_flag_is_one_line(capsys, tmp_path):
    refused(capsys, ["--data", "x.jsonl"], "--model")


# ------------------------------------------------------------------------------------- reference


def _other_tokenizer(assets, tmp_path) -> str:
    """The tiny model with two token ids swapped in its tokenizer: the same vocabulary size."""
    folder = copy_model(assets, tmp_path)
    doc = json.loads((folder / "tokenizer.json").read_text())
    vocab = doc["model"]["vocab"]
    vocab["1"], vocab["2"] = vocab["2"], vocab["1"]
    (folder / "tokenizer.json").write_text(json.dumps(doc))
    return str(folder)


@pytest.mark.parametrize("which, needle", [("vocab", "vocab_size"), ("family", "architecture"),
                                           ("tokenizer", "tokenizer")])
def test_a_reference_of_another_base_is_refused(capsys, assets, tmp_path, which, needle):
    if which == "tokenizer":
        ref = _other_tokenizer(assets, tmp_path)
    else:
        ref = tiny_model_dir(tmp_path / "ref", **({"vocab_size": 40} if which == "vocab" else {"family": "gemma3"}))
    refused(capsys, argv(assets, tmp_path / "r" / "eval.json", "--ref_model", ref), "--ref_model", needle,
            untouched=[assets["model"], ref])


# --------------------------------------------------------------------------------- broken inputs


def test_a_missing_data_file_is_named(capsys, assets, tmp_path):
    args = argv(assets, tmp_path / "r" / "eval.json")
    args[args.index("--data") + 1] = str(tmp_path / "nosuch.jsonl")
    refused(capsys, args, "--data", "nosuch.jsonl", untouched=[assets["model"]])


def test_an_oracle_that_does_not_import_is_named(capsys, assets, tmp_path):
    refused(capsys, argv(assets, tmp_path / "r" / "eval.json", "--reward_fn", "nosuch:fn"), "--reward_fn",
            "nosuch", untouched=[assets["model"]])


@pytest.mark.parametrize("how, needle", [("truncated", "model.safetensors"), ("bad_config", "config.json"),
                                         ("nan_weight", "non-finite")])
@pytest.mark.parametrize("role", ["--model", "--ref_model"])
def test_broken_model_folders_are_named(capsys, assets, tmp_path, how, needle, role):
    folder = copy_model(assets, tmp_path)
    weights = folder / "model.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "bad_config":
        (folder / "config.json").write_text('{"vocab_size": ')
    else:
        from safetensors.numpy import load_file, save_file

        tensors = load_file(str(weights))
        name = sorted(tensors)[0]
        tensors[name] = tensors[name].copy()
        tensors[name].flat[0] = float("nan")
        save_file(tensors, str(weights), metadata={"format": "pt"})
    args = argv(assets, tmp_path / "r" / "eval.json")
    if role == "--model":
        args[args.index("--model") + 1] = str(folder)
    else:
        args += ["--ref_model", str(folder)]
    refused(capsys, args, role, needle, untouched=[folder])


@pytest.mark.parametrize("name", ["config.json", "bco_state.json"])
def test_a_garbled_file_of_a_training_output_dir_is_named(capsys, assets, tmp_path, name):
    run = Path(shutil.copytree(assets["run"], tmp_path / "run"))
    (run / name).write_text("{not json")
    args = argv(assets, tmp_path / "r" / "eval.json")
    args[args.index("--model") + 1] = str(run)
    refused(capsys, args, "--model", str(run / name), untouched=[run])


# ------------------------------------------------------------------------------ output location


def test_an_output_inside_the_model_folder_is_refused(capsys, assets):
    refused(capsys, argv(assets, Path(assets["model"]) / "eval.json"), "--output", "is inside",
            untouched=[assets["model"]])


def test_an_output_that_is_a_folder_is_refused(capsys, assets, tmp_path):
    (tmp_path / "here").mkdir()
    refused(capsys, argv(assets, tmp_path / "here"), "--output", "is a folder", untouched=[assets["model"]])


def test_a_failed_write_is_one_line_naming_the_output(capsys, monkeypatch, assets, tmp_path):
    def refuse(path, write):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

    monkeypatch.setattr(files, "atomic_write", refuse)
    output = tmp_path / "r" / "eval.json"
    refused(capsys, argv(assets, output, "--num_samples", "0"), "--output", str(output), os.strerror(errno.EROFS),
            untouched=[assets["model"]])


# ------------------------------------------------------------------------------------ legitimate


def test_no_samples_is_a_strict_report_without_warnings(capsys, assets, tmp_path):
    run = Path(shutil.copytree(assets["run"], tmp_path / "run"))
    thumbs_up = tmp_path / "up.jsonl"  # one class: no AUC
    thumbs_up.write_text("".join(json.dumps({"prompt": f"{a}+1=", "completion": str(a + 1), "label": True}) + "\n"
                                 for a in range(8)))
    args = argv(assets, None, "--num_samples", "0")
    args[args.index("--model") + 1], args[args.index("--data") + 1] = str(run), str(thumbs_up)
    code, err = cli(capsys, args)  # no "Mean of empty slice"
    assert code == 0, err[-3000:]
    report = strict_json(run / "eval.json")  # a training output dir: its own folder holds the report
    assert report["samples"] == 0 and "kl" not in report and report["delta"] == 0.05
    assert report["reward_auc"] is None
    assert (run / "eval_samples.jsonl").read_text() == ""


def test_a_plain_model_folder_reports_under_outputs_eval(capsys, assets, tmp_path):
    before = digest(assets["model"])
    code, err = cli(capsys, argv(assets, None))
    assert code == 0, err[-3000:]
    report = strict_json(tmp_path / "outputs" / "eval" / "model" / "eval.json")
    assert report["samples"] == 2 and report["kl"] == 0.0  # the model against itself
    assert len((tmp_path / "outputs" / "eval" / "model" / "eval_samples.jsonl").read_text().splitlines()) == 2
    assert digest(assets["model"]) == before
