"""RMSNorm (ARCHITECTURE.md §2.1): fp32 statistics and weight, output in the input's dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .quant import stable_sum


def rms_norm(x: jax.Array, weight: jax.Array | None, eps: float) -> jax.Array:
    """``w * x * (mean(x^2) + eps)^-1/2`` over the last axis; ``weight=None`` is the unweighted norm."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(stable_sum(xf * xf, axis=-1, keepdims=True) / x.shape[-1] + eps)
    if weight is not None:
        y = y * weight.astype(jnp.float32)
    return y.astype(x.dtype)
