"""Manifold-constrained hyper-connections (ARCHITECTURE.md §4)."""

import jax.numpy as jnp
import numpy as np
import spec_reference

import dsv4_jax as d
from dsv4_jax.hc import hc_head, hc_post, hc_pre, sinkhorn

C = d.tiny()


def test_sinkhorn_is_doubly_stochastic_and_not_symmetric():
    m0 = np.random.default_rng(0).standard_normal((50, 4, 4)).astype(np.float32)
    m = np.asarray(sinkhorn(jnp.asarray(m0), 20, 1e-6))
    # Columns are normalised last (exact up to eps); rows converge within the 20 rounds.
    np.testing.assert_allclose(m.sum(-1), 1, atol=2e-3)
    np.testing.assert_allclose(m.sum(-2), 1, atol=1e-5)
    assert (m > 0).all() and np.abs(m - m.transpose(0, 2, 1)).max() > 1e-2


def test_pre_post_follow_the_formulas():
    rng = np.random.default_rng(1)
    n, dim = C.hc_mult, C.hidden_size
    h = rng.standard_normal((2, 3, n, dim)).astype(np.float32)
    fn = rng.standard_normal((C.mix_hc, n * dim)).astype(np.float32) / np.sqrt(n * dim)
    scale = rng.uniform(0.5, 1.5, 3).astype(np.float32)
    base = rng.standard_normal(C.mix_hc).astype(np.float32)
    x, post, comb = hc_pre(jnp.asarray(h), jnp.asarray(fn), jnp.asarray(scale), jnp.asarray(base), C)
    flat = h.reshape(2, 3, -1).astype(np.float64)
    mu = flat @ fn.T / np.sqrt((flat**2).mean(-1, keepdims=True) + 1e-6)
    sig = lambda v: 1 / (1 + np.exp(-v))
    pre = sig(mu[..., :n] * scale[0] + base[:n]) + 1e-6
    np.testing.assert_allclose(np.asarray(post), 2 * sig(mu[..., n:2 * n] * scale[1] + base[n:2 * n]), rtol=1e-5)
    m0 = (mu[..., 2 * n:] * scale[2] + base[2 * n:]).reshape(2, 3, n, n)
    np.testing.assert_allclose(np.asarray(comb), spec_reference.sinkhorn(m0, 20, 1e-6), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(x), np.einsum("btj,btjd->btd", pre, h), rtol=1e-5, atol=1e-5)
    y = rng.standard_normal((2, 3, dim)).astype(np.float32)
    out = np.asarray(hc_post(jnp.asarray(y), jnp.asarray(h), post, comb))
    # h'[k] = post_k y + sum_j comb[j, k] h[j]: the sum runs over the first index of comb.
    want = np.asarray(post)[..., None] * y[:, :, None] + np.einsum("btjk,btjd->btkd", np.asarray(comb), h)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    head = np.asarray(hc_head(jnp.asarray(h), jnp.asarray(fn[:n]), jnp.asarray(scale[:1]), jnp.asarray(base[:n]), C))
    pre_h = sig(mu[..., :n] * scale[0] + base[:n]) + 1e-6
    np.testing.assert_allclose(head, np.einsum("btj,btjd->btd", pre_h, h), rtol=1e-5, atol=1e-5)
