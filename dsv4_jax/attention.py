"""Attention for the three layer types (ARCHITECTURE.md §5): sliding window (SWA), window + indexer-selected
4:1 compressed rows (CSA), window + all 128:1 compressed rows (HCA).

This is the reference formulation: dense scores over ``[raw rows ; compressed rows]`` with a boolean mask
(§5.8), O(T^2) memory, exactly what the official model computes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

from . import compressor as comp
from . import indexer as idx
from . import quant
from .config import Config
from .norm import rms_norm
from .params import Attention
from .rope import apply_rope, rope_frequencies


def queries(p: Attention, x: jax.Array, positions: jax.Array, freqs, config: Config, dtype):
    """§5.1: ``qr [B, T, r_q]`` (also fed to the indexer) and ``q [B, T, H, d]`` (per-head RMS-normalised,
    rotated)."""
    qr = rms_norm(quant.linear(x, p.wq_a, dtype), p.q_norm, config.rms_norm_eps)
    q = rearrange(quant.linear(qr, p.wq_b, dtype), "b t (h d) -> b t h d", d=config.head_dim)
    q = rms_norm(q, None, config.rms_norm_eps)
    return qr, apply_rope(q, positions, freqs)


def raw_kv(p: Attention, x: jax.Array, positions: jax.Array, freqs, config: Config, dtype, *,
           qat: bool = True) -> jax.Array:
    """§5.2: the shared K=V latent of each token, ``[B, T, d]``: RMSNorm, RoPE, FP8_SIM on the non-rotary dims."""
    kv = rms_norm(quant.linear(x, p.wkv, dtype), p.kv_norm, config.rms_norm_eps)
    kv = apply_rope(kv, positions, freqs)
    return comp.kv_fp8_sim(kv, config) if qat else kv


def attend(q: jax.Array, keys: jax.Array, mask: jax.Array, sink: jax.Array, dtype) -> jax.Array:
    """§5.4: softmax over the masked keys plus a per-head sink logit with zero value.

    ``q [B, T, H, d]``, ``keys [B, S, d]`` (K = V), ``mask [B, T, S]``, ``sink [H]`` -> ``[B, T, H, d]``.
    Scores and softmax statistics in fp32; probabilities rounded to the compute dtype before P @ V."""
    scale = q.shape[-1] ** -0.5
    s = quant.matmul("bthd,bsd->bths", q, keys.astype(q.dtype)) * scale
    s = jnp.where(mask[:, :, None, :], s, -jnp.inf)
    z = sink.astype(jnp.float32)[None, None, :]
    m = jnp.maximum(jnp.max(s, axis=-1), z)
    e = jnp.exp(s - m[..., None])
    prob = e / (jnp.sum(e, axis=-1) + jnp.exp(z - m))[..., None]
    return quant.matmul("bths,bsd->bthd", prob.astype(dtype), keys.astype(dtype)).astype(dtype)


def output_projection(p: Attention, o: jax.Array, config: Config, dtype) -> jax.Array:
    """§5.5: grouped low-rank projection, ``[B, T, H, d]`` -> ``[B, T, D]``."""
    g = config.o_groups
    og = rearrange(o, "b t (g h) d -> b t g (h d)", g=g)
    wa = rearrange(quant.dequantize(p.wo_a, dtype), "(g r) c -> g r c", g=g)
    z = quant.matmul("btgc,grc->btgr", og.astype(dtype), wa)
    if quant.global_scale(p.wo_a) is not None and jnp.dtype(dtype) != jnp.float32:
        z = z * quant.global_scale(p.wo_a)
    return quant.linear(rearrange(z.astype(dtype), "b t g r -> b t (g r)"), p.wo_b, dtype)


def window_mask(q_pos: jax.Array, k_pos: jax.Array, window: int) -> jax.Array:
    """§5.3: raw key at position j is visible from query i iff ``i - window < j <= i``."""
    d = q_pos[..., :, None] - k_pos[..., None, :]
    return (d >= 0) & (d < window)


def attention(p: Attention, x: jax.Array, positions: jax.Array, layer: int, config: Config, dtype, *,
              kv_qat: bool = True, indexer_qat: bool = True) -> jax.Array:
    """One attention sub-layer over a whole sequence that starts at position 0.

    ``x [B, T, D]`` is the ``attn_norm`` output, ``positions [B, T]``. ``kv_qat`` / ``indexer_qat`` switch the
    FP8 simulation of stored KV rows and the indexer's Hadamard + FP4 simulation (both on in the model)."""
    ratio = config.compress_ratio(layer)
    freqs = rope_frequencies(config, compressed=ratio > 0)
    qr, q = queries(p, x, positions, freqs, config, dtype)
    keys = raw_kv(p, x, positions, freqs, config, dtype, qat=kv_qat)
    mask = window_mask(positions, positions, config.sliding_window)
    if ratio:
        rows = comp.compress_sequence(p.compressor, x, ratio, config, dtype, kind="main", qat=kv_qat)
        n = rows.shape[1]
        visible = jnp.broadcast_to(jnp.arange(n) < ((positions + 1) // ratio)[..., None], (*positions.shape, n))
        if p.indexer is not None:
            ikeys = comp.compress_sequence(p.indexer.compressor, x, ratio, config, dtype, kind="indexer",
                                           qat=indexer_qat)
            iq, iw = idx.index_queries(p.indexer, qr, x, positions, config, dtype, qat=indexer_qat)
            scores = idx.index_scores(iq, iw, ikeys, dtype)
            visible = visible & idx.select(scores, positions, ratio, config.index_topk)
        keys = jnp.concatenate([keys, rows.astype(keys.dtype)], axis=1)
        mask = jnp.concatenate([mask, visible], axis=-1)
    o = attend(q, keys, mask, p.attn_sink, dtype)
    o = apply_rope(o, positions, freqs, inverse=True)  # §5.6
    return output_projection(p, o, config, dtype)
