"""Underlying distribution matching (UDM, Jung et al. 2024, section 4.3).

When thumbs-up and thumbs-down prompts come from different distributions, BCO weights each thumbs-down
example by the density ratio p_up(x) / p_down(x) of its prompt x, estimated with a logistic-regression
classifier on prompt embeddings (thumbs-up = class 1, thumbs-down = class 0). Thumbs-up weights are 1.

Why the logit is the log density ratio: the classifier is fit *class-balanced* (each class contributes
half of the loss whatever its size), so its Bayes-optimal logit is log(p_up(x) / p_down(x)) with equal
class priors. Without balancing it would carry an extra log(n_up / n_down) prior term. TRL 1.13.0 does
the same with sklearn's `LogisticRegression(class_weight="balanced")` and `p / (1 - p)`.

Differences from TRL, on purpose: features are standardised inside the classifier (hidden states have
wildly different scales per dimension, which makes L2 and the optimiser behave badly otherwise), the
L2 penalty is on the standardised weights, the fit is pure JAX (L-BFGS, deterministic), the sample of
prompts is drawn without replacement from a seed, and ratios are computed as exp(clipped logit)
instead of p / (1 - p + 1e-8) (no cancellation when p is near 1).

Parameters are a plain dict of arrays (a pytree), so they checkpoint with Orbax like any other state:
    {"weights": [D], "bias": [], "mean": [D], "std": [D]}   all float32.
"""
from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from bco_jax.errors import DataError

# Features whose spread is below this are constant in the sample: dividing by their std would only
# amplify float noise, so they are left unscaled (their weight is then driven to 0 by the L2 term).
_MIN_STD = 1e-6


