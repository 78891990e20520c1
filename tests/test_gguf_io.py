"""gguf_io against transformers' own GGUF loader: two real files (SmolLM2-135M-Instruct Q4_1, Gemma 3 270M
Q4_K_M) and tiny ones written here (qwen2, qwen3, a sentencepiece llama), then the errors. Config fields,
every tensor bit for bit, and token ids must match; transformers loads each real file once per session."""
import math
import os
import sys

import gguf
import numpy as np
import pytest
from gguf_models import Loaded

from bco_jax.errors import ConfigError
from bco_jax.models.gguf_io import GGUFCheckpoint, _unpermute_rope

REAL = ("smollm2", "gemma3")
COMMON_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                 "rope_parameters", "tie_word_embeddings", "attention_bias", "bos_token_id", "eos_token_id",
                 "pad_token_id")
FAMILY_FIELDS = {"llama": ("hidden_act",), "qwen2": ("hidden_act",), "qwen3": ("hidden_act",),
                 "gemma3_text": ("hidden_activation", "query_pre_attn_scalar", "sliding_window", "layer_types",
                                 "final_logit_softcapping", "attn_logit_softcapping")}
NOT_IN_HF_CONFIG = {"qwen2": ("head_dim", "attention_bias")}  # Qwen2Config has neither (q/k/v always biased)
# google/gemma-3-270m's published config.json (rope_local_base_freq is the sliding layers' theta).
GEMMA3_270M = {"hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4,
               "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 512,
               "rms_norm_eps": 1e-06, "vocab_size": 262144, "max_position_embeddings": 32768,
               "tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh", "final_logit_softcapping": None,
               "attn_logit_softcapping": None, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
TEXTS = ["Hello world", "12345 and 2024-12-03: 3.14159", "double  spaces   here", "lines\nand\n\nmore\n",
         " leading space", "naïve café, Zürich — 東京 and Москва", "emoji 🙂👍🏽 done", "tabs\tand\ttrailing  "]
CHATS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
    [{"role": "user", "content": "Übersetze: «good morning» 🙂"}],
    [{"role": "user", "content": "code:\n```py\nprint( 1 )\n```\n\n  indented"}],
]


def assert_same(ours, theirs, where=""):
    """Equal, floats to float32 precision (ours are the shortest decimal of the file's float32)."""
    if isinstance(theirs, dict):
        assert set(ours) == set(theirs), where
        for key in theirs:
            assert_same(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(theirs, float):
        assert math.isclose(ours, theirs, rel_tol=1e-6), (where, ours, theirs)
    else:
        assert ours == theirs, (where, ours, theirs)


def assert_config_matches_transformers(loaded):
    ours, theirs = loaded.ours.hf_config(), loaded.hf_config
    family = ours["model_type"]
    for field in set(COMMON_FIELDS + FAMILY_FIELDS[family]) - set(NOT_IN_HF_CONFIG.get(family, ())):
        assert_same(ours.get(field), theirs[field], field)  # an id the file lacks is absent, theirs None


def assert_tensors_match_transformers(loaded):
    ours, theirs = loaded.ours, loaded.hf_state
    tied = ours.hf_config()["tie_word_embeddings"]
    assert set(ours.names()) == set(theirs) - ({"lm_head.weight"} if tied else set())
    for name in ours.names():
        w = ours.tensor(name)
        assert w.dtype == np.float32 and w.flags.writeable and ours.shape(name) == w.shape, name
        np.testing.assert_array_equal(w, theirs[name], err_msg=name)


def assert_tokenizer_matches_transformers(loaded, texts, chats=()):
    ours, theirs = loaded.tokenizer, loaded.hf_tokenizer
    for text in texts:
        ids = ours(text)["input_ids"]
        assert ids == theirs(text)["input_ids"], text
        assert ours.decode(ids) == theirs.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True), text
    for chat in chats:
        ids = ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)["input_ids"]
        assert ids == theirs.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)["input_ids"], chat
        assert ours.decode(ids) == theirs.decode(ids)


# ------------------------------------------------------------------------------------------------ real files


def test_header_reader_agrees_with_gguf_reader(real):
    # Ours parses the header itself (gguf.GGUFReader takes 10 s on Gemma's vocabulary); same values, same tensors.
    ours = real["smollm2"].ours
    reader = gguf.GGUFReader(ours.path)
    assert ours.metadata == {key: field.contents() for key, field in reader.fields.items() if key[:5] != "GGUF."}
    assert {t.gguf_name: (t.type_name, t.dims, t.offset) for t in ours._tensors.values()} == {
        t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape), int(t.data_offset)) for t in reader.tensors}


