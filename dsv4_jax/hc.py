"""Manifold-constrained hyper-connections (mHC, ARCHITECTURE.md §4). All arithmetic in fp32.

The residual is carried as ``n = hc_mult`` streams ``h [B, T, n, D]``; each sub-layer reads a mix of the
streams (``hc_pre``) and writes back through ``post`` and a doubly-stochastic ``comb`` (``hc_post``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import quant
from .config import Config


def _mixes(h: jax.Array, fn: jax.Array, eps: float) -> jax.Array:
    """§4.2 steps 1-3: ``mu = (flatten(h) @ fn^T) * rho`` with ``rho`` the unweighted RMS of all n*D values."""
    x = h.reshape(*h.shape[:-2], -1).astype(jnp.float32)
    rho = jax.lax.rsqrt(quant.stable_sum(x * x, axis=-1, keepdims=True) / x.shape[-1] + eps)
    return quant.dense(x, fn.astype(jnp.float32)) * rho


def sinkhorn(m0: jax.Array, iters: int, eps: float) -> jax.Array:
    """§4.2 step 8: row softmax (+eps), column normalisation, then ``iters - 1`` (row, column) rounds."""
    m = quant.softmax(m0, axis=-1) + eps
    m = m / (quant.stable_sum(m, axis=-2, keepdims=True) + eps)

    def round_(_, m):
        m = m / (quant.stable_sum(m, axis=-1, keepdims=True) + eps)
        return m / (quant.stable_sum(m, axis=-2, keepdims=True) + eps)

    # A loop: unrolled, XLA fuses the rounds on a GPU (a decode step of the tiny model on an H200: 3.5 ms instead
    # of 7.1) but its fusion pass spends minutes on them in a 43-layer program. On GPUs the model takes the
    # Pallas kernel instead (kernels.sinkhorn), which has both the speed and the compile time.
    return jax.lax.fori_loop(0, iters - 1, round_, m)


def _per_token(f, mu: jax.Array):
    """Apply ``f`` to ``mu [..., k]`` flattened to rows padded to a multiple of 16.

    The mixing coefficients are tiny per token, so XLA vectorises their math across tokens, and a partial
    last vector takes a scalar code path that rounds transcendental functions differently. Whole vectors
    only make a token's coefficients independent of how many tokens share the call (decode = prefill)."""
    lead = mu.shape[:-1]
    rows = mu.reshape(-1, mu.shape[-1])
    m = rows.shape[0]
    rows = jnp.pad(rows, ((0, -m % 16), (0, 0)))
    return jax.tree.map(lambda a: a[:m].reshape(*lead, *a.shape[1:]), f(rows))


def hc_pre(h: jax.Array, fn: jax.Array, scale: jax.Array, base: jax.Array, config: Config):
    """Collapse the streams for a sub-layer.

    ``h [B, T, n, D]`` -> ``x [B, T, D]`` (h's dtype), ``post [B, T, n]`` and ``comb [B, T, n, n]`` (fp32;
    ``comb[j, k]``: source stream j to destination stream k)."""
    from . import kernels  # kernels dispatches back to this module's sinkhorn

    n = config.hc_mult
    scale, base = scale.astype(jnp.float32), base.astype(jnp.float32)

    def coefficients(mu):
        pre = jax.nn.sigmoid(mu[:, :n] * scale[0] + base[:n]) + config.hc_eps
        post = 2 * jax.nn.sigmoid(mu[:, n : 2 * n] * scale[1] + base[n : 2 * n])
        m0 = (mu[:, 2 * n :] * scale[2] + base[2 * n :]).reshape(-1, n, n)
        return pre, post, kernels.sinkhorn(m0, config.hc_sinkhorn_iters, config.hc_eps)

    pre, post, comb = _per_token(coefficients, _mixes(h, fn, config.rms_norm_eps))
    x = quant.stable_sum(pre[..., None] * h.astype(jnp.float32), axis=-2)
    return x.astype(h.dtype), post, comb


def hc_post(y: jax.Array, h: jax.Array, post: jax.Array, comb: jax.Array) -> jax.Array:
    """§4.3: ``h'[k] = post_k * y + sum_j comb[j, k] * h[j]`` (fp32, stored in h's dtype)."""
    mixed = quant.stable_sum(comb[..., None] * h.astype(jnp.float32)[..., :, None, :], axis=-3)
    return (post[..., None] * y.astype(jnp.float32)[..., None, :] + mixed).astype(h.dtype)


def hc_head(h: jax.Array, fn: jax.Array, scale: jax.Array, base: jax.Array, config: Config) -> jax.Array:
    """§9.1: the final collapse, ``y = sum_j (sigmoid(scale * mu_j + base_j) + eps) h[j]``."""
    pre = _per_token(lambda mu: jax.nn.sigmoid(mu * scale.astype(jnp.float32)[0] + base.astype(jnp.float32))
                     + config.hc_eps, _mixes(h, fn, config.rms_norm_eps))
    return quant.stable_sum(pre[..., None] * h.astype(jnp.float32), axis=-2).astype(h.dtype)
