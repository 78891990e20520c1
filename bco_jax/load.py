"""The models a run reads: the policy's and the reference's HF folders, checked, and loaded onto the mesh.

A model folder is `--model` / `--ref_model` (or a GGUF file, which stands for a folder everywhere: its
metadata is the config and tokenizer), or when that is gone the copy a previous start saved under
output_dir (`RunDir.model_copy`, `RunDir.reference_copy`: config and tokenizer, and the reference's
weights as Orbax). Before a weight is read the folder's config.json and safetensors headers are
checked, so a truncated download or a mismatched reference is named in one line (ConfigError, see
docs/reliability.md), not deep inside the loader; weights holding a NaN or inf are refused.
`build` calls these; this module sits below it (a `run` argument is a `bco_jax.build.Run`, read by
its fields).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil

import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from bco_jax import checkpoint as ckpt_lib
from bco_jax.config import TrainConfig
from bco_jax.errors import ConfigError, first_line, log
from bco_jax.files import atomic_write_json
from bco_jax.models import Decoder, compute_dtype, gguf_io, load_hf, lora, read_config
from bco_jax.models.config import find_gguf, read_source
from bco_jax.resume import fingerprint_once, has_weights
from bco_jax.run_dir import RunDir
from bco_jax.sharding import LOGICAL_RULES, abstract_on, model_shardings

# ----------------------------------------------------------------------------- options of the models


def model_options(cfg: TrainConfig) -> dict:
    return dict(dtype=compute_dtype(cfg.model.dtype), remat=cfg.model.remat,
                attn_implementation=cfg.model.attn_implementation)


def lora_options(cfg: TrainConfig) -> dict:
    """ModelConfig fields of the policy's LoRA adapters (none without use_peft), and of its int8 base."""
    m = cfg.model
    if not m.use_peft:
        return {}
    return dict(lora_rank=m.lora_r, lora_alpha=float(m.lora_alpha), lora_dropout=float(m.lora_dropout),
                lora_targets=lora.resolve_targets(m.lora_target_modules), **base_options(cfg))


def base_options(cfg: TrainConfig) -> dict:
    """ModelConfig fields of the frozen base the adapters sit on: int8 projections with load_in_8bit."""
    return {"quantize_base": True} if cfg.model.use_peft and cfg.model.load_in_8bit else {}


def int8_reference(cfg: TrainConfig) -> bool:
    """Whether the reference is int8: it is the base with adapters off, and the base is int8."""
    return bool(base_options(cfg)) and not cfg.model.separate_reference


# ------------------------------------------------------------------------- model folders and checks


def model_folder(path: str, saved: str, key: str) -> str:
    """`path` when it is a folder or a GGUF file, else the copy a previous start saved under output_dir."""
    gguf = find_gguf(path) if os.path.isdir(path) or (path.endswith(".gguf") and os.path.isfile(path)) else None
    if gguf is not None:
        return check_gguf(gguf, key)
    if os.path.isdir(path):
        return check_model_files(path, key)
    if os.path.exists(os.path.join(saved, "config.json")):
        log.warning("%s: %s is gone; using the copy saved in %s", key, path, saved)
        return check_model_files(saved, key)
    raise ConfigError(f"{key}: {path} is neither a folder nor a .gguf file (a local HF model folder or GGUF "
                      "file is expected; nothing is downloaded)")


def check_gguf(path: str, key: str) -> str:
    """`path`, once its GGUF header, metadata and tensor table read and give a config we implement."""
    try:
        read_config(path)
        gguf_io.open_checkpoint(path).names()
    except ConfigError as err:
        raise ConfigError(f"{key}: {err}") from None
    except (OSError, ValueError, KeyError, IndexError, TypeError) as err:
        raise ConfigError(f"{key}: {path} is not a readable GGUF file ({err})") from None
    return path


def check_model_files(folder: str, key: str) -> str:
    """`folder`, once its config.json and safetensors files read: a truncated or garbled file is
    named here, not deep inside the loader."""
    config = os.path.join(folder, "config.json")
    try:
        with open(config, encoding="utf-8") as f:
            if not isinstance(json.load(f), dict):
                raise ValueError("not a JSON object")
    except FileNotFoundError:
        raise ConfigError(f"{key}: no config.json in {folder} (a local HF model folder is expected)") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"{key}: cannot read {config} ({err})") from None
    try:
        read_config(folder)  # the sizes and the architecture, named with the file
    except ConfigError as err:
        raise ConfigError(f"{key}: {err}") from None
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            _check_safetensors(os.path.join(folder, name), key)
    return folder


