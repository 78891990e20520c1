"""LoRA adapters on the decoder's projections, with PEFT's names, defaults and file format.

A projection W (stacked over layers, e.g. the q projection [L, D, N, H]) gets a low-rank update
    y = x W + (alpha / r) * dropout(x) A B,    A [L, in..., r] (PEFT's kaiming-uniform init), B [L, r, out...] (0)
so the adapted model starts equal to the base. The base stays frozen; only A and B are trained, in
float32. With the adapters off, the same base is the reference model: no second copy in memory
(unless the run names a separate ref_model, which is then loaded beside the base).
Adapters live in the model as `nnx.Param`s named `<projection>_lora_a/_lora_b` inside `Layers` (the
logical axis "lora" for the rank, replicated), so they are scanned with the layer they adapt.

Why not qwix (Tunix's LoRA): it intercepts ops inside matched module paths, while our projections are
stacked [layers, ...] arrays applied by matmuls inside one `lax.scan` over layers; reaching one adapter
per projection and per layer there would need its provider to rewrite our scan body. The few lines
here do it directly, keep PEFT's tensor layout one transpose away, and export what PEFT loads.
"""
from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save

from bco_jax.errors import ConfigError, first_line
from bco_jax.files import atomic_write, atomic_write_json
from bco_jax.models import quant
from bco_jax.models.projections import PROJECTIONS

PEFT_TO_OURS = {p.peft: name for name, p in PROJECTIONS.items()}  # PEFT's target_modules names -> ours


def resolve_targets(target_modules) -> tuple[str, ...]:
    """PEFT / TRL `lora_target_modules` (a list of module names, "all-linear", or empty for every
    attention and MLP projection) -> our projection names, in a fixed order."""
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    names = list(target_modules or [])
    if not names or names == ["all-linear"]:
        return tuple(PROJECTIONS)
    unknown = [n for n in names if n not in PEFT_TO_OURS]
    if unknown:
        raise ConfigError(f"lora_target_modules: unknown module(s) {unknown}; choose from "
                         f"{sorted(PEFT_TO_OURS)} or all-linear")
    return tuple(ours for ours, p in PROJECTIONS.items() if p.peft in names)


def adapter_shapes(name: str, layer_shape: tuple[int, ...], axes: tuple[str, ...], rank: int):
    """((shape, axes) of A, (shape, axes) of B) for projection `name` whose per-layer weight has
    `layer_shape` / logical `axes` (without the leading layers axis)."""
    n_in = PROJECTIONS[name].n_in
    a = ((*layer_shape[:n_in], rank), (*axes[:n_in], "lora"))
    b = ((rank, *layer_shape[n_in:]), ("lora", *axes[n_in:]))
    return a, b


def init_a(key, shape, dtype):
    """PEFT's init of lora_A: kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    fan_in = math.prod(shape[1:-1])  # [layers, in..., r]
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def delta_weight(a, b, scale: float):
    """(alpha / r) * A B as a weight of the projection's own layout [L, in..., out...]."""
    n_in = a.ndim - 2  # minus the layers and rank axes
    a2 = a.reshape(a.shape[0], math.prod(a.shape[1:1 + n_in]), a.shape[-1])
    b2 = b.reshape(b.shape[0], b.shape[1], -1)
    return (scale * jnp.einsum("lir,lro->lio", a2, b2)).reshape(*a.shape[:-1], *b.shape[2:])


def is_adapter(path: str) -> bool:
    return "_lora_" in path


def split_adapters(params: dict) -> tuple[dict, dict]:
    """A pure param dict -> (base, adapters): the adapters are the `layers/*_lora_[ab]` leaves."""
    layers = params["layers"]
    base = {**params, "layers": {k: v for k, v in layers.items() if not is_adapter(k)}}
    return base, {"layers": {k: v for k, v in layers.items() if is_adapter(k)}}


def join_adapters(base: dict, adapters: dict) -> dict:
    """The inverse of `split_adapters`: one pure param dict of the adapted model."""
    return {**base, "layers": {**base["layers"], **adapters["layers"]}}


