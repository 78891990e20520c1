"""Test setup: 8 simulated CPU devices, float32 matmuls, deterministic hypothesis profile."""
import os

# Must be set before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", max_examples=60, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("ci")


@pytest.fixture(scope="session")
def real(request):
    """The real models (SmolLM2-135M-Instruct, Gemma 3 270M) from their GGUF files, each read by us and
    by transformers at most once per test run (test_gguf_io, test_real_models)."""
    from gguf_models import Loaded, gemma3_path, smollm2_path

    return {"smollm2": Loaded(smollm2_path()), "gemma3": Loaded(gemma3_path(request.config.cache.mkdir("gguf")))}
