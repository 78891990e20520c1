"""The policy export streams: with LoRA it merges one layer at a time while writing (never the whole
merged model at once), bit for bit `lora.merged_weights`, from a float or an int8 base; a full
fine-tuning export is written in the dtype its source config.json declares (cast before gathering)."""
import gc
import json
import os
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util
from train_fixtures import tiny_model_dir

from bco_jax.build import export_policy
from bco_jax.models import hf, load_hf, lora, quant
from bco_jax.models import safetensors_io as st
from bco_jax.run_dir import RunDir

LAYERS, RANK, ALPHA = 8, 4, 8.0


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"), layers=LAYERS, hidden=64)


def fake_run(model_dir, output_dir, model, *, use_peft, base=None):
    """What `export_policy` reads of a `build.Run`."""
    graphdef = nnx.split(model)[0]
    m = SimpleNamespace(use_peft=use_peft, lora_r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, lora_target_modules=[],
                        model=model_dir)
    return SimpleNamespace(cfg=SimpleNamespace(model=m), dir=RunDir(str(output_dir)), main_process=True,
                           model_dir=model_dir, tokenizer=None, graphdef=graphdef, base_graphdef=graphdef, base=base)


def trained_adapters(model):
    """All seven projections adapted, B nonzero (as after training: the merge changes every weight)."""
    cfg = model.config
    shapes = {name: getattr(model.layers, name)[...].shape[1:] for name in lora.resolve_targets([])}
    fresh = lora.init_adapters(shapes, cfg.num_layers, tuple(shapes), RANK, jax.random.key(0))
    rng = np.random.default_rng(0)
    return {"layers": {f"{name}_lora_{ab}": jnp.asarray(value if ab == "a" else 0.05 * rng.normal(size=value.shape),
                                                         jnp.float32)
                       for name, pair in fresh.items() for ab, value in pair.items()}}


class Meter:
    """High-water mark, above what was alive when it started, of the device arrays alive plus the host
    arrays the safetensors writer holds (its pending shard), sampled at each tensor the export yields
    and after each LoRA update is computed."""

    def __init__(self):
        gc.collect()
        self.start, self.pending, self.peak = self.live(), 0, 0

    @staticmethod
    def live() -> int:
        return sum(x.nbytes for x in jax.live_arrays())

    def sample(self, extra: int = 0):
        self.peak = max(self.peak, self.live() - self.start + self.pending + extra)

    def install(self, monkeypatch, max_shard_bytes):
        write, flush, delta = st.write_sharded, st._flush, lora.delta_weight

        def tracked(named_arrays):
            for name, array in named_arrays:
                self.sample(array.nbytes)
                yield name, array
                self.pending += array.nbytes  # the writer holds it until its shard is flushed

        def flushed(*args):
            self.pending = 0
            return flush(*args)

        def measured_delta(*args):
            out = delta(*args)
            if not isinstance(out, jax.core.Tracer):  # (the export's jax.eval_shape computes nothing)
                self.sample()
            return out

        # Shards of about one layer: the writer's buffer is bounded by the shard size, not the model.
        monkeypatch.setattr(st, "write_sharded", lambda arrays, folder, _: write(tracked(arrays), folder,
                                                                                  max_shard_bytes))
        monkeypatch.setattr(st, "_flush", flushed)
        monkeypatch.setattr(lora, "delta_weight", measured_delta)
        # On CPU np.asarray(jax array) shares its buffer; gathering from an accelerator copies: copy, so
        # that the device array is freed and the writer's host copy is not counted twice.
        monkeypatch.setattr(hf, "host_gather", lambda x: np.array(x))


def assert_same_params(path, expected):
    exported = nnx.to_pure_dict(nnx.split(load_hf(path, param_dtype=jnp.float32))[1])
    flat = dict(jax.tree_util.tree_leaves_with_path(exported))
    for key, want in jax.tree_util.tree_leaves_with_path(expected):
        np.testing.assert_array_equal(np.asarray(flat[key]), np.asarray(want), err_msg=jax.tree_util.keystr(key))
    assert len(flat) == len(jax.tree_util.tree_leaves(expected))


