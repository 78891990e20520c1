"""UDM: the classifier's weights are the density ratio of known Gaussians, clipped; the fit is exact."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bco_jax import udm

D = 6
# Inside the clip range the estimated ratio is within this of the analytic one (finite-sample error of
# 12k training points; measured max 0.12, mean 0.03 at the time of writing).
MAX_REL_ERR, MEAN_REL_ERR = 0.2, 0.05


def _gaussians(seed=0, n_up=8000, n_down=4000):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(D, D)) * 0.4
    cov = a @ a.T + np.eye(D)
    mu_up = np.array([0.8, -0.4, 0.3, 0.0, 0.5, -0.2]) + 3.0  # offset: standardisation must handle it
    mu_down = np.full(D, 3.0)
    chol = np.linalg.cholesky(cov)

    def draw(mu, n):
        return (mu + rng.normal(size=(n, D)) @ chol.T).astype(np.float32)

    inv = np.linalg.inv(cov)
    w = inv @ (mu_up - mu_down)
    b = -0.5 * (mu_up @ inv @ mu_up - mu_down @ inv @ mu_down)
    def log_ratio(x):
        return x.astype(np.float64) @ w + b
    return draw(mu_up, n_up), draw(mu_down, n_down), draw, (mu_up, mu_down), log_ratio


@pytest.fixture(scope="module")
def fitted():
    up, down, draw, (mu_up, mu_down), log_ratio = _gaussians()
    params = udm.fit_prompt_classifier(up, down)
    test = np.concatenate([draw(mu_up, 2000), draw(mu_down, 2000)])
    return params, up, down, test, log_ratio


def test_weights_match_analytic_density_ratio(fitted):
    params, _, _, test, log_ratio = fitted
    true = np.exp(log_ratio(test))
    weights = np.asarray(udm.density_ratio_weights(params, test, np.zeros(len(test), bool)))
    inside = (true > 0.5) & (true < 10.0)
    assert inside.sum() > 1000
    rel = np.abs(weights[inside] / true[inside] - 1)
    assert rel.max() < MAX_REL_ERR, rel.max()
    assert rel.mean() < MEAN_REL_ERR, rel.mean()
    # Well outside the range (beyond the estimation error) the weight is exactly the bound.
    assert np.all(weights[true < 0.5 / 1.5] == 0.5)
    assert np.all(weights[true > 10.0 * 1.5] == 10.0)
    assert np.all((weights >= 0.5) & (weights <= 10.0))
    assert (true < 0.5 / 1.5).sum() > 20 and (true > 15).sum() > 20  # both bounds are exercised


def test_custom_clip_range_and_thumbs_up_weight_one(fitted):
    params, _, _, test, _ = fitted
    labels = np.arange(len(test)) % 3 == 0
    weights = np.asarray(udm.density_ratio_weights(params, test, labels, min_density_ratio=0.8,
                                                   max_density_ratio=2.0))
    assert np.all(weights[labels] == 1.0)
    assert weights.min() == np.float32(0.8) and weights.max() == np.float32(2.0)
    assert weights.dtype == np.float32


def test_logit_is_exact_regularised_mle(fitted):
    """The L-BFGS fit equals a float64 Newton solve of the same objective."""
    params, up, down, _, _ = fitted
    x = np.concatenate([up, down]).astype(np.float64)
    x = (x - np.asarray(params["mean"])) / np.asarray(params["std"])
    x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    y = np.r_[np.ones(len(up)), np.zeros(len(down))]
    sw = np.where(y == 1, 0.5 / len(up), 0.5 / len(down))
    reg = np.r_[np.full(D, 1e-3), 0.0]
    theta = np.zeros(D + 1)
    for _ in range(30):
        p = 1 / (1 + np.exp(-x @ theta))
        grad = x.T @ (sw * (p - y)) + reg * theta
        hess = (x * (sw * p * (1 - p))[:, None]).T @ x + np.diag(reg)
        theta -= np.linalg.solve(hess, grad)
    np.testing.assert_allclose(params["weights"], theta[:D], atol=2e-4)
    np.testing.assert_allclose(params["bias"], theta[D], atol=2e-4)


def test_accuracy_sensible(fitted):
    params, up, down, _, _ = fitted
    acc_up, acc_down = udm.classifier_accuracy(params, up, down)
    # Bayes accuracy of these Gaussians is about 0.70 per class (balanced threshold at ratio 1).
    assert 0.6 < acc_up < 0.8 and 0.6 < acc_down < 0.8
    # Separable classes are classified (almost) perfectly.
    rng = np.random.default_rng(1)
    far_up, far_down = rng.normal(size=(200, D)) + 5, rng.normal(size=(100, D)) - 5
    sep = udm.fit_prompt_classifier(far_up, far_down)
    assert udm.classifier_accuracy(sep, far_up, far_down) == (1.0, 1.0)


def test_class_balancing_removes_the_prior():
    """Same distribution for both classes, 4:1 counts: the ratio is 1, not 4."""
    rng = np.random.default_rng(2)
    up, down = rng.normal(size=(8000, D)), rng.normal(size=(2000, D))
    params = udm.fit_prompt_classifier(up, down)
    logits = udm.log_density_ratio(params, rng.normal(size=(1000, D)))
    # Unbalanced, the intercept would be log 4 = 1.39; only sampling noise remains.
    assert abs(float(params["bias"])) < 0.05
    assert float(jnp.mean(jnp.abs(logits))) < 0.1 and float(jnp.max(jnp.abs(logits))) < 0.4


def test_deterministic_and_pytree_round_trip(fitted):
    params, up, down, test, _ = fitted
    again = udm.fit_prompt_classifier(up, down)
    for k in params:
        np.testing.assert_array_equal(params[k], again[k])
    leaves, treedef = jax.tree.flatten(params)
    rebuilt = jax.tree.unflatten(treedef, [np.asarray(x) for x in leaves])
    labels = np.zeros(len(test), bool)
    np.testing.assert_array_equal(udm.density_ratio_weights(params, test, labels),
                                  udm.density_ratio_weights(rebuilt, test, labels))
    abstract = udm.abstract_params(D)
    assert jax.tree.structure(abstract) == treedef
    assert all(a.shape == p.shape and a.dtype == p.dtype
               for a, p in zip(jax.tree.leaves(abstract), leaves))


def test_weights_jit_and_constant_feature():
    rng = np.random.default_rng(3)
    up, down = rng.normal(size=(300, 3)) + 1, rng.normal(size=(200, 3))
    up[:, 2] = down[:, 2] = 7.0  # constant feature: must not produce NaN
    params = udm.fit_prompt_classifier(up, down)
    weights = jax.jit(udm.density_ratio_weights)(params, jnp.asarray(down), jnp.zeros(200, bool))
    assert np.all(np.isfinite(weights)) and np.all(np.isfinite(params["weights"]))


def test_warns_when_not_converged():
    rng = np.random.default_rng(4)
    with pytest.warns(UserWarning, match="did not converge in 2"):
        udm.fit_prompt_classifier(rng.normal(size=(100, 4)) + 1, rng.normal(size=(80, 4)), max_steps=2)


def test_bad_inputs():
    with pytest.raises(ValueError, match="both classes"):
        udm.fit_prompt_classifier(np.zeros((0, 3)), np.ones((4, 3)))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        udm.fit_prompt_classifier(np.zeros((4, 3)), np.ones((4, 2)))


def test_mean_pool():
    h = jnp.arange(2 * 3 * 2, dtype=jnp.bfloat16).reshape(2, 3, 2)
    mask = jnp.array([[1, 1, 0], [0, 0, 0]], bool)
    out = udm.mean_pool(h, mask)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, [[1.0, 2.0], [0.0, 0.0]])


def test_sample_per_class():
    labels = np.r_[np.ones(50, bool), np.zeros(7, bool)][np.random.default_rng(0).permutation(57)]
    idx = udm.sample_per_class(labels, 10, seed=5)
    assert labels[idx].sum() == 10 and (~labels[idx]).sum() == 7
    assert len(np.unique(idx)) == len(idx) and np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(idx, udm.sample_per_class(labels, 10, seed=5))
    assert not np.array_equal(idx, udm.sample_per_class(labels, 10, seed=6))
    assert len(udm.sample_per_class(labels, 1000, seed=0)) == 57
