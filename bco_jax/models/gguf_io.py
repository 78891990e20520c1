"""GGUF files, as llama.cpp writes them, read as a Hugging Face checkpoint.

A .gguf holds a model's config (as metadata), its tensors (quantized, renamed, some re-laid-out for llama.cpp)
and its tokenizer (vocabulary, merges, special ids). `GGUFCheckpoint` hands them back as an HF repo would: a
config.json dict, HF-named float32 tensors in HF layout (each dequantized on demand, never the whole model at
once), and a `PreTrainedTokenizerFast`. The conventions undone here are llama.cpp's (convert_hf_to_gguf.py);
transformers' GGUF loader is the reference the tests compare against. Neither torch nor transformers' GGUF
code is imported: the `gguf` package dequantizes, the `tokenizers` library tokenizes.
"""
from __future__ import annotations

import functools
import os
import re
import struct
from operator import itemgetter
from typing import NamedTuple

import numpy as np

from bco_jax.errors import ConfigError
from bco_jax.models.projections import ATTENTION, K_PROJ, MLP, NORMS, Q_PROJ


class Family(NamedTuple):
    """What a GGUF `general.architecture` is in HF terms, and which llama.cpp conventions to undo."""
    hf_class: str
    model_type: str
    sandwich_norms: bool = False  # four norms a layer, Gemma-named (projections.NORMS says which)
    rope_permuted: bool = False  # llama.cpp interleaves each q/k head's rotary halves (its llama arch only)
    norms_plus_one: bool = False  # Gemma scales by (1 + w); llama.cpp stores the norm weights with the 1 added


FAMILIES = {  # Mistral files say "llama"
    "llama": Family("LlamaForCausalLM", "llama", rope_permuted=True),
    "qwen2": Family("Qwen2ForCausalLM", "qwen2"),
    "qwen3": Family("Qwen3ForCausalLM", "qwen3"),
    "gemma3": Family("Gemma3ForCausalLM", "gemma3_text", sandwich_norms=True, norms_plus_one=True),
}

# Block types `gguf.quants.dequantize` handles exactly; anything else (IQ*, TQ*, integer tensors) is refused.
TENSOR_TYPES = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}

# GGUF name -> HF name outside the layers; inside, `blk.{i}.<leaf>` -> `model.layers.{i}.<module>` (layer_names).
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def layer_names(family: Family) -> dict[str, str]:
    """GGUF leaf -> HF module under model.layers.{i}, from the projection and norm tables."""
    names = {p.gguf: p.module for p in ATTENTION + MLP}
    for norm in NORMS:
        if family.sandwich_norms:
            names[norm.gguf] = norm.sandwich_module or norm.module
        elif norm.flag != "sandwich_norms":
            names[norm.gguf] = norm.module
    return names


# The GPT-2 pre-tokenizer regex, and the regexes llama.cpp applies in turn for each `tokenizer.ggml.pre`.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_BYTE_LEVEL_SPLITS = {
    "smollm": [r"\p{N}", _GPT2_SPLIT],  # every digit its own piece, as SmolLM's tokenizer.json does
    "llama-bpe": [_LLAMA3_SPLIT],
    "llama3": [_LLAMA3_SPLIT],
    "qwen2": [_QWEN2_SPLIT],
    "deepseek-r1-qwen": [_QWEN2_SPLIT],
}
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values
_SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                   "pad_token": "padding_token_id"}  # -> tokenizer.ggml.<key>

# GGUF metadata value types: numbers by numpy dtype; 8 is a string, 9 an array.
_NUMBERS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
            12: "<f8"}
_STRING, _ARRAY = 8, 9


class _Tensor(NamedTuple):
    gguf_name: str
    type_name: str  # ggml block type, e.g. "Q4_K"
    dims: tuple[int, ...]  # ggml order: fastest-varying first, the reverse of numpy's
    offset: int  # bytes from the start of the file