def merged_weights(base: dict, adapters: dict, scale: float) -> dict:
    """Base params with each adapted projection W replaced by W + scale * A B (in W's dtype): the
    adapted model as a plain one, for export.

    From an int8 base (`quant.quantize_base`, `load_in_8bit`) every projection is dequantized
    (Q * scale in float32), the update added there, and the sum rounded once to the base's float
    dtype (its embedding's); the scales are dropped, so the result is a plain tree for a `Decoder`
    built without `quantize_base`. It is the model the adapters were trained with (the dequantized
    base), not the original weights on disk: re-quantizing after the merge would lose most of the
    update (it is far smaller than one int8 step). The PEFT adapter folder, like bitsandbytes QLoRA
    adapters, is meant for the original base. The export computes the same one layer at a time
    (`merged_layer`): this whole-tree form is the definition it is tested against."""
    layers = {k: v for k, v in base["layers"].items() if not k.endswith(quant.SCALE)}
    quantized = [k[:-len(quant.SCALE)] for k in base["layers"] if k.endswith(quant.SCALE)]
    dtypes = {name: layers[name].dtype for name in layers}
    for name in quantized:  # float32 until the update is added, then the base's dtype
        layers[name] = quant.dequantize(layers[name], base["layers"][name + quant.SCALE], PROJECTIONS[name].n_in)
        dtypes[name] = base["embed"].dtype
    for key in adapters["layers"]:
        if key.endswith("_lora_a"):
            name = key[:-len("_lora_a")]
            delta = delta_weight(adapters["layers"][key], adapters["layers"][f"{name}_lora_b"], scale)
            layers[name] = layers[name].astype(delta.dtype) + delta
    return {**base, "layers": {k: v.astype(dtypes[k]) for k, v in layers.items()}}


def merged_layer(base: dict, adapters: dict, scale: float, name: str, i: int):
    """Layer i of projection `name` of `merged_weights(base, adapters, scale)`, bit for bit, computed
    alone (the same operations on one layer), so that an export merges while it writes and holds one
    layer's update at a time, not the whole merged model; None when `name` has no adapters."""
    if f"{name}_lora_a" not in adapters["layers"]:
        return None
    weight, q_scale = base["layers"][name][i], base["layers"].get(name + quant.SCALE)
    dtype = weight.dtype if q_scale is None else base["embed"].dtype
    if q_scale is not None:
        weight = quant.dequantize(weight, q_scale[i], PROJECTIONS[name].n_in, lead=0)
    a, b = (adapters["layers"][f"{name}_lora_{ab}"][i:i + 1] for ab in "ab")
    delta = delta_weight(a, b, scale)[0]
    return (weight.astype(delta.dtype) + delta).astype(dtype)


def by_projection(adapters: dict) -> dict:
    """{"layers": {"<projection>_lora_a": A, ...}} -> {<projection>: {"a": A, "b": B}, ...} (host arrays)."""
    out = {}
    for key, value in adapters["layers"].items():
        name, ab = key.rsplit("_lora_", 1)
        out.setdefault(name, {})[ab] = np.asarray(value)
    return out


# ----------------------------------------------------------------------------------- PEFT files


def peft_tensors(adapters: dict, targets):
    """Yield (PEFT tensor name, float32 array) per layer: lora_A.weight [r, in], lora_B.weight [out, r],
    as torch.nn.Linear stores them. `adapters`: {projection: {"a": [L, in..., r], "b": [L, r, out...]}}
    of host arrays."""
    for name in targets:
        module = PROJECTIONS[name].module
        a, b = np.asarray(adapters[name]["a"], np.float32), np.asarray(adapters[name]["b"], np.float32)
        for i in range(a.shape[0]):
            prefix = f"base_model.model.model.layers.{i}.{module}"
            yield f"{prefix}.lora_A.weight", np.ascontiguousarray(a[i].reshape(-1, a.shape[-1]).T)
            yield f"{prefix}.lora_B.weight", np.ascontiguousarray(b[i].reshape(b.shape[1], -1).T)


