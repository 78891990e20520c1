"""The parameters of a decoder layer as two tables, projections and norms: every fact about them is
a field here.

Every family (Llama, Mistral, Qwen2, Qwen3, Gemma 3) has the same seven projections: attention q, k,
v, o and the gated MLP's gate, up, down. A row
says what our weight and its bias are called, the HF module it is (whose last name is PEFT's target
name), which logical axes the weight contracts and produces (its shape follows from the config,
through `AXIS_SIZES`), which `ModelConfig` field gives it a bias, and whether an int8 base stores it
quantized. decoder (the layer and its parameters), lora (targets, PEFT files), quant (what is int8)
and hf (the checkpoint's per-layer names) all read this table; no other module spells a projection.
The norms differ by family (Qwen3 and Gemma 3 normalise each query and key head; Gemma 3 also the
outputs of attention and MLP, and names its pre-MLP norm differently): `NORMS` says which a config
has and what HF calls them. Facts as data, as in `sharding.LOGICAL_RULES` and Tunix's key table.
"""
from __future__ import annotations

import dataclasses

# Logical axis -> the ModelConfig field that sizes it. "bias": a bias over the hidden size, kept
# apart from "embed" so that it is replicated (like norms) however the hidden size is sharded.
AXIS_SIZES = {"embed": "hidden_size", "q_heads": "num_heads", "kv_heads": "num_kv_heads", "head_dim": "head_dim",
              "mlp": "intermediate_size", "bias": "hidden_size"}


def sizes(cfg, axes: tuple[str, ...]) -> tuple[int, ...]:
    """The shape of logical `axes` under `cfg` (a ModelConfig)."""
    return tuple(getattr(cfg, AXIS_SIZES[axis]) for axis in axes)


@dataclasses.dataclass(frozen=True)
class Projection:
    """One projection. Our weight is [in..., out...] per layer (stacked: [layers, in..., out...]);
    HF stores `<module>.weight` as [out, in] with heads and head_dim flattened into one axis."""
    name: str  # our weight, a parameter of `decoder.Layers`
    bias: str  # our bias parameter, [out...], present when the config's `bias_flag` is set
    module: str  # the HF module under model.layers.{i}
    inputs: tuple[str, ...]  # logical axes the weight contracts
    outputs: tuple[str, ...]  # logical axes it produces
    bias_flag: str  # the ModelConfig field that puts a bias on it (see BIAS_FLAGS)
    quantize: bool = True  # stored int8 + per-channel scales under an int8 base (quant)
    gguf: str = ""  # its tensor in a GGUF file (blk.{i}.<gguf>.weight / .bias), as llama.cpp names it

    @property
    def peft(self) -> str:
        """PEFT's name for it (`target_modules`): the last name of the module path."""
        return self.module.rsplit(".", 1)[-1]

    @property
    def n_in(self) -> int:
        """How many leading axes of the per-layer weight are contracted (o_proj: heads and head_dim)."""
        return len(self.inputs)

    @property
    def axes(self) -> tuple[str, ...]:
        return self.inputs + self.outputs

    @property
    def bias_axes(self) -> tuple[str, ...]:
        return tuple("bias" if axis == "embed" else axis for axis in self.outputs)

    def shape(self, cfg) -> tuple[int, ...]:
        """Per-layer weight shape under `cfg` (a ModelConfig)."""
        return sizes(cfg, self.axes)

    def bias_shape(self, cfg) -> tuple[int, ...]:
        return sizes(cfg, self.bias_axes)

    def has_bias(self, cfg) -> bool:
        return bool(getattr(cfg, self.bias_flag))


# Projection(ours, bias, HF module, inputs, outputs, bias flag, GGUF name)
Q_PROJ = Projection("wq", "bq", "self_attn.q_proj", ("embed",), ("q_heads", "head_dim"), "qkv_bias", gguf="attn_q")
K_PROJ = Projection("wk", "bk", "self_attn.k_proj", ("embed",), ("kv_heads", "head_dim"), "qkv_bias", gguf="attn_k")
V_PROJ = Projection("wv", "bv", "self_attn.v_proj", ("embed",), ("kv_heads", "head_dim"), "qkv_bias", gguf="attn_v")
O_PROJ = Projection("wo", "bo", "self_attn.o_proj", ("q_heads", "head_dim"), ("embed",), "o_bias", gguf="attn_output")
GATE_PROJ = Projection("w_gate", "b_gate", "mlp.gate_proj", ("embed",), ("mlp",), "mlp_bias", gguf="ffn_gate")
UP_PROJ = Projection("w_up", "b_up", "mlp.up_proj", ("embed",), ("mlp",), "mlp_bias", gguf="ffn_up")
DOWN_PROJ = Projection("w_down", "b_down", "mlp.down_proj", ("mlp",), ("embed",), "mlp_bias", gguf="ffn_down")