def open_checkpoint(path) -> GGUFCheckpoint:
    """The file's `GGUFCheckpoint`, parsed once while the file is unchanged (a load reads the header for
    its config, its tensor names, its tensors and its tokenizer)."""
    stat = os.stat(path)
    return _opened(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _opened(path: str, mtime_ns: int, size: int) -> GGUFCheckpoint:
    return GGUFCheckpoint(path)


def import_gguf(path) -> object:
    """The `gguf` package, or a one-line error that says how to get it."""
    try:
        import gguf
    except ImportError:
        raise ConfigError(f"reading {path} needs the gguf package: pip install gguf") from None
    return gguf


class GGUFCheckpoint:
    """One .gguf file read as an HF checkpoint."""

    def __init__(self, path: str):
        self.path = str(path)
        self._gguf = import_gguf(self.path)
        try:  # memory-mapped: tensors stay on disk until `tensor` asks for one
            self._file = np.memmap(self.path, mode="r")
        except ValueError:  # an empty file
            raise ConfigError(f"{self.path} is not a GGUF file (it is empty)") from None
        type_names = {t.value: t.name for t in self._gguf.GGMLQuantizationType}
        self.metadata, tensors = _read_header(self._file, self.path, type_names)
        self.architecture = self.metadata.get("general.architecture")
        if self.architecture not in FAMILIES:
            raise ConfigError(f"{self.path}: GGUF architecture {self.architecture!r} is not supported "
                              f"(supported: {', '.join(FAMILIES)})")
        self.family = FAMILIES[self.architecture]
        self._layer_names = layer_names(self.family)
        self._tensors = {self._hf_name(t): t for t in tensors}

    def _hf_name(self, tensor: _Tensor) -> str:
        if tensor.type_name not in TENSOR_TYPES:
            raise ConfigError(f"{self.path}: tensor {tensor.gguf_name} has type {tensor.type_name}, which is not "
                              f"supported (supported: {', '.join(sorted(TENSOR_TYPES))})")
        stem, _, kind = tensor.gguf_name.rpartition(".")
        layer = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
        if layer and layer[2] in self._layer_names and kind in ("weight", "bias"):
            return f"model.layers.{layer[1]}.{self._layer_names[layer[2]]}.{kind}"
        if stem in _GLOBAL_NAMES and kind in ("weight", "bias"):
            return f"{_GLOBAL_NAMES[stem]}.{kind}"
        raise ConfigError(f"{self.path}: tensor {tensor.gguf_name!r} has no known HF name in a GGUF "
                          f"{self.architecture!r} file")

    def _arch(self, key: str, default=None):
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def hf_config(self) -> dict:
        """A config.json dict transformers accepts. Float metadata is float32 in the file: it comes back as the
        shortest decimal that rounds to it (1e-06, not 9.99999997e-07), i.e. the value the HF config had."""
        heads, hidden = self._arch("attention.head_count"), self._arch("embedding_length")
        config = {
            "architectures": [self.family.hf_class],
            "model_type": self.family.model_type,
            "vocab_size": self._vocab_size(),
            "hidden_size": hidden,
            "intermediate_size": self._arch("feed_forward_length"),
            "num_hidden_layers": self._arch("block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": self._arch("attention.head_count_kv", heads),
            "head_dim": self._arch("attention.key_length", hidden // heads),
            "rms_norm_eps": _decimal(self._arch("attention.layer_norm_rms_epsilon")),
            "max_position_embeddings": self._arch("context_length"),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "attention_bias": f"model.layers.0.{Q_PROJ.module}.bias" in self._tensors,
            **self.generation_config(),
        }
        theta = _decimal(self._arch("rope.freq_base", 10000.0))  # llama.cpp's default when absent
        if self.architecture == "gemma3":
            return config | self._gemma3_config(theta)
        return config | {"hidden_act": "silu", "rope_parameters": self._rope(theta)}

    def _rope(self, theta: float) -> dict:
        kind = self._arch("rope.scaling.type", "none")
        if kind == "none":
            return {"rope_type": "default", "rope_theta": theta}
        rope = {"rope_type": kind, "rope_theta": theta, "factor": _decimal(self._arch("rope.scaling.factor"))}
        original = self._arch("rope.scaling.original_context_length")
        return rope if original is None else rope | {"original_max_position_embeddings": original}

    def _gemma3_config(self, theta: float) -> dict:
        # The file leaves these out; transformers' Gemma3TextConfig defaults fill them, as its GGUF loader does.
        layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                       for i in range(self._arch("block_count"))]
        return {
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": 256,
            "sliding_window": self._arch("attention.sliding_window"),
            "layer_types": layer_types,
            "rope_parameters": {"full_attention": self._rope(theta),
                                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
            "final_logit_softcapping": None,
            "attn_logit_softcapping": None,
        }

    def generation_config(self) -> dict:
        """The special token ids the file states, of bos_token_id, eos_token_id, pad_token_id."""
        ids = {f"{name}_id": self.metadata.get(f"tokenizer.ggml.{key}") for name, key in _SPECIAL_TOKENS.items()}
        return {name: ids[name] for name in ("bos_token_id", "eos_token_id", "pad_token_id") if ids[name] is not None}

    def _vocab_size(self) -> int:
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        return len(tokens) if tokens is not None else self.shape("model.embed_tokens.weight")[0]

    def names(self) -> list[str]:
        """HF tensor names, in file order."""
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        """HF shape ([out, in] for a linear weight), read from the header: nothing is dequantized."""
        return tuple(reversed(self._entry(name).dims))

    def tensor(self, name: str) -> np.ndarray:
        """One tensor as float32, in HF layout and with HF values, dequantized now (a fresh, writable array)."""
        entry = self._entry(name)
        w = self._dequantized(entry).reshape(self.shape(name))
        leaf = entry.gguf_name.rsplit(".", 2)[-2]
        if self.family.rope_permuted and leaf in (Q_PROJ.gguf, K_PROJ.gguf):
            heads = self._arch("attention.head_count")
            w = _unpermute_rope(w, heads if leaf == Q_PROJ.gguf else self._arch("attention.head_count_kv", heads))
        if self.family.norms_plus_one and leaf.endswith("norm"):
            w -= 1.0
        return w

    def _dequantized(self, entry: _Tensor) -> np.ndarray:
        """[rows, dims[0]] float32, a slab of rows at a time: the temporaries of gguf's numpy dequantization stay
        small next to the result (on a whole 262k-row embedding they peak at 2.5x its float32 size)."""
        qtype = self._gguf.GGMLQuantizationType[entry.type_name]
        block_size, block_bytes = self._gguf.GGML_QUANT_SIZES[qtype]
        cols, rows = entry.dims[0], int(np.prod(entry.dims[1:], dtype=np.int64))
        blocks = self._file[entry.offset:entry.offset + rows * (cols // block_size * block_bytes)].reshape(rows, -1)
        w_RxC = np.empty((rows, cols), np.float32)
        step = max(1, 2**22 // cols)  # 16 MiB of float32 a slab
        for start in range(0, rows, step):
            w_RxC[start:start + step] = self._gguf.quants.dequantize(blocks[start:start + step], qtype)
        return w_RxC

    def _entry(self, name: str) -> _Tensor:
        if name not in self._tensors:
            raise KeyError(f"{self.path} has no tensor {name!r}")
        return self._tensors[name]

    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")

    def tokenizer(self):
        """A `PreTrainedTokenizerFast` built from the file's vocabulary (a new one per call). Its post-processor
        adds BOS when the file says `add_bos_token` (sentencepiece files that say nothing get it, as in
        llama.cpp). Control tokens become special tokens and user-defined ones added tokens, so chat markers
        stay one id."""
        from transformers import PreTrainedTokenizerFast

        model = self.metadata.get("tokenizer.ggml.model")
        if model not in ("gpt2", "llama"):
            raise ConfigError(f"{self.path}: tokenizer model {model!r} is not supported (supported: gpt2, llama)")
        tokens = self.metadata["tokenizer.ggml.tokens"]
        backend, vocab = self._byte_level_bpe(tokens) if model == "gpt2" else self._sentencepiece_bpe(tokens)
        _add_marked_tokens(backend, tokens, self.metadata.get("tokenizer.ggml.token_type", []), vocab)
        ids = {name: self.metadata.get(f"tokenizer.ggml.{key}") for name, key in _SPECIAL_TOKENS.items()}
        return PreTrainedTokenizerFast(
            tokenizer_object=backend, chat_template=self.chat_template(),
            **{name: tokens[token_id] for name, token_id in ids.items() if token_id is not None},
            add_bos_token=bool(self.metadata.get("tokenizer.ggml.add_bos_token", model == "llama")),
            add_eos_token=bool(self.metadata.get("tokenizer.ggml.add_eos_token", False)),
        )

    def _byte_level_bpe(self, tokens: list[str]):
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

        spelling = _byte_spelling()
        alphabet = set(spelling.values())
        # A token written in plain UTF-8 rather than in the byte alphabet is respelled, as transformers does.
        vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i for i, t in enumerate(tokens)}
        merges = [tuple(merge.split(" ")) for merge in self.metadata.get("tokenizer.ggml.merges", [])]
        backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix=""))
        splits = _BYTE_LEVEL_SPLITS.get(self.metadata.get("tokenizer.ggml.pre"), [_GPT2_SPLIT])
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        backend.decoder = decoders.ByteLevel()
        return backend, vocab

    def _sentencepiece_bpe(self, tokens: list[str]):
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

        gemma = self.family.sandwich_norms
        if gemma:  # Gemma files store runs of spaces as spaces; its pieces spell them with U+2581
            tokens = ["\u2581" * len(t) if t and not t.strip(" ") else t for t in tokens]
        vocab = {token: i for i, token in enumerate(tokens)}
        # The file has no merges: rebuild them, best first. Gemma's scores do not follow its merge order, its
        # token order does (transformers' finding); other sentencepiece files rank by score.
        rank = vocab if gemma else {t: -s for t, s in zip(tokens, self.metadata["tokenizer.ggml.scores"])}
        unk_id = self.metadata.get("tokenizer.ggml.unknown_token_id")
        backend = Tokenizer(models.BPE(vocab=vocab, merges=_merges_from_vocab(vocab, rank), fuse_unk=True,
                                       unk_token=None if unk_id is None else tokens[unk_id], byte_fallback=True))
        decode = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        if gemma:  # no prefix space; every space becomes U+2581 before the model sees it
            backend.normalizer = normalizers.Replace(" ", "\u2581")
        else:
            prefix = bool(self.metadata.get("tokenizer.ggml.add_space_prefix", True))
            backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first" if prefix else "never", split=False)
            decode += [decoders.Strip(content=" ", left=1)] if prefix else []
        backend.decoder = decoders.Sequence(decode)
        return backend, vocab


def _read_header(file: np.ndarray, path: str, type_names: dict[int, str]) -> tuple[dict, list[_Tensor]]:
    """The metadata and tensor table of a GGUF file (v2/v3, little-endian). Written here rather than taken from
    gguf.GGUFReader, which makes a numpy view per array element: 10 s for Gemma 3's 262k-token vocabulary."""
    magic, version, n_tensors, n_values = struct.unpack_from("<4sIQQ", file, 0) if len(file) >= 24 else (b"", 0, 0, 0)
    if magic != b"GGUF" or version not in (2, 3):
        raise ConfigError(f"{path} is not a GGUF file this reader knows (v2 or v3, little-endian)")
    metadata, offset = {}, 24
    for _ in range(n_values):
        key, offset = _read_value(file, offset, _STRING)
        metadata[key], offset = _read_value(file, offset + 4, struct.unpack_from("<I", file, offset)[0])
    tables = []
    for _ in range(n_tensors):
        name, offset = _read_value(file, offset, _STRING)
        n_dims = struct.unpack_from("<I", file, offset)[0]
        dims = struct.unpack_from(f"<{n_dims}Q", file, offset + 4)
        ggml_type, data_offset = struct.unpack_from("<IQ", file, offset + 4 + 8 * n_dims)
        tables.append((name, ggml_type, dims, data_offset))
        offset += 4 + 8 * n_dims + 12
    alignment = metadata.get("general.alignment", 32)
    start = -(-offset // alignment) * alignment  # tensor data begins at the next aligned offset
    tensors = [_Tensor(name, type_names.get(ggml_type, f"type {ggml_type}"), dims, start + data_offset)
               for name, ggml_type, dims, data_offset in tables]
    return metadata, tensors


def _read_value(file: np.ndarray, offset: int, kind: int) -> tuple[object, int]:
    """One metadata value at `offset` and the offset after it."""
    if kind == _STRING:
        size = struct.unpack_from("<Q", file, offset)[0]
        return bytes(file[offset + 8:offset + 8 + size]).decode("utf-8"), offset + 8 + size
    if kind == _ARRAY:
        item_kind, count = struct.unpack_from("<IQ", file, offset)
        offset += 12
        if item_kind in _NUMBERS:  # one read for the whole array: vocabularies have 100k+ scores
            dtype = np.dtype(_NUMBERS[item_kind])
            return np.frombuffer(file, dtype, count, offset).tolist(), offset + count * dtype.itemsize
        values = []
        for _ in range(count):
            value, offset = _read_value(file, offset, item_kind)
            values.append(value)
        return values, offset
    dtype = np.dtype(_NUMBERS[kind])
    return np.frombuffer(file, dtype, 1, offset)[0].item(), offset + dtype.itemsize


def _decimal(value: float | None) -> float | None:
    """A float32 metadata value as the shortest decimal that rounds to it."""
    return None if value is None else float(str(np.float32(value)))


def _unpermute_rope(w_RxC: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: within each head it interleaves the rotary halves (pairs of rows), where
    HF keeps the head's first half of rows, then the second. For weights [rows, in] and biases [rows]."""
    rows = w_RxC.shape[0]
    w_HxDx2 = w_RxC.reshape(heads, rows // heads // 2, 2, *w_RxC.shape[1:])
    return w_HxDx2.swapaxes(1, 2).reshape(w_RxC.shape)


def _merges_from_vocab(vocab: dict[str, int], rank: dict[str, float]) -> list[tuple[str, str]]:
    """The BPE merges a vocabulary implies: every split of a token into two tokens, the best-ranked (lowest)
    token first and, within one token, the longer left piece first (the order transformers derives)."""
    pairs = []
    for token, token_rank in rank.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                pairs.append((token_rank, -cut, left, right))
    pairs.sort(key=itemgetter(0, 1))  # stable: ties keep vocabulary order
    return [(left, right) for _, _, left, right in pairs]


def _byte_spelling() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable bytes stand for themselves, the rest move to 256+."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(moved)}}


def _add_marked_tokens(backend, tokens: list[str], token_types: list[int], vocab: dict[str, int]) -> None:
    """Control tokens become special tokens and user-defined ones added tokens, so `<|im_start|>` or `<eos>` is
    matched whole before the model splits text. Skipped: a byte-level "control" token spelled outside the byte
    alphabet (a llama.cpp mislabel), and a user-defined one the vocabulary respelled (Gemma's space runs)."""
    from tokenizers import AddedToken

    kept = [(t, kind) for t, kind in zip(tokens, token_types) if kind in (_CONTROL, _USER_DEFINED) and t in vocab]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, k in kept if k == _CONTROL])
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t, k in kept if k == _USER_DEFINED])