@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
def test_lora_export_merges_layer_by_layer(source, tmp_path, monkeypatch, int8):
    model = load_hf(source, param_dtype=jnp.float32)
    base = nnx.to_pure_dict(nnx.split(model)[1])
    base_bytes = sum(x.nbytes for x in jax.tree.leaves(base))
    layer_bytes = sum(x.nbytes // LAYERS for x in base["layers"].values())
    if int8:
        base = quant.quantize_base(base)
    adapters = trained_adapters(model)
    expected = lora.merged_weights(base, adapters, ALPHA / RANK)  # the definition: merged all at once
    assert not np.array_equal(expected["layers"]["wq"], base["layers"]["wq"])

    meter = Meter()
    meter.install(monkeypatch, layer_bytes)
    export_policy(fake_run(source, tmp_path, model, use_peft=True, base=base), SimpleNamespace(params=adapters))
    monkeypatch.undo()
    print(f"int8={int8}: base {base_bytes} B, a layer {layer_bytes} B, export high-water above resident "
          f"{meter.peak} B ({meter.peak / layer_bytes:.2f} layers)")
    assert meter.peak <= 2 * layer_bytes
    assert len([f for f in os.listdir(tmp_path / "hf") if f.endswith(".safetensors")]) > LAYERS  # sharded
    assert_same_params(str(tmp_path / "hf"), expected)
    assert os.path.exists(tmp_path / "adapter" / "adapter_model.safetensors")


def test_full_export_is_written_in_the_source_dtype(source, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "bf16"
    os.makedirs(folder)
    for name in os.listdir(source):
        os.symlink(os.path.join(source, name), folder / name)
    os.remove(folder / "config.json")
    with open(os.path.join(source, "config.json")) as f:
        config = json.load(f)
    config.pop("torch_dtype", None)
    with open(folder / "config.json", "w") as f:
        json.dump({**config, "dtype": "bfloat16"}, f)

    model = load_hf(str(folder), param_dtype=jnp.float32)
    params = nnx.to_pure_dict(nnx.split(model)[1])
    rng = np.random.default_rng(1)  # "trained": float32 values that bfloat16 rounds
    params = jax.tree.map(lambda x: jnp.asarray(x + 1e-3 * rng.normal(size=x.shape), jnp.float32), params)
    export_policy(fake_run(str(folder), tmp_path / "out", model, use_peft=False), SimpleNamespace(params=params))
    path = tmp_path / "out" / "hf"
    with open(path / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"
    tensors = st.SafetensorsFile(str(path / "model.safetensors"))
    assert {tensors.header[n]["dtype"] for n in tensors.names()} == {"BF16"}
    ours = nnx.to_pure_dict(nnx.split(load_hf(str(path), param_dtype=jnp.bfloat16))[1])
    np.testing.assert_array_equal(ours["layers"]["wq"], params["layers"]["wq"].astype(jnp.bfloat16))

    exported = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    assert exported.dtype == torch.bfloat16
    theirs = {k: v.float().numpy() for k, v in exported.state_dict().items()}
    for name, array in tensors_in_hf_layout(model, params):
        np.testing.assert_array_equal(theirs[name], array.astype(np.float32), err_msg=name)


def tensors_in_hf_layout(model, params):
    """The params cast to bfloat16 (on the host, by ml_dtypes), in the HF names and layout."""
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    for ours, (name, perm, split) in hf._table_for(model.config, flat).items():
        array = flat[ours].astype(jnp.bfloat16)
        if "{i}" not in name:
            yield name, hf._to_hf(array, perm, split)
        else:
            for i in range(array.shape[0]):
                yield name.format(i=i), hf._to_hf(array[i], perm, split)