def _check_safetensors(path: str, key: str) -> None:
    """Header readable and every tensor's bytes inside the file (a truncated download fails here)."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < header_len <= size - 8:
                raise ValueError("no safetensors header")
            header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        raise ConfigError(f"{key}: {path} is not a readable safetensors file ({err})") from None
    if 8 + header_len + end > size:
        raise ConfigError(f"{key}: {path} is truncated ({size} bytes, its header needs {8 + header_len + end})")


def check_pairing(cfg: TrainConfig, ref_folder: str, output_dir: str) -> None:
    """A reference must score the policy's tokens: same vocabulary, architecture and width."""
    model = cfg.model.model
    policy = model if os.path.isdir(model) or os.path.isfile(model) else RunDir(output_dir).model_copy
    check_same_base(policy, ref_folder)


def check_same_base(policy: str, reference: str, key: str = "ref_model") -> None:
    """`reference` (folder or GGUF file) scores `policy`'s tokens: the same vocabulary size,
    architecture and width, and the same tokenizer (token -> id). ConfigError naming `key` and both."""
    if os.path.abspath(policy) == os.path.abspath(reference):
        return
    try:
        configs = [read_config(f) for f in (policy, reference)]  # GGUF or folder; a VLM's text tower
    except (OSError, ValueError):
        return  # a missing or unreadable config is reported where that model loads
    for name in ("vocab_size", "architecture", "hidden_size"):
        ours, theirs = (getattr(c, name) for c in configs)
        if ours != theirs:
            raise ConfigError(f"{key}: {reference} has {name}={theirs!r}, the policy {policy} has "
                              f"{ours!r}; the reference must be the policy's own starting point (same "
                              "tokenizer and architecture)")
    if _same_tokenizer_files(policy, reference):
        return
    ours, theirs = (tokenizer_vocab(f) for f in (policy, reference))
    if ours is not None and theirs is not None and ours != theirs:
        token = min((t for t in ours.keys() | theirs.keys() if ours.get(t) != theirs.get(t)),
                    key=lambda t: (ours.get(t, len(ours)), t))
        raise ConfigError(f"{key}: the tokenizer of {reference} is not the policy's ({policy}): token {token!r} is "
                          f"id {ours.get(token)} for the policy, {theirs.get(token)} for the reference; the "
                          "reference must score the policy's own tokens")


def _same_tokenizer_files(a: str, b: str) -> bool:
    """Both folders hold byte-identical tokenizer files (the common case: no tokenizer to build)."""
    names = ("tokenizer.json", "tokenizer_config.json")
    if not (os.path.isdir(a) and os.path.isdir(b)) or not os.path.exists(os.path.join(a, names[0])):
        return False
    try:
        return all(_read_bytes(os.path.join(a, n)) == _read_bytes(os.path.join(b, n)) for n in names)
    except OSError:
        return False


def _read_bytes(path: str) -> bytes | None:
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return f.read()


