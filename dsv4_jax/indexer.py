"""Lightning Indexer (ARCHITECTURE.md §7): scores compressed rows for each query and selects the top-k."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import kernels, quant
from .config import Config
from .params import Indexer
from .rope import apply_rope, rope_frequencies


def index_queries(p: Indexer, qr: jax.Array, x: jax.Array, positions: jax.Array, config: Config, dtype,
                  *, qat: bool = True) -> tuple[jax.Array, jax.Array]:
    """§7.2: queries ``[B, T, H_I, d_I]`` (RoPE, then Hadamard + FP4_SIM) and head weights ``[B, T, H_I]`` (fp32,
    scaled by ``d_I^-1/2 * H_I^-1/2``)."""
    b, t, _ = qr.shape
    q = kernels.linear(qr, p.wq_b, dtype).reshape(b, t, config.index_n_heads, config.index_head_dim)
    q = apply_rope(q, positions, rope_frequencies(config, compressed=True))
    if qat:
        q = quant.fp4_sim(quant.hadamard(q), 32)
    w = kernels.linear(x, p.weights_proj, dtype, jnp.float32)
    return q, w * (config.index_head_dim**-0.5 * config.index_n_heads**-0.5)


def index_scores(q: jax.Array, w: jax.Array, keys: jax.Array, dtype) -> jax.Array:
    """``score[b, t, c] = sum_h w[b, t, h] * ReLU(q[b, t, h] . keys[b, c])``; ``[B, T, N]`` fp32.

    The reference computes in bf16 (§7.4); scores are rounded to the compute dtype."""
    s = jax.nn.relu(quant.matmul("bthd,bnd->bthn", q, keys.astype(q.dtype)))
    return quant.stable_sum(s * w[..., None], axis=2).astype(dtype).astype(jnp.float32)


def select(scores: jax.Array, positions: jax.Array, ratio: int, top_k: int) -> jax.Array:
    """§7.3: boolean ``[B, T, N]`` of the rows each query attends: the top ``min(top_k, N)`` eligible rows
    (``c < (p + 1) // m``) by score. Ties go to the lower row index (``lax.top_k`` order)."""
    b, t, n = scores.shape
    eligible = jnp.arange(n) < ((positions + 1) // ratio)[..., None]
    s = jnp.where(eligible, scores, -jnp.inf)
    k = min(top_k, n)
    if k == 0:
        return jnp.zeros((b, t, n), bool)
    vals, idx = jax.lax.top_k(s, k)
    bi = jnp.arange(b)[:, None, None]
    ti = jnp.arange(t)[None, :, None]
    return jnp.zeros((b, t, n), bool).at[bi, ti, idx].max(vals > -jnp.inf)
