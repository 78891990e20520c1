"""bco-jax: Binary Classifier Optimization (Jung et al., arXiv 2404.04656) in JAX/Flax.

Align language models from thumbs-up / thumbs-down feedback on single answers.
"""
import os

# transformers is used for tokenizers and configs only; its "PyTorch was not found" advice is noise here.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
