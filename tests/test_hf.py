"""Checkpoint import / export: round trips through transformers, sharded files, clear errors."""
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import tiny_hf
import torch
import transformers
from flax import nnx

from bco_jax.models import Decoder, ModelConfig, load_hf, read_config, save_hf
from bco_jax.models import safetensors_io as st
from bco_jax.models.config import config_to_hf


@pytest.fixture(scope="module", params=["llama3", "qwen2", "gemma3"])
def source(request, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp(request.param))
    torch_model = tiny_hf.build(request.param, folder)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [1, 2], "bos_token_id": 0, "max_length": 64}, f)
    tiny_tokenizer().save_pretrained(folder)
    return folder, torch_model


def tiny_tokenizer():
    import tokenizers
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 128)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                                bos_token="<s>", eos_token="</s>")


def max_diff(model, torch_model, ids, mask):
    expected = tiny_hf.torch_logits(torch_model, ids, mask)
    return np.abs(np.asarray(model(ids, mask)) - expected)[mask.astype(bool)].max()


def test_export_round_trip_through_transformers(source, tmp_path):
    folder, torch_model = source
    model = load_hf(folder)
    save_hf(model, str(tmp_path), tokenizer=folder)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32,
                                                                 attn_implementation="eager").eval()
    ids, mask = tiny_hf.padded_batch(seed=4)
    ours = np.asarray(model(ids, mask))
    theirs = tiny_hf.torch_logits(reloaded, ids, mask)
    assert np.abs(ours - theirs)[mask.astype(bool)].max() < 1e-4
    # same tensors bit for bit, generation config carried over
    for name, p in torch_model.state_dict().items():
        np.testing.assert_array_equal(reloaded.state_dict()[name].numpy(), p.numpy(), err_msg=name)
    with open(tmp_path / "generation_config.json") as f:
        assert json.load(f)["eos_token_id"] == [1, 2]
    assert load_hf(str(tmp_path)).config.eos_token_ids == (1, 2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == open(os.path.join(folder, name), "rb").read()
    copied = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    assert copied("w5 w7")["input_ids"][-2:] == [5, 7]


def test_loads_transformers_sharded_checkpoint(source, tmp_path):
    folder, torch_model = source
    torch_model.save_pretrained(str(tmp_path), max_shard_size="20KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    ids, mask = tiny_hf.padded_batch(seed=5)
    assert max_diff(load_hf(str(tmp_path)), torch_model, ids, mask) < 1e-4


def test_writes_sharded_checkpoint_transformers_loads(source, tmp_path):
    folder, torch_model = source
    save_hf(load_hf(folder), str(tmp_path), max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not os.path.exists(tmp_path / "model.safetensors")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    for name, p in torch_model.state_dict().items():
        np.testing.assert_array_equal(reloaded.state_dict()[name].numpy(), p.numpy(), err_msg=name)
    # and back again through our own loader
    ids, mask = tiny_hf.padded_batch(seed=6)
    assert max_diff(load_hf(str(tmp_path)), torch_model, ids, mask) < 1e-4


def test_bfloat16_checkpoint_loads(source, tmp_path):
    folder, torch_model = source
    torch_model.to(torch.bfloat16).save_pretrained(str(tmp_path))
    torch_model.to(torch.float32)
    model = load_hf(str(tmp_path))
    expected = torch_model.model.embed_tokens.weight.detach().to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.asarray(model.embed[...]), expected)
    frozen = load_hf(str(tmp_path), param_dtype=jnp.bfloat16)  # inference / frozen reference option
    assert frozen.embed[...].dtype == jnp.bfloat16 and frozen.dtype == jnp.float32
    ids, mask = tiny_hf.padded_batch(seed=12)
    np.testing.assert_allclose(np.asarray(frozen(ids, mask)), np.asarray(model(ids, mask)), atol=1e-5)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("llama_err"))
    tiny_hf.build("llama3", folder)
    return folder


def copy_of(folder, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(folder, target)
    return target


def test_pickle_checkpoint_is_refused_unopened(tmp_path, llama_folder):
    target = copy_of(llama_folder, tmp_path)
    os.remove(target / "model.safetensors")
    # not even a valid pickle: if it were opened, the error would be a different one
    (target / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="pickle.*refusing to unpickle"):
        load_hf(str(target))


def test_missing_tensor_is_named(tmp_path, llama_folder):
    target = copy_of(llama_folder, tmp_path)
    f = st.SafetensorsFile(str(target / "model.safetensors"))
    tensors = {n: np.array(f.tensor(n)) for n in f.names() if n != "model.layers.1.mlp.up_proj.weight"}
    del f
    st.write_file(str(target / "model.safetensors"), tensors)
    with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
        load_hf(str(target))


def test_shape_mismatch_is_named(tmp_path, llama_folder):
    target = copy_of(llama_folder, tmp_path)
    tiny_hf.rewrite_config(str(target), lambda c: {**c, "intermediate_size": 80})
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight.* has shape .*96.*, expected .*80"):
        load_hf(str(target))


@pytest.mark.parametrize("change, key", [
    ({"architectures": ["GPT2LMHeadModel"]}, "architectures"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope_parameters.rope_type"),
])
def test_unsupported_config_names_the_key(llama_folder, change, key):
    hf = json.loads(read_config(llama_folder).hf_config_json)
    with pytest.raises(ValueError, match=key):
        read_config({**hf, **change})


@pytest.mark.parametrize("config_cls", [transformers.Qwen2Config, transformers.Qwen3Config])
@pytest.mark.parametrize("use_sliding_window", [True, False])
def test_qwen_sliding_layers_are_those_transformers_slides(config_cls, use_sliding_window):
    """Qwen2/3 slide the layers from max_window_layers on, and only with use_sliding_window."""
    hf = config_cls(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=4, num_attention_heads=2,
                    num_key_value_heads=2,
                    use_sliding_window=use_sliding_window, sliding_window=4, max_window_layers=1).to_dict()
    hf.pop("layer_types")  # as the Hub's 4.x configs
    expected = tuple(t == "sliding_attention" for t in config_cls(**hf).layer_types)
    assert read_config(hf).sliding_layers() == expected == ((False, True, True, True) if use_sliding_window
                                                            else (False,) * 4)


def test_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf(str(tmp_path))


@pytest.mark.parametrize("fields", [
    dict(rope_type="llama3", rope_factor=8.0, rope_original_max_positions=16, rope_theta=5e5, eos_token_ids=(1, 2)),
    dict(architecture="MistralForCausalLM", sliding_window=4),
    dict(architecture="Qwen2ForCausalLM", qkv_bias=True, tie_word_embeddings=True),
])
def test_model_without_source_config_saves_what_transformers_loads(fields, tmp_path):
    """A Decoder built from a bare ModelConfig (no config.json behind it) writes one field by field."""
    cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, **fields)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    save_hf(model, str(tmp_path))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32,
                                                                 attn_implementation="eager").eval()
    assert type(reloaded).__name__ == cfg.architecture
    ids, mask = tiny_hf.padded_batch(seed=13, side="right")
    assert max_diff(model, reloaded, ids, mask) < 1e-4


def test_config_without_a_config_json_form_is_refused():
    cfg = ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                      num_kv_heads=2, head_dim=4, architecture="MistralForCausalLM", qkv_bias=True)
    with pytest.raises(ValueError, match=r"\['qkv_bias'\] have no MistralForCausalLM config.json form"):
        config_to_hf(cfg, "float32")
