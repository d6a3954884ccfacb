"""Partial, interleaved-pair rotary embedding on the last ``qk_rope_head_dim`` dims (ARCHITECTURE.md §2.2)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from .config import Config


def rope_frequencies(config: Config, compressed: bool) -> np.ndarray:
    """fp32 frequencies ``f_i``, i = 0..rd/2-1, of a layer.

    Sliding-window layers (and MTP): ``theta = rope_theta``, no scaling. Compressed (CSA/HCA) layers:
    ``theta = compress_rope_theta`` with YaRN frequency blending when ``rope_scaling`` is set."""
    rd = config.qk_rope_head_dim
    theta = config.compress_rope_theta if compressed else config.rope_theta
    f = 1.0 / (np.float32(theta) ** (np.arange(0, rd, 2, dtype=np.float32) / np.float32(rd)))
    f = f.astype(np.float32)
    ys = config.rope_scaling
    if not compressed or ys is None:
        return f

    def corr(n_rot: float) -> float:
        return rd * math.log(ys.original_max_position_embeddings / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

    lo = max(math.floor(corr(ys.beta_fast)), 0)
    hi = min(math.ceil(corr(ys.beta_slow)), rd - 1)
    if lo == hi:
        hi += 0.001
    ramp = np.clip((np.arange(rd // 2, dtype=np.float32) - lo) / np.float32(hi - lo), 0, 1).astype(np.float32)
    # f <- f * (1 - ramp) + (f / factor) * ramp, evaluated as the reference does (fp32).
    return (f / np.float32(ys.factor) * ramp + f * (1 - ramp)).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, freqs, *, inverse: bool = False) -> jax.Array:
    """Rotate the last ``2 * len(freqs)`` entries of ``x [..., T, (heads,) d]`` by angle ``p * f_i``.

    ``positions`` is ``[..., T]`` (int), broadcast against x's leading axes; pairs are adjacent entries
    ``(u[2i], u[2i+1])`` with ``u[2i]`` the real part. Angles are the fp32 product ``p * f_i`` as in the
    reference; ``inverse`` rotates by ``-p * f_i``. Returns x's dtype."""
    freqs = jnp.asarray(freqs, jnp.float32)
    rd = 2 * freqs.shape[0]
    extra = x.ndim - 1 - positions.ndim  # head axes between T and d
    ang = positions.astype(jnp.float32).reshape(positions.shape + (1,) * extra + (1,)) * freqs
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    if inverse:
        sin = -sin
    u = x[..., -rd:].astype(jnp.float32).reshape(*x.shape[:-1], rd // 2, 2)
    re, im = u[..., 0], u[..., 1]
    rot = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1).reshape(*x.shape[:-1], rd)
    return jnp.concatenate([x[..., :-rd], rot.astype(x.dtype)], axis=-1)