@pytest.mark.parametrize("name", REAL)
def test_config_matches_transformers(real, name):
    assert_config_matches_transformers(real[name])


def test_config_is_the_published_one(real):
    gemma = real["gemma3"].ours.hf_config()
    assert {key: gemma[key] for key in GEMMA3_270M} == GEMMA3_270M
    assert gemma["rope_parameters"]["full_attention"]["rope_theta"] == 1000000.0
    assert gemma["rope_parameters"]["sliding_attention"]["rope_theta"] == 10000.0
    assert gemma["layer_types"] == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert gemma["architectures"] == ["Gemma3ForCausalLM"]
    smol = real["smollm2"].ours
    assert smol.hf_config()["rms_norm_eps"] == 1e-05  # stored as float32 9.99999975e-06
    assert smol.generation_config() == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


@pytest.mark.parametrize("name", REAL)
def test_every_tensor_matches_transformers(real, name):
    assert_tensors_match_transformers(real[name])


def test_gemma3_layer_names(real):
    ours = real["gemma3"].ours
    layer0 = {n.removeprefix("model.layers.0.") for n in ours.names() if n.startswith("model.layers.0.")}
    assert layer0 == {f"{m}.weight" for m in (
        "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm",
        "self_attn.q_norm", "self_attn.k_norm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
        "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert {n for n in ours.names() if not n.startswith("model.layers.")} == {"model.embed_tokens.weight",
                                                                              "model.norm.weight"}


def test_smollm2_tokenizer_matches_transformers(real):
    loaded = real["smollm2"]
    assert_tokenizer_matches_transformers(loaded, TEXTS, CHATS)
    assert loaded.tokenizer("<|im_start|>user")["input_ids"][0] == 1  # a chat marker is one id
    assert loaded.tokenizer.chat_template == loaded.ours.chat_template() is not None


def test_gemma3_tokenizer_matches_transformers(real):
    loaded = real["gemma3"]
    assert_tokenizer_matches_transformers(loaded, [*TEXTS, "<start_of_turn>user\nhi<end_of_turn>\n"])
    ids = loaded.tokenizer("<start_of_turn>user")["input_ids"]
    assert ids[0] == 2 and ids[1] == loaded.tokenizer.convert_tokens_to_ids("<start_of_turn>")  # BOS, one marker
    assert loaded.ours.chat_template() is None


# ------------------------------------------------------------------------------------------------ tiny files


def write_gguf(path, arch: str, values: dict, tensors: dict[str, np.ndarray]) -> str:
    """A GGUF file with metadata `values` ({key: value}, typed by Python type) and float32 `tensors`."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in values.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def byte_level_vocab() -> dict:
    """A byte-level BPE vocabulary: the 256 byte symbols, a few merges, three control tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "l l", "e ll", "ell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d", "1 2"]
    words = [m.replace(" ", "") for m in merges]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *symbols, *words]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.token_type": [3, 3, 3] + [1] * (len(tokens) - 3), "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.padding_token_id": 0}


def sentencepiece_vocab() -> dict:
    """A sentencepiece (BPE, byte fallback) vocabulary with scores and no merges, as llama files have."""
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "▁he", "llo", "▁hello", "▁w", "or", "▁wor", "ld"]
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *pieces]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0}


def tiny_model(folder, arch: str, vocab: dict, hidden=64, heads=4, kv_heads=2, head_dim=16, mlp=96, **extra) -> str:
    """A one-layer model of `arch` with random float32 weights (q/k/v biases for qwen2, q/k norms for qwen3)."""
    rng = np.random.default_rng(0)
    n_vocab = len(vocab["tokenizer.ggml.tokens"])
    q, kv = heads * head_dim, kv_heads * head_dim
    shapes = {"token_embd.weight": (n_vocab, hidden), "output.weight": (n_vocab, hidden),
              "output_norm.weight": (hidden,), "blk.0.attn_norm.weight": (hidden,), "blk.0.ffn_norm.weight": (hidden,),
              "blk.0.attn_q.weight": (q, hidden), "blk.0.attn_k.weight": (kv, hidden),
              "blk.0.attn_v.weight": (kv, hidden), "blk.0.attn_output.weight": (hidden, q),
              "blk.0.ffn_gate.weight": (mlp, hidden), "blk.0.ffn_up.weight": (mlp, hidden),
              "blk.0.ffn_down.weight": (hidden, mlp)}
    if arch == "qwen2":
        shapes |= {f"blk.0.attn_{x}.bias": (n * head_dim,) for x, n in (("q", heads), ("k", kv_heads), ("v", kv_heads))}
    if arch == "qwen3":
        shapes |= {"blk.0.attn_q_norm.weight": (head_dim,), "blk.0.attn_k_norm.weight": (head_dim,)}
    values = {f"{arch}.{key}": value for key, value in {
        "block_count": 1, "context_length": 128, "embedding_length": hidden, "feed_forward_length": mlp,
        "attention.head_count": heads, "attention.head_count_kv": kv_heads, "attention.key_length": head_dim,
        "attention.layer_norm_rms_epsilon": 1e-6, "rope.freq_base": 10000.0, "rope.dimension_count": head_dim,
        **extra}.items()}
    tensors = {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}
    return write_gguf(os.path.join(folder, f"tiny-{arch}.gguf"), arch, values | vocab, tensors)


