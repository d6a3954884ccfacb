"""Attention for the three layer types (ARCHITECTURE.md §5): sliding window (SWA), window + indexer-selected
4:1 compressed rows (CSA), window + all 128:1 compressed rows (HCA).

This is the pure-JAX reference. One function serves a whole sequence, a prefill chunk and a decode step: the
tokens continue a ``LayerCache``. Each query gathers its own window (W rows) and scores all compressed rows
with a mask (§5.8's formulation, O(T * (W + T/m)) memory).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from einops import rearrange

from . import compressor as comp
from . import indexer as idx
from . import kernels, quant
from .cache import LayerCache
from .config import Config
from .norm import rms_norm
from .params import Attention
from .rope import apply_rope, rope_frequencies


def queries(p: Attention, x: jax.Array, positions: jax.Array, freqs, config: Config, dtype):
    """§5.1: ``qr [B, T, r_q]`` (also fed to the indexer) and ``q [B, T, H, d]`` (per-head RMS-normalised,
    rotated)."""
    qr = rms_norm(kernels.linear(x, p.wq_a, dtype), p.q_norm, config.rms_norm_eps)
    q = rearrange(kernels.linear(qr, p.wq_b, dtype), "b t (h d) -> b t h d", d=config.head_dim)
    q = rms_norm(q, None, config.rms_norm_eps)
    return qr, apply_rope(q, positions, freqs)


def raw_kv(p: Attention, x: jax.Array, positions: jax.Array, freqs, config: Config, dtype, *,
           qat: bool = True) -> jax.Array:
    """§5.2: the shared K=V latent of each token, ``[B, T, d]``: RMSNorm, RoPE, FP8_SIM on the non-rotary dims."""
    kv = rms_norm(kernels.linear(x, p.wkv, dtype), p.kv_norm, config.rms_norm_eps)
    kv = apply_rope(kv, positions, freqs)
    return comp.kv_fp8_sim(kv, config) if qat else kv


def attend(q: jax.Array, win: jax.Array, win_mask: jax.Array, rows: jax.Array | None, row_mask: jax.Array | None,
           sink: jax.Array, dtype) -> jax.Array:
    """§5.4: softmax over the visible keys plus a per-head sink logit with zero value (K = V).

    ``q [B, T, H, d]``; each query's window keys ``win [B, T, W, d]`` (oldest first, ``win_mask [B, T, W]``) and
    the compressed rows ``rows [B, R, d]`` shared by all queries (``row_mask [B, T, R]``). Scores and softmax
    statistics in fp32; probabilities rounded to the compute dtype before P @ V. Every query reduces over the
    same key layout whatever the chunk, so prefill and decode agree bit for bit on the CPU."""
    scale = q.shape[-1] ** -0.5
    s = jnp.where(win_mask[:, :, None, :], quant.matmul("bthd,btwd->bthw", q, win.astype(q.dtype)) * scale, -jnp.inf)
    if rows is not None:
        sr = quant.matmul("bthd,brd->bthr", q, rows.astype(q.dtype)) * scale
        s = jnp.concatenate([s, jnp.where(row_mask[:, :, None, :], sr, -jnp.inf)], axis=-1)
    z = sink.astype(jnp.float32)[None, None, :]
    m = jnp.maximum(jnp.max(s, axis=-1), z)
    e = jnp.exp(s - m[..., None])
    prob = (e / (quant.stable_sum(e, axis=-1) + jnp.exp(z - m))[..., None]).astype(dtype)
    w = win.shape[2]
    o = quant.matmul("bthw,btwd->bthd", prob[..., :w], win.astype(dtype))
    if rows is not None:
        o = o + quant.matmul("bthr,brd->bthd", prob[..., w:], rows.astype(dtype))
    return o.astype(dtype)


def output_projection(p: Attention, o: jax.Array, config: Config, dtype) -> jax.Array:
    """§5.5: grouped low-rank projection, ``[B, T, H, d]`` -> ``[B, T, D]``."""
    b = o.shape[0]
    g = config.o_groups
    og = rearrange(o, "b t (g h) d -> (b t) g (h d)", g=g).astype(dtype)
    wa = rearrange(quant.dequantize(p.wo_a, dtype), "(g r) c -> g r c", g=g)
    z = quant.matmul("mgc,grc->mgr", og, wa)
    if quant.global_scale(p.wo_a) is not None and jnp.dtype(dtype) != jnp.float32:
        z = z * quant.global_scale(p.wo_a)
    return kernels.linear(rearrange(z.astype(dtype), "(b t) g r -> b t (g r)", b=b), p.wo_b, dtype)


def window_keys(kv: jax.Array, ring: jax.Array, positions: jax.Array, pos0: jax.Array, w: int):
    """§5.3 window of each query: positions i-W+1 .. i (oldest first), from the chunk's rows ``kv [B, T, d]`` or,
    older, from the ring ``[B, W, d]`` as it was before the chunk. Returns ``[B, T, W, d]`` and the validity
    mask ``[B, T, W]``."""
    b, t = positions.shape
    kpos = positions[..., None] - (w - 1) + jnp.arange(w)
    in_chunk = kpos >= pos0[:, None, None]
    chunk_rows = jnp.take_along_axis(kv, jnp.clip(kpos - pos0[:, None, None], 0, t - 1).reshape(b, -1, 1), axis=1)
    ring_rows = jnp.take_along_axis(ring.astype(kv.dtype), jnp.remainder(kpos, w).reshape(b, -1, 1), axis=1)
    win = jnp.where(in_chunk[..., None], chunk_rows.reshape(b, t, w, -1), ring_rows.reshape(b, t, w, -1))
    return win, kpos >= 0


def ring_write(ring: jax.Array, kv: jax.Array, pos0: jax.Array, n: jax.Array) -> jax.Array:
    """Write the newest of the chunk's ``n[b]`` valid rows ``kv [B, T, d]`` into their slots ``p mod W``."""
    w = ring.shape[1]
    t = kv.shape[1]
    last = pos0 + n - 1
    q = last[:, None] - jnp.remainder(last[:, None] - jnp.arange(w), w)  # newest position per slot
    take = q >= pos0[:, None]
    new = jnp.take_along_axis(kv, jnp.clip(q - pos0[:, None], 0, t - 1)[..., None], axis=1)
    return jnp.where(take[..., None], new.astype(ring.dtype), ring)


