"""KV compressor (ARCHITECTURE.md §6): pools blocks of ``m`` tokens into one row with a per-channel softmax.

Ratio 4 (CSA) is overlapping: row b pools the first-half features of block b-1 and the second-half
features of block b (8 slots, stride 4). Other ratios (HCA, m = 128 in Flash) pool their own block only.
Projections, gates and pooling are fp32 whatever the compute dtype (§11.1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import quant
from .cache import CompressorState
from .config import Config
from .norm import rms_norm
from .params import Compressor
from .rope import apply_rope, rope_frequencies


def project(p: Compressor, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """§6.2: ``A = x @ wkv^T`` and ``S = x @ wgate^T + ape[p mod m]``, fp32. ``x [B, T, D]`` -> ``[B, T, c*d_c]``."""
    m = p.ape.shape[0]
    xf = x.astype(jnp.float32)
    a = quant.dense(xf, p.wkv.astype(jnp.float32))
    s = quant.dense(xf, p.wgate.astype(jnp.float32)) + p.ape[positions % m]
    return a, s


def pool(a: jax.Array, s: jax.Array, overlap: bool, prev_a=None, prev_s=None) -> jax.Array:
    """§6.3: pool whole blocks. ``a, s [B, N, m, c*d_c]`` -> rows ``[B, N, d_c]`` (fp32).

    For an overlapping compressor, ``prev_a, prev_s [B, m, d_c]`` are the first halves of the block before
    block 0 (absent: weight 0, as at the start of a sequence)."""
    if not overlap:
        return quant.stable_sum(quant.softmax(s, axis=2) * a, axis=2)
    b, _, m, w = a.shape
    dc = w // 2
    if prev_a is None:
        prev_a = jnp.zeros((b, m, dc), a.dtype)
        prev_s = jnp.full((b, m, dc), -jnp.inf, s.dtype)
    pa = jnp.concatenate([prev_a[:, None], a[:, :-1, :, :dc]], axis=1)
    ps = jnp.concatenate([prev_s[:, None], s[:, :-1, :, :dc]], axis=1)
    slots_a = jnp.concatenate([pa, a[..., dc:]], axis=2)  # [B, N, 2m, d_c]
    slots_s = jnp.concatenate([ps, s[..., dc:]], axis=2)
    return quant.stable_sum(quant.softmax(slots_s, axis=2) * slots_a, axis=2)


def finish(p: Compressor, rows: jax.Array, block_idx: jax.Array, ratio: int, config: Config, dtype,
           *, kind: str, qat: bool = True) -> jax.Array:
    """§6.4: cast to the compute dtype, RMSNorm, RoPE at the block's first position ``b*m`` (compressed-layer
    table), then the stored-row simulation: FP8 on the non-rotary dims (``kind="main"``) or Hadamard + FP4 on
    all dims (``kind="indexer"``); ``qat=False`` skips the simulation."""
    r = rms_norm(rows.astype(dtype), p.norm, config.rms_norm_eps)
    r = apply_rope(r, block_idx * ratio, rope_frequencies(config, compressed=True))
    if not qat:
        return r
    if kind == "main":
        return kv_fp8_sim(r, config)
    return quant.fp4_sim(quant.hadamard(r), 32)


def kv_fp8_sim(kv: jax.Array, config: Config) -> jax.Array:
    """§5.2: FP8_SIM (block 64) on the non-rotary dims of a stored KV row; the rotary dims are untouched."""
    nope = config.head_dim - config.qk_rope_head_dim
    return jnp.concatenate([quant.fp8_sim(kv[..., :nope], 64), kv[..., nope:]], axis=-1)


def compress_step(p: Compressor, state: CompressorState, rows: jax.Array, x: jax.Array, pos0: jax.Array,
                  n: jax.Array, ratio: int, config: Config, dtype, *, kind: str, qat: bool = True):
    """§10.2 for any chunk: feed tokens ``x [B, T, D]`` at positions ``pos0 + t`` (only the first ``n[b]`` of
    each sequence are real) through the compressor; write every block they complete into ``rows [B, R, d_c]``
    (slot = block index) and return ``(rows, state)``.

    The open block's pending tokens and the chunk are laid out as one block-aligned sequence per batch row,
    so prefill from scratch, chunked prefill and single-token decode are the same computation."""
    m = ratio
    b, t, _ = x.shape
    positions = pos0[:, None] + jnp.arange(t)
    a_new, s_new = project(p, x, positions)
    r = pos0 % m  # tokens already pending in the open block
    nb = -(-(m + t) // m)
    j = jnp.arange(nb * m)
    from_pend = j[None, :] < r[:, None]
    src = jnp.clip(j[None, :] - r[:, None], 0, t - 1)

    def lay_out(pend, new):
        old = pend[:, jnp.clip(j, 0, m - 1)]
        fresh = jnp.take_along_axis(new, src[..., None], axis=1)
        return jnp.where(from_pend[..., None], old, fresh).reshape(b, nb, m, -1)

    seq_a, seq_s = lay_out(state.pend_a, a_new), lay_out(state.pend_s, s_new)
    overlap = m == 4
    pooled = pool(seq_a, seq_s, overlap, state.prev_a, state.prev_s)
    blk0 = pos0 // m
    block_idx = blk0[:, None] + jnp.arange(nb)
    new_rows = finish(p, pooled, block_idx, m, config, dtype, kind=kind, qat=qat)
    done = (r + n) // m  # blocks completed by this chunk
    complete = jnp.arange(nb)[None, :] < done[:, None]
    slot = jnp.where(complete, block_idx, rows.shape[1])  # out of range -> dropped
    rows = rows.at[jnp.arange(b)[:, None], slot].set(new_rows.astype(rows.dtype), mode="drop")
    last = jnp.clip(done, 0, nb - 1)
    pend_a = jnp.take_along_axis(seq_a, last[:, None, None, None], axis=1)[:, 0]
    pend_s = jnp.take_along_axis(seq_s, last[:, None, None, None], axis=1)[:, 0]
    state_new = CompressorState(pend_a, pend_s)
    if overlap:
        dc = seq_a.shape[-1] // 2
        prev = jnp.clip(done - 1, 0, nb - 1)[:, None, None, None]
        moved = (done > 0)[:, None, None]
        state_new = CompressorState(
            pend_a, pend_s,
            jnp.where(moved, jnp.take_along_axis(seq_a, prev, axis=1)[:, 0, :, :dc], state.prev_a),
            jnp.where(moved, jnp.take_along_axis(seq_s, prev, axis=1)[:, 0, :, :dc], state.prev_s))
    return rows, state_new