def tokenizer_vocab(path: str) -> dict | None:
    """token -> id of the tokenizer in a model folder or GGUF file; None when it has none that loads
    (then there is nothing to compare)."""
    try:
        return dict(load_tokenizer(path).get_vocab())
    except (ConfigError, OSError, ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def reading_weights(folder: str, key: str):
    """Turns a loader error on a model folder's weights into one ConfigError naming the folder."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as err:
        first = first_line(err)
        raise ConfigError(f"{key}: cannot load the weights in {folder} ({first})") from err


def check_finite_weights(params, folder: str, key: str) -> None:
    """Refuse a model with a NaN or inf weight: every step would be skipped and nothing learnt."""
    bad = ckpt_lib.nonfinite_arrays(params)
    if bad:
        raise ConfigError(f"{key}: {folder} has non-finite weights (NaN or inf) in {', '.join(bad[:3])}"
                          f"{' ...' if len(bad) > 3 else ''}")


# ---------------------------------------------------------------------------------------- loaders


def load_tokenizer(path: str):
    """The tokenizer of an HF folder, or the one a GGUF file's metadata describes (built without torch)."""
    from transformers import AutoTokenizer

    gguf = find_gguf(path)
    if gguf is not None:
        return gguf_io.open_checkpoint(gguf).tokenizer()
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model: cannot load a tokenizer from {path} ({err})") from None


def abstract_model(path: str, param_dtype, cfg: TrainConfig, **extra):
    """(graphdef, abstract nnx.State) of the model in HF folder `path`, without reading weights."""
    options = model_options(cfg)
    dtype = options.pop("dtype")
    model_cfg = read_config(path, **options, **extra)
    model = nnx.eval_shape(lambda: Decoder(model_cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
    return nnx.split(model)


def load_reference(cfg: TrainConfig, mesh, output_dir: str):
    """(graphdef, params, path, fingerprint) of the frozen reference: from its HF folder, or from the
    Orbax copy a previous start saved under output_dir when that folder is gone."""
    path = cfg.model.ref_model or cfg.model.model
    out = RunDir(output_dir)
    saved = out.reference_copy
    folder = model_folder(path, out.reference_hf, "ref_model")
    check_pairing(cfg, folder, output_dir)
    # With use_peft and no separate ref_model the reference is the policy's frozen base, kept in the
    # compute dtype.
    as_base = cfg.model.use_peft and not cfg.model.separate_reference
    param_dtype = compute_dtype(cfg.model.dtype) if as_base else jnp.dtype(cfg.model.ref_dtype)
    quantized = base_options(cfg) if int8_reference(cfg) else {}
    graphdef, abstract = abstract_model(folder, param_dtype, cfg, **quantized)
    if folder == path:
        params = _load_params(path, param_dtype, cfg, mesh, "ref_model", **quantized)
        return graphdef, params, path, fingerprint_once(path)
    with open(out.reference_record, encoding="utf-8") as f:
        record = json.load(f)
    if record.get("ref_dtype") != cfg.model.ref_dtype:
        raise ConfigError(f"ref_dtype: the saved reference copy in {saved} is {record.get('ref_dtype')}, "
                          f"not {cfg.model.ref_dtype}; keep ref_dtype or restore the original {path}")
    if record.get("int8", False) != bool(quantized):
        raise ConfigError(f"load_in_8bit: the saved reference copy in {saved} was written with load_in_8bit "
                          f"{str(record.get('int8', False)).lower()}; keep it or restore the original {path}")
    shardings = nnx.to_pure_dict(model_shardings(abstract, mesh))
    target = abstract_on(nnx.to_pure_dict(abstract), shardings)
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(out.reference_params, target)
    return graphdef, params, record["path"], record["fingerprint"]


def load_base(cfg: TrainConfig, mesh, model_dir: str):
    """(graphdef, params) of the frozen base the adapters sit on, with use_peft and a separate
    ref_model: from `--model` in the compute dtype (only the reference is saved under output_dir)."""
    if not has_weights(os.listdir(model_dir) if os.path.isdir(model_dir) else [model_dir]):
        raise ConfigError(f"model: {cfg.model.model} is gone; with use_peft and a separate ref_model the frozen "
                          "base is read from it on every start (only the reference is saved under output_dir)")
    dtype = compute_dtype(cfg.model.dtype)
    return (abstract_model(model_dir, dtype, cfg, **base_options(cfg))[0],
            _load_params(model_dir, dtype, cfg, mesh, "model", **base_options(cfg)))


def _load_params(path: str, param_dtype, cfg: TrainConfig, mesh, key: str, **extra) -> dict:
    with reading_weights(path, key):
        model = load_hf(path, param_dtype=param_dtype, mesh=mesh, rules=LOGICAL_RULES, **model_options(cfg), **extra)
    params = nnx.to_pure_dict(nnx.split(model)[1])
    check_finite_weights(params, path, key)
    return params


# ------------------------------------------------------------------------------ the copies it saves


def save_model_copies(run) -> None:
    """Once per output_dir: the policy's config + tokenizer (`model/`) and, unless save_reference is
    off, the reference weights (`reference/`, Orbax) with its config and fingerprint. Every process
    calls it (the Orbax write is collective); process 0 writes the small files."""
    out = run.dir
    if run.main_process and run.model_dir != out.model_copy and not os.path.exists(out.model_copy):
        _copy_hf_files(run.model_dir, out.model_copy, run.tokenizer)
    if not run.cfg.run.save_reference or run.reference is None or os.path.exists(out.reference_record):
        return
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out.reference_params, run.reference, force=True)
    if run.main_process:
        _copy_hf_files(run.ref_path, out.reference_hf, None)
        atomic_write_json(out.reference_record,  # written last: marks the copy complete
                          {"path": os.path.abspath(run.ref_path), "fingerprint": run.ref_fingerprint,
                           "ref_dtype": run.cfg.model.ref_dtype,
                           "int8": int8_reference(run.cfg)}, indent=2)


def _copy_hf_files(source: str, target: str, tokenizer) -> None:
    """config.json and generation_config.json of `source` (written from its metadata for a GGUF
    file), and the tokenizer, into `target` atomically."""
    tmp = f"{target}.tmp-{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    if find_gguf(source) is not None:
        for name, content in zip(("config.json", "generation_config.json"), read_source(source)):
            if content:
                atomic_write_json(os.path.join(tmp, name), content, indent=2)
    for name in ("config.json", "generation_config.json"):
        if os.path.isdir(source) and os.path.exists(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)