def mean_pool(hidden_BxTxD: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    """Mean of `hidden_BxTxD` over the positions where `mask_BxT` is true, in float32: [B, D].

    For UDM the mask is the prompt tokens (`attention_mask & ~loss_mask`). Rows with an empty mask give 0.
    """
    mask_BxTx1 = mask_BxT.astype(jnp.float32)[..., None]
    total_BxD = jnp.sum(hidden_BxTxD.astype(jnp.float32) * mask_BxTx1, axis=1)
    count_Bx1 = jnp.maximum(jnp.sum(mask_BxTx1, axis=1), 1.0)
    return total_BxD / count_Bx1


def sample_per_class(labels, n: int, seed: int) -> np.ndarray:
    """Indices (sorted, int64) of at most `n` thumbs-up and at most `n` thumbs-down rows of `labels`.

    Drawn without replacement from `seed` (NumPy's PCG64), so the same data and seed always give the
    same sample. A class with at most `n` rows is taken whole. (TRL samples with replacement, unseeded.)
    """
    labels = np.asarray(labels).astype(bool).reshape(-1)
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in (True, False):
        rows = np.flatnonzero(labels == cls)
        if len(rows) > n:
            rows = rng.choice(rows, size=n, replace=False)
        chosen.append(rows)
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def abstract_params(dim: int) -> dict:
    """Shapes and dtypes of the classifier for embedding size `dim` (e.g. to restore a checkpoint)."""
    vec = jax.ShapeDtypeStruct((dim,), jnp.float32)
    return {"weights": vec, "bias": jax.ShapeDtypeStruct((), jnp.float32), "mean": vec, "std": vec}


def log_density_ratio(params: dict, emb_BxD: jax.Array) -> jax.Array:
    """The classifier's logit, an estimate of log p_up(x) / p_down(x): [B] float32."""
    # jnp.asarray: with NumPy inputs, NumPy's own operators would run instead (different rounding).
    x_BxD = (jnp.asarray(emb_BxD, jnp.float32) - params["mean"]) / params["std"]
    return x_BxD @ params["weights"] + params["bias"]


def density_ratio_weights(params: dict, emb_BxD: jax.Array, labels_B: jax.Array, *,
                          min_density_ratio: float = 0.5, max_density_ratio: float = 10.0) -> jax.Array:
    """Per-example loss weights [B] float32: 1 for thumbs-up (labels true), and for thumbs-down the
    density ratio p_up(x) / p_down(x) of the prompt embedding, clipped to [min, max] (TRL's defaults).

    The logit is clipped before exp, so the result never overflows and the bounds are hit exactly.
    Jittable; `params` may be traced.
    """
    ratio_B = ratio_from_logit(log_density_ratio(params, emb_BxD), min_density_ratio, max_density_ratio)
    return jnp.where(jnp.asarray(labels_B, bool), jnp.float32(1.0), ratio_B)


def ratio_from_logit(logit_B, min_density_ratio: float = 0.5, max_density_ratio: float = 10.0) -> jax.Array:
    """exp(logit) clipped to [min, max]; the logit is clipped first, so it never overflows."""
    ratio_B = jnp.exp(jnp.clip(logit_B, math.log(min_density_ratio), math.log(max_density_ratio)))
    return jnp.clip(ratio_B, min_density_ratio, max_density_ratio)  # exp(log(b)) may miss b by 1 ulp


def classifier_accuracy(params: dict, emb_up_NxD: jax.Array, emb_down_MxD: jax.Array):
    """Training accuracy per class, (acc_up, acc_down) as Python floats, as TRL logs them.

    An example is predicted thumbs-up when its logit is > 0 (p(up | x) > 0.5, as sklearn's predict).
    """
    acc_up = jnp.mean(log_density_ratio(params, emb_up_NxD) > 0)
    acc_down = jnp.mean(log_density_ratio(params, emb_down_MxD) <= 0)
    return float(acc_up), float(acc_down)


def fit_prompt_classifier(emb_up_NxD, emb_down_MxD, *, l2: float = 1e-3, max_steps: int = 500,
                          tol: float = 1e-6) -> dict:
    """Fit the class-balanced, L2-regularised logistic regression thumbs-up vs thumbs-down.

    Minimises, over weights w and bias b on standardised features x:
        0.5 * mean_up softplus(-z) + 0.5 * mean_down softplus(z) + 0.5 * l2 * |w|^2,   z = x.w + b
    i.e. each class weighs half whatever its count (the bias is not penalised). `l2` is per unit of this
    mean loss: sklearn's default C=1 on its summed loss corresponds to l2 = 1 / (N + M).
    Full-batch L-BFGS (zoom line search) until the gradient norm is below `tol` or `max_steps`.
    Deterministic for given inputs and hardware. Inputs are float arrays [N, D], [M, D] with N, M >= 1.
    Returns the parameter dict described in the module docstring.
    """
    up = jnp.asarray(emb_up_NxD, jnp.float32)
    down = jnp.asarray(emb_down_MxD, jnp.float32)
    if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[1]:
        raise ValueError(f"UDM embeddings must be [N, D] and [M, D], got {up.shape} and {down.shape}")
    if up.shape[0] == 0 or down.shape[0] == 0:
        raise DataError(f"UDM needs prompts of both classes, got {up.shape[0]} thumbs-up and "
                         f"{down.shape[0]} thumbs-down")
    params, steps, grad_norm = _fit(up, down, jnp.float32(l2), jnp.float32(tol), max_steps)
    if float(grad_norm) >= tol:
        # Still usable (L-BFGS only improves the objective), but the caller should know.
        warnings.warn(f"UDM classifier did not converge in {int(steps)} L-BFGS steps "
                      f"(gradient norm {float(grad_norm):.2e} >= tol {tol:.0e}); raise max_steps or l2", stacklevel=2)
    return params


@jax.jit(static_argnames="max_steps")
def _fit(up_NxD, down_MxD, l2, tol, max_steps):
    emb_SxD = jnp.concatenate([up_NxD, down_MxD])
    is_up_S = jnp.arange(emb_SxD.shape[0]) < up_NxD.shape[0]
    mean_D = jnp.mean(emb_SxD, axis=0)
    std_D = jnp.std(emb_SxD, axis=0)
    std_D = jnp.where(std_D > _MIN_STD, std_D, 1.0)
    x_SxD = (emb_SxD - mean_D) / std_D
    # Class balancing as per-example weights that sum to 0.5 within each class.
    example_weight_S = jnp.where(is_up_S, 0.5 / up_NxD.shape[0], 0.5 / down_MxD.shape[0])
    sign_S = jnp.where(is_up_S, -1.0, 1.0)  # loss of class 1 is softplus(-z), of class 0 softplus(z)

    def objective(theta):
        z_S = x_SxD @ theta["weights"] + theta["bias"]
        data = jnp.sum(example_weight_S * jax.nn.softplus(sign_S * z_S))
        return data + 0.5 * l2 * jnp.sum(theta["weights"] ** 2)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def step(carry):
        theta, state = carry
        value, grad = value_and_grad(theta, state=state)
        updates, state = opt.update(grad, state, theta, value=value, grad=grad, value_fn=objective)
        return optax.apply_updates(theta, updates), state

    def keep_going(carry):
        _, state = carry
        count = otu.tree_get(state, "count")
        grad_norm = otu.tree_norm(otu.tree_get(state, "grad"))
        return (count == 0) | ((count < max_steps) & (grad_norm >= tol))

    theta0 = {"weights": jnp.zeros_like(mean_D), "bias": jnp.zeros((), jnp.float32)}
    theta, state = jax.lax.while_loop(keep_going, step, (theta0, opt.init(theta0)))
    params = {"weights": theta["weights"], "bias": theta["bias"], "mean": mean_D, "std": std_D}
    return params, otu.tree_get(state, "count"), otu.tree_norm(otu.tree_get(state, "grad"))
