"""bco-jax: Binary Classifier Optimization (Jung et al., arXiv 2404.04656) in JAX/Flax.

Align language models from thumbs-up / thumbs-down feedback on single answers.
"""

__version__ = "0.1.0"