ATTENTION = (Q_PROJ, K_PROJ, V_PROJ, O_PROJ)  # after the layer's first norm, in HF's module order
MLP = (GATE_PROJ, UP_PROJ, DOWN_PROJ)  # after its second norm
PROJECTIONS = {p.name: p for p in ATTENTION + MLP}  # our name -> row; its order is every loop's order

# ModelConfig bias field -> (families that always have these biases, the config.json key that turns
# them on, the families that read that key). Qwen2 always biases q, k, v; `attention_bias` biases q, k,
# v and o in Llama, Qwen3 and Gemma 3; Mistral has no biases.
ATTENTION_BIAS_FAMILIES = ("llama", "qwen3", "gemma3_text")
BIAS_FLAGS = {
    "qkv_bias": (("qwen2",), "attention_bias", ATTENTION_BIAS_FAMILIES),
    "o_bias": ((), "attention_bias", ATTENTION_BIAS_FAMILIES),
    "mlp_bias": ((), "mlp_bias", ("llama",)),
}


def bias_flags(family: str, hf: dict) -> dict[str, bool]:
    """The ModelConfig bias fields of a checkpoint of `family` ("llama", ...) with config.json `hf`."""
    return {flag: family in always or (bool(hf.get(key, False)) and family in readers)
            for flag, (always, key, readers) in BIAS_FLAGS.items()}



@dataclasses.dataclass(frozen=True)
class Norm:
    """One RMSNorm scale of a layer, [size] per layer (stacked: [layers, size])."""
    name: str  # our parameter of `decoder.Layers`
    module: str  # the HF module under model.layers.{i}
    size: str  # the ModelConfig field that sizes it
    block: str  # "attention" or "mlp": the block it belongs to (the block's input norm comes first in NORMS)
    flag: str | None = None  # the ModelConfig field that gives a layer this norm (None: every layer has it)
    sandwich_module: str | None = None  # its HF module in a `sandwich_norms` family (Gemma), if different
    gguf: str = ""  # its tensor in a GGUF file (blk.{i}.<gguf>.weight)

    axes = ("norm",)  # its logical axis: replicated, never decayed

    def shape(self, cfg) -> tuple[int, ...]:
        return (getattr(cfg, self.size),)

    def present(self, cfg) -> bool:
        return self.flag is None or bool(getattr(cfg, self.flag))

    def hf_module(self, cfg) -> str:
        return self.sandwich_module if cfg.sandwich_norms and self.sandwich_module else self.module


ATTN_NORM = Norm("attn_norm", "input_layernorm", "hidden_size", "attention", gguf="attn_norm")
Q_NORM = Norm("q_norm", "self_attn.q_norm", "head_dim", "attention", "qk_norm", gguf="attn_q_norm")  # before RoPE
K_NORM = Norm("k_norm", "self_attn.k_norm", "head_dim", "attention", "qk_norm", gguf="attn_k_norm")
ATTN_OUT_NORM = Norm("attn_out_norm", "post_attention_layernorm", "hidden_size", "attention", "sandwich_norms",
                     gguf="post_attention_norm")
MLP_NORM = Norm("mlp_norm", "post_attention_layernorm", "hidden_size", "mlp",
                sandwich_module="pre_feedforward_layernorm", gguf="ffn_norm")
MLP_OUT_NORM = Norm("mlp_out_norm", "post_feedforward_layernorm", "hidden_size", "mlp", "sandwich_norms",
                    gguf="post_ffw_norm")
NORMS = (ATTN_NORM, Q_NORM, K_NORM, ATTN_OUT_NORM, MLP_NORM, MLP_OUT_NORM)  # in the order a layer applies them


BLOCKS = (("attention", ATTENTION), ("mlp", MLP))  # a layer's blocks in order, with their projections


def layer_norms(cfg, block: str | None = None) -> tuple[Norm, ...]:
    """The norms a layer of `cfg` (a ModelConfig) has (in `block` only, if given); a block's input
    norm first."""
    return tuple(n for n in NORMS if n.present(cfg) and block in (None, n.block))