@pytest.mark.parametrize(("arch", "vocab", "sizes"), [
    ("qwen2", byte_level_vocab() | {"tokenizer.ggml.pre": "qwen2"}, {}),
    ("qwen3", byte_level_vocab() | {"tokenizer.ggml.pre": "qwen2"}, {"head_dim": 128}),  # != hidden / heads
    ("llama", sentencepiece_vocab(), {}),
])
def test_tiny_files_match_transformers(tmp_path, arch, vocab, sizes):
    loaded = Loaded(tiny_model(tmp_path, arch, vocab, **sizes))
    assert_config_matches_transformers(loaded)
    assert_tensors_match_transformers(loaded)
    assert_tokenizer_matches_transformers(loaded, ["hello world", " hello  world\n", "the 12 he<|im_end|>llo", "é€"])
    config = loaded.ours.hf_config()
    assert config["architectures"] == [{"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                                        "llama": "LlamaForCausalLM"}[arch]]
    assert config["attention_bias"] == (arch == "qwen2") and config["tie_word_embeddings"] is False


def test_rope_scaling_is_read(tmp_path):
    path = tiny_model(tmp_path, "llama", sentencepiece_vocab(), **{"rope.scaling.type": "linear",
                                                                   "rope.scaling.factor": 8.0})
    assert GGUFCheckpoint(path).hf_config()["rope_parameters"] == {"rope_type": "linear", "rope_theta": 10000.0,
                                                                   "factor": 8.0}


def test_unpermute_undoes_llama_cpp_permute():
    # llama.cpp's permute (convert_hf_to_gguf.py): each head's rows [first half; second half] become interleaved.
    w_RxC = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)
    permuted = w_RxC.reshape(2, 2, 4, 3).swapaxes(1, 2).reshape(16, 3)
    np.testing.assert_array_equal(_unpermute_rope(permuted, heads=2), w_RxC)
    np.testing.assert_array_equal(_unpermute_rope(permuted[:, 0], heads=2), w_RxC[:, 0])  # a bias


# ------------------------------------------------------------------------------------------------ errors


def one_line_error(path, match: str, call=GGUFCheckpoint) -> str:
    with pytest.raises(ConfigError, match=match) as error:
        call(str(path))
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    return message


def test_unknown_architecture(tmp_path):
    path = write_gguf(tmp_path / "mamba.gguf", "mamba", {}, {"token_embd.weight": np.ones((4, 8), np.float32)})
    one_line_error(path, "architecture 'mamba' is not supported")


def test_unknown_tensor_type_and_name(tmp_path):
    path = write_gguf(tmp_path / "ints.gguf", "llama", {}, {"token_embd.weight": np.ones((4, 8), np.int32)})
    one_line_error(path, "token_embd.weight has type I32")
    path = write_gguf(tmp_path / "odd.gguf", "llama", {}, {"blk.0.attn_qkv.weight": np.ones((4, 8), np.float32)})
    one_line_error(path, "'blk.0.attn_qkv.weight' has no known HF name")


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 not a gguf at all, just some bytes")
    one_line_error(tmp_path / "x.gguf", "is not a GGUF file")


def test_unknown_tokenizer_model(tmp_path):
    path = tiny_model(tmp_path, "llama", sentencepiece_vocab() | {"tokenizer.ggml.model": "bert"})
    one_line_error(path, "tokenizer model 'bert' is not supported", lambda p: GGUFCheckpoint(p).tokenizer())


def test_missing_gguf_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    message = one_line_error(tmp_path / "m.gguf", "needs the gguf package")
    assert message.endswith("pip install gguf")