def adapter_config(*, rank: int, alpha: float, dropout: float, targets, base_model: str) -> dict:
    """adapter_config.json as PEFT writes it for a causal LM."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
            "lora_dropout": dropout, "target_modules": sorted(PROJECTIONS[t].peft for t in targets),
            "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False,
            "use_dora": False, "modules_to_save": None, "base_model_name_or_path": base_model,
            "inference_mode": True}


def save_peft(adapters: dict, path: str, *, rank: int, alpha: float, dropout: float, targets,
              base_model: str) -> None:
    """A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) that
    `peft.PeftModel.from_pretrained(base, path)` loads onto the base model in transformers."""
    os.makedirs(path, exist_ok=True)
    blob = save(dict(peft_tensors(adapters, targets)), metadata={"format": "pt"})
    atomic_write(os.path.join(path, "adapter_model.safetensors"), lambda f: f.write(blob))
    atomic_write_json(os.path.join(path, "adapter_config.json"),
                      adapter_config(rank=rank, alpha=alpha, dropout=dropout, targets=targets,
                                     base_model=base_model), indent=2)


def init_adapters(layer_shapes: dict, num_layers: int, targets, rank: int, key) -> dict:
    """Fresh adapters {projection: {"a", "b"}} (B = 0: the adapted model starts as the base)."""
    out = {}
    for i, name in enumerate(targets):
        (a_shape, _), (b_shape, _) = adapter_shapes(name, layer_shapes[name], (None,) * len(layer_shapes[name]), rank)
        out[name] = {"a": init_a(jax.random.fold_in(key, i), (num_layers, *a_shape), jnp.float32),
                     "b": jnp.zeros((num_layers, *b_shape), jnp.float32)}
    return out


def load_peft(path: str, num_layers: int, layer_shapes: dict, targets, rank: int) -> dict:
    """Adapters {projection: {"a", "b"}} in our layout from a PEFT folder (adapter_config.json +
    adapter_model.safetensors), to start a run from: its rank, target modules and every tensor's
    shape must be the run's, and every value finite. Any fault is a ConfigError naming lora_adapter."""
    try:
        with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as f:
            config = json.load(f)
        if not isinstance(config, dict):
            raise ValueError("adapter_config.json is not a JSON object")
        tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    except (OSError, ValueError, SafetensorError) as err:  # missing, truncated or garbled files
        raise ConfigError(f"lora_adapter: cannot read the PEFT adapter in {path} ({first_line(err)[:200]})") from None
    try:
        theirs = set(resolve_targets(config.get("target_modules")))
    except ConfigError:
        theirs = None
    if str(config.get("r")) != str(rank) or theirs != set(targets):
        raise ConfigError(f"lora_adapter: {path} has r={config.get('r')} on {config.get('target_modules')}; this run "
                         f"has lora_r={rank} on {[PROJECTIONS[t].peft for t in targets]}")
    adapters = {}
    for name in targets:
        module, n_in = PROJECTIONS[name].module, PROJECTIONS[name].n_in
        shape = layer_shapes[name]
        want = {"A": (rank, math.prod(shape[:n_in])), "B": (math.prod(shape[n_in:]), rank)}
        a, b = [], []
        for i in range(num_layers):
            found = {}
            for ab in "AB":
                key = next((k for k in tensors if k.endswith(f"layers.{i}.{module}.lora_{ab}.weight")), None)
                why = _tensor_problem(tensors.get(key), want[ab])
                if why:
                    raise ConfigError(f"lora_adapter: {path}: layers.{i}.{module}.lora_{ab}.weight {why}")
                found[ab] = tensors[key]
            a.append(found["A"].T.reshape(*shape[:n_in], -1))
            b.append(found["B"].T.reshape(-1, *shape[n_in:]))
        adapters[name] = {"a": np.stack(a).astype(np.float32), "b": np.stack(b).astype(np.float32)}
    return adapters


def _tensor_problem(tensor, shape) -> str | None:
    """Why an adapter tensor cannot be this model's (None: it can)."""
    if tensor is None:
        return "is missing"
    if tensor.shape != shape:
        return f"has shape {tensor.shape}, this model needs {shape} (an adapter of another base model?)"
    return None if np.isfinite(tensor).all() else "holds NaN or inf"