def attention(p: Attention, x: jax.Array, lc: LayerCache, pos0: jax.Array, n: jax.Array, layer: int,
              config: Config, dtype, *, kv_qat: bool = True, indexer_qat: bool = True):
    """One attention sub-layer for a chunk of tokens continuing cached sequences (a whole sequence, a prefill
    chunk or a decode step; §10.3). ``x [B, T, D]`` (the ``attn_norm`` output) at positions ``pos0[b] + t``, of
    which the first ``n[b]`` are real; ``kv_qat`` / ``indexer_qat`` switch the FP8 simulation of stored KV rows
    and the indexer's Hadamard + FP4 simulation (both on in the model).

    Keys: the ring as it was before the chunk, the chunk's own rows, and the compressed rows after the
    compressor has consumed the chunk (a row is visible to the token that completes it). Returns
    ``(out [B, T, D], LayerCache)``."""
    ratio = config.compress_ratio(layer)
    w = config.sliding_window
    freqs = rope_frequencies(config, compressed=ratio > 0)
    t = x.shape[1]
    positions = pos0[:, None] + jnp.arange(t)
    qr, q = queries(p, x, positions, freqs, config, dtype)
    kv = raw_kv(p, x, positions, freqs, config, dtype, qat=kv_qat)
    new = dataclasses.replace(lc, window=ring_write(lc.window, kv, pos0, n))
    use_kernels = kernels.attention_kernels(dtype)
    rows = sel = None  # the kernel path's selection: ascending row indices [B, T, k]; the reference's: a mask
    if ratio:
        rows, state = comp.compress_step(p.compressor, lc.compressor, lc.rows, x, pos0, n, ratio, config, dtype,
                                         kind="main", qat=kv_qat)
        new = dataclasses.replace(new, rows=rows, compressor=state)
        if p.indexer is not None:
            irows, istate = comp.compress_step(p.indexer.compressor, lc.index_compressor, lc.index_rows, x, pos0,
                                               n, ratio, config, dtype, kind="indexer", qat=indexer_qat)
            new = dataclasses.replace(new, index_rows=irows, index_compressor=istate)
            iq, iw = idx.index_queries(p.indexer, qr, x, positions, config, dtype, qat=indexer_qat)
            if use_kernels:
                sel = kernels.index_select(iq, iw, irows, pos0, ratio, config.index_topk, dtype)
            else:
                sel = idx.select(idx.index_scores(iq, iw, irows, dtype), positions, ratio, config.index_topk)
    if use_kernels:
        o = kernels.window_attention(q, kv, lc.window, pos0, rows, sel, p.attn_sink, ratio, dtype)
    else:
        win, win_mask = window_keys(kv, lc.window, positions, pos0, w)
        row_mask = None
        if rows is not None:  # §5.3: row c is visible from position i iff c < (i + 1) // m (and selected, CSA)
            row_mask = jnp.arange(rows.shape[1]) < ((positions + 1) // ratio)[..., None]
            row_mask = row_mask if sel is None else row_mask & sel
        o = attend(q, win, win_mask, rows, row_mask, p.attn_sink, dtype)
    o = apply_rope(o, positions, freqs, inverse=True)  # §5.6
    return output_projection(p, o, config, dtype), new
