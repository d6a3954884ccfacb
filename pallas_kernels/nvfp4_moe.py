"""Grouped NVFP4 expert matmuls for the routed MoE (ARCHITECTURE.md §8.2) in Pallas-Triton, with the
pure-JAX reference.

``y[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t])`` where ``expert(x) = w2(SiLU(min(x w1^T, L)) *
clamp(x w3^T, -L, L))`` and the routing weight multiplies the hidden before w2 (``moe.expert_ffn``). A pair
with id ``-1`` contributes nothing and reads no weights: under expert parallelism each device passes the pairs
routed to other devices' experts as ``-1`` (``dsv4_jax.moe``).

Two schedules, each two Pallas kernels:

* Decode-sized batches (by default ``P = T*k <= PAIRWISE_MAX`` (token, expert) pairs): no sort, no
  scatter; each pair is its own row tile (``bm`` rows, one live; weights on the left of the dot). ``w13`` runs on a ``(pair, I-block, K-split)`` grid and writes
  fp32 partial sums of ``x w1^T`` and ``x w3^T``; ``w2`` on a ``(pair, D-block, K-split)`` grid sums those
  partials for its K step, applies the global scales, the clipped SwiGLU and the routing weight in its
  prologue, and writes fp32 partials of ``h w2^T * weight_scale_2``; one XLA reduction adds the K splits
  and each token's ``k`` pairs. Split-K gives the memory system enough programs at batch 1 (6 pairs). A pair
  has one live row, so by default (``fma``) both kernels multiply it on the CUDA cores in fp32 instead of
  padding it to a 16-row tensor-core tile (a quarter less time at batch 1, BENCHMARKS.md).
* Larger batches: the ``P`` pairs are sorted by expert and each expert's rows padded to a multiple of
  ``bm``, so that every row tile belongs to one expert; at most ``P // bm + min(P, E)`` tiles exist, and only
  experts that received tokens own tiles (the others are never read). Unused tiles carry expert ``-1`` and
  return at once. Kernel 1 (``w13``): per (tile, I-block) the w1 and w3 tiles of the tile's expert are decoded
  and multiplied against the tile's token rows (gathered from ``x`` inside the kernel), and the epilogue
  applies the global scales, the clipped SwiGLU and the routing weight, writing ``h [R, I]`` in bf16. Kernel 2
  (``w2``): per (tile, D-block) ``h_tile @ w2[e]^T * weight_scale_2`` in fp32; the pairs are then summed per
  token by one XLA gather + reduction.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from dsv4_jax import quant
from dsv4_jax.config import swiglu_bound

from . import nvfp4_mgpu
from .nvfp4_layout import UNDO_DECODE_SCALE, Nvfp4Packed, decode_asm, decode_int, decode_tile, unpack_nvfp4

PAIRWISE_MAX = 32


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """Tiles of the two grouped kernels; ``bm`` rows per tile (16 for decode); ``schedule``: ``"pairs"`` (the
    decode schedule) or ``"sorted"``; ``split13`` / ``split2``: K splits of the decode schedule's w13 / w2
    kernels (the sorted schedule does not split K; ``swap_ab`` applies to it only).

    ``"mgpu_pairs"`` / ``"mgpu_sorted"``: the Mosaic GPU kernels of :mod:`pallas_kernels.nvfp4_mgpu` (Hopper
    only) with the same two schedules, ``bm`` rows per block of the sorted one (a multiple of 8, at most 64),
    ``bk`` their pipeline step (128, 256 or 512 columns), ``split13`` / ``split2`` their K splits (0: the
    kernel's default), ``num_stages`` their pipeline depth."""

    bm: int = 16
    bn13: int = 64
    bn2: int = 64
    bk: int = 256
    split13: int = 4
    split2: int = 2
    schedule: str = "pairs"
    fma: bool = False
    swap_ab: bool = True
    num_warps: int = 4
    num_stages: int = 4
    decode: str = "asm"


def mgpu_config(pairs: int) -> MoeConfig | None:
    """The Mosaic GPU schedule where it measured faster than the Triton kernels (H200, 256 experts of Flash's
    shape, BENCHMARKS.md, session 8), or None: one block per pair to 32 pairs (batch 1: 42.0 against 55.2 us),
    then blocks of 8 sorted rows to 64 tokens (966 against 1942 us), 16 rows to 256 tokens (1633 against
    2456 with 256-column steps), 32 rows to 1024 tokens (2850 against 3371, idem); pipeline steps of 512
    columns, 2 stages."""
    if pairs <= PAIRWISE_MAX:
        return MoeConfig(schedule="mgpu_pairs", bk=512, split13=1, split2=1, num_stages=2)
    for rows, most in ((8, 6 * 64), (16, 6 * 256), (32, 6 * 1024)):
        if pairs <= most:
            return MoeConfig(schedule="mgpu_sorted", bm=rows, bk=512, split13=0, split2=0, num_stages=2)
    return None


def default_config(pairs: int, *, mgpu: bool = True) -> MoeConfig:
    """Per-size configuration (H200 measurements, BENCHMARKS.md). Decode schedule with CUDA-core rows and long
    K steps (16 rows x 512 bytes of codes per step): batch 1 (6 pairs) 55.2 us with bn 16, bk 1024, split13 2 /
    split2 1, 4 warps, 3 stages (58.1 with bn 32, bk 256, split13 4 / split2 2; tensor-core tiles 81.3; 8 warps
    61-154); 4 tokens (24 pairs) 184.0 us (205 with bn 64, bk 256). From 16 tokens the sorted schedule, which
    reads an expert shared by several tokens once, wins (823 against 1021 us with tensor-core tiles). On
    Hopper the Mosaic GPU schedules where they measured faster (:func:`mgpu_config`; ``mgpu=False``: never)."""
    if mgpu and nvfp4_mgpu.available() and (cfg := mgpu_config(pairs)) is not None:
        return cfg
    if pairs <= PAIRWISE_MAX:
        return MoeConfig(bn13=16, bn2=16, bk=1024, split13=2, split2=1, num_stages=3, fma=True)
    if pairs <= 4096:
        return MoeConfig(bm=16, bn13=64, bn2=64, bk=256, schedule="sorted", swap_ab=True, num_stages=4)
    return MoeConfig(bm=64, bn13=64, bn2=128, bk=128, schedule="sorted", swap_ab=False, num_warps=4, num_stages=3)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Row slots of the grouped kernels. ``tile_expert [n_tiles]`` (-1: unused), ``row_token [R]`` (-1:
    padding), ``row_weight [R]`` fp32, ``pair_slot [P]`` (slot of pair ``t*k + j``)."""

    tile_expert: jax.Array
    row_token: jax.Array
    row_weight: jax.Array
    pair_slot: jax.Array


def make_schedule(ids: jax.Array, weights: jax.Array, n_experts: int, bm: int) -> Schedule:
    """Sorted, per-expert padded schedule of the ``[T, k]`` routing (see the module docstring)."""
    t, k = ids.shape
    p = t * k
    flat_e = ids.reshape(-1).astype(jnp.int32)
    flat_e = jnp.where(flat_e < 0, n_experts, flat_e)  # skipped pairs: a virtual last expert, never computed
    flat_w = weights.reshape(-1).astype(jnp.float32)
    order = jnp.argsort(flat_e, stable=True).astype(jnp.int32)
    sorted_e = flat_e[order]
    sizes = jnp.zeros((n_experts + 1,), jnp.int32).at[flat_e].add(1)
    padded = (sizes + bm - 1) // bm * bm
    pend = jnp.cumsum(padded)
    pstart = pend - padded
    gstart = jnp.cumsum(sizes) - sizes
    slot_sorted = pstart[sorted_e] + jnp.arange(p, dtype=jnp.int32) - gstart[sorted_e]
    n_tiles = p // bm + min(p, n_experts + 1)
    rows = n_tiles * bm
    row_token = jnp.full((rows,), -1, jnp.int32).at[slot_sorted].set(order // k)
    row_weight = jnp.zeros((rows,), jnp.float32).at[slot_sorted].set(flat_w[order])
    tile_start = jnp.arange(n_tiles, dtype=jnp.int32) * bm
    # (compare_all: one fused comparison instead of a scan of ~10 small launches at decode sizes)
    method = "compare_all" if n_tiles * (n_experts + 1) <= 1 << 24 else "scan"
    tile_expert = jnp.searchsorted(pend, tile_start, side="right", method=method).astype(jnp.int32)
    tile_expert = jnp.where(tile_expert < n_experts, tile_expert, -1)
    pair_slot = jnp.zeros((p,), jnp.int32).at[order].set(slot_sorted)
    return Schedule(tile_expert, row_token, row_weight, pair_slot)


def _dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _w13_kernel(te_ref, tok_ref, rw_ref, x_ref, q1_ref, s1_ref, g1_ref, q3_ref, s3_ref, g3_ref, h_ref, *,
                cfg: MoeConfig, t: int, d: int, kp: int, n_i: int, limit: float, decode):
    bm, bn, bkh = cfg.bm, cfg.bn13, cfg.bk // 2
    half = kp // 2
    tile, pn = pl.program_id(0), pl.program_id(1)
    e = te_ref[tile]

    @pl.when(e >= 0)
    def _():
        tok = tok_ref[pl.ds(tile * bm, bm)]
        live = tok >= 0
        tok = jnp.where(live, tok, 0)

        def load_x(start):
            # Gather of the tile's token rows: both indices as [bm, bkh] arrays (interpretable, and a plain
            # pointer tile for Triton, contiguous along K).
            cols = start + jax.lax.broadcasted_iota(jnp.int32, (bm, bkh), 1)
            rows = jnp.broadcast_to(tok[:, None], (bm, bkh))
            return plt.load(x_ref.at[rows, cols], mask=live[:, None] & (cols < d), other=0.0)

        def tiles(q_ref, s_ref, j0):
            return decode_tile(q_ref, s_ref, (e,), pl.ds(pn * bn, bn), j0, bkh, half, decode)

        def body(step, accs):
            a1, a3 = accs
            j0 = pl.multiple_of(step * bkh, bkh)
            x_lo, x_hi = load_x(j0), load_x(half + j0)
            w1_lo, w1_hi = tiles(q1_ref, s1_ref, j0)
            w3_lo, w3_hi = tiles(q3_ref, s3_ref, j0)
            if cfg.swap_ab:
                return (a1 + _dot_nt(w1_lo, x_lo) + _dot_nt(w1_hi, x_hi),
                        a3 + _dot_nt(w3_lo, x_lo) + _dot_nt(w3_hi, x_hi))
            return (a1 + _dot_nt(x_lo, w1_lo) + _dot_nt(x_hi, w1_hi),
                    a3 + _dot_nt(x_lo, w3_lo) + _dot_nt(x_hi, w3_hi))

        shape = (bn, bm) if cfg.swap_ab else (bm, bn)
        zero = jnp.zeros(shape, jnp.float32)
        a1, a3 = jax.lax.fori_loop(0, kp // cfg.bk, body, (zero, zero))
        if cfg.swap_ab:
            a1, a3 = a1.T, a3.T
        # ARCHITECTURE.md §8.2: SiLU(min(a, L)) * clamp(u, -L, L), then the routing weight (moe.expert_ffn).
        a = jnp.minimum(a1 * (g1_ref[e] * UNDO_DECODE_SCALE), limit)
        u = jnp.clip(a3 * (g3_ref[e] * UNDO_DECODE_SCALE), -limit, limit)
        rw = rw_ref[pl.ds(tile * bm, bm)]
        h = a / (1.0 + jnp.exp(-a)) * u * rw[:, None]
        cols = pn * bn + jax.lax.broadcasted_iota(jnp.int32, (bn,), 0)
        plt.store(h_ref.at[pl.ds(tile * bm, bm), pl.ds(pn * bn, bn)], h.astype(h_ref.dtype),
                  mask=jnp.broadcast_to((cols < n_i)[None, :], (bm, bn)))


def _w2_kernel(te_ref, h_ref, q_ref, s_ref, g_ref, y_ref, *, cfg: MoeConfig, i: int, kp: int, n_d: int,
               decode):
    bm, bn, bkh = cfg.bm, cfg.bn2, cfg.bk // 2
    half = kp // 2
    tile, pn = pl.program_id(0), pl.program_id(1)
    e = te_ref[tile]

    @pl.when(e >= 0)
    def _():
        def load_h(start):
            ref = h_ref.at[pl.ds(tile * bm, bm), pl.ds(start, bkh)]
            if i == kp:
                return ref[...]
            cols = start + jax.lax.broadcasted_iota(jnp.int32, (bkh,), 0)
            return plt.load(ref, mask=jnp.broadcast_to((cols < i)[None, :], (bm, bkh)), other=0.0)

        def body(step, acc):
            j0 = pl.multiple_of(step * bkh, bkh)
            w_lo, w_hi = decode_tile(q_ref, s_ref, (e,), pl.ds(pn * bn, bn), j0, bkh, half, decode)
            h_lo, h_hi = load_h(j0), load_h(half + j0)
            if cfg.swap_ab:
                return acc + _dot_nt(w_lo, h_lo) + _dot_nt(w_hi, h_hi)
            return acc + _dot_nt(h_lo, w_lo) + _dot_nt(h_hi, w_hi)

        shape = (bn, bm) if cfg.swap_ab else (bm, bn)
        acc = jax.lax.fori_loop(0, kp // cfg.bk, body, jnp.zeros(shape, jnp.float32))
        if cfg.swap_ab:
            acc = acc.T
        cols = pn * bn + jax.lax.broadcasted_iota(jnp.int32, (bn,), 0)
        plt.store(y_ref.at[pl.ds(tile * bm, bm), pl.ds(pn * bn, bn)], acc * (g_ref[e] * UNDO_DECODE_SCALE),
                  mask=jnp.broadcast_to((cols < n_d)[None, :], (bm, bn)))


def _row_operand(row: jax.Array, bm: int, fma: bool) -> jax.Array:
    """One pair's activation row ``[C]`` as the right operand of :func:`_row_product`, rounded to bf16: the row
    itself in fp32 (``fma``), else row 0 of a ``[bm, C]`` tensor-core tile whose other rows are zero."""
    row = row.astype(jnp.bfloat16)
    if fma:
        return row.astype(jnp.float32)
    first = jax.lax.broadcasted_iota(jnp.int32, (bm, row.shape[0]), 0) == 0
    return jnp.where(first, row[None, :], jnp.zeros((), jnp.bfloat16))


def _row_product(w: jax.Array, row: jax.Array, fma: bool) -> jax.Array:
    """Decoded weight tile ``[bn, C]`` times one activation row: ``[bn]`` fp32 on the CUDA cores (``fma``), or
    ``[bn, bm]`` from the tensor cores (column 0 live)."""
    if fma:
        return jnp.sum(w.astype(jnp.float32) * row[None, :], axis=1)
    return _dot_nt(w, row)


def _row_zero(bn: int, bm: int, fma: bool) -> jax.Array:
    """The zero accumulator of :func:`_row_product`: ``[bn]`` (``fma``) or ``[bn, bm]``."""
    return jnp.zeros((bn,) if fma else (bn, bm), jnp.float32)


def _row_result(acc: jax.Array) -> jax.Array:
    """The ``[bn]`` result of accumulated :func:`_row_product`: columns 1.. of a tensor-core accumulator are
    exact zeros (zero activation rows), so the row sum is column 0."""
    return acc if acc.ndim == 1 else jnp.sum(acc, axis=1)


def _pair_w13_kernel(e_ref, x_ref, q1_ref, s1_ref, q3_ref, s3_ref, a1_ref, a3_ref, *, cfg: MoeConfig, top_k: int,
                     d: int, kp: int, n_i: int, steps: int, decode):
    bm, bn, bkh = cfg.bm, cfg.bn13, cfg.bk // 2
    half = kp // 2
    pair, pn, sk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    e = e_ref[pair]  # -1: a skipped pair (zeros written, no weight read)
    tok = pair // top_k

    def load_x(start):
        ref = x_ref.at[tok, pl.ds(start, bkh)]
        if d == kp:
            row = ref[...]
        else:
            cols = start + jax.lax.broadcasted_iota(jnp.int32, (bkh,), 0)
            row = plt.load(ref, mask=cols < d, other=0.0)
        return _row_operand(row, bm, cfg.fma)

    def tiles(q_ref, s_ref, j0):
        return decode_tile(q_ref, s_ref, (e,), pl.ds(pn * bn, bn), j0, bkh, half, decode)

    def body(t, accs):
        a1, a3 = accs
        j0 = pl.multiple_of((sk * steps + t) * bkh, bkh)
        x_lo, x_hi = load_x(j0), load_x(half + j0)
        w1_lo, w1_hi = tiles(q1_ref, s1_ref, j0)
        w3_lo, w3_hi = tiles(q3_ref, s3_ref, j0)
        mv = functools.partial(_row_product, fma=cfg.fma)
        return (a1 + mv(w1_lo, x_lo) + mv(w1_hi, x_hi), a3 + mv(w3_lo, x_lo) + mv(w3_hi, x_hi))

    cols = pn * bn + jax.lax.broadcasted_iota(jnp.int32, (bn,), 0)

    @pl.when(e >= 0)
    def _():
        zero = _row_zero(bn, bm, cfg.fma)
        a1, a3 = jax.lax.fori_loop(0, steps, body, (zero, zero))
        plt.store(a1_ref.at[sk, pair, pl.ds(pn * bn, bn)], _row_result(a1), mask=cols < n_i)
        plt.store(a3_ref.at[sk, pair, pl.ds(pn * bn, bn)], _row_result(a3), mask=cols < n_i)

    @pl.when(e < 0)
    def _():
        zero = jnp.zeros((bn,), jnp.float32)
        plt.store(a1_ref.at[sk, pair, pl.ds(pn * bn, bn)], zero, mask=cols < n_i)
        plt.store(a3_ref.at[sk, pair, pl.ds(pn * bn, bn)], zero, mask=cols < n_i)


def _pair_w2_kernel(e_ref, rw_ref, a1_ref, a3_ref, g1_ref, g3_ref, q_ref, s_ref, g2_ref, y_ref, *, cfg: MoeConfig,
                    i: int, kp: int, n_d: int, steps: int, limit: float, decode):
    bm, bn, bkh = cfg.bm, cfg.bn2, cfg.bk // 2
    half = kp // 2
    pair, pn, sk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    e_raw = e_ref[pair]  # -1: a skipped pair (zeros written, no weight read)
    e = jnp.maximum(e_raw, 0)
    g1 = g1_ref[e] * UNDO_DECODE_SCALE
    g3 = g3_ref[e] * UNDO_DECODE_SCALE
    rw = rw_ref[pair]

    def partial_sum(ref, start):
        def one(s):
            r = ref.at[jnp.int32(s), pair, pl.ds(start, bkh)]
            if i == kp:
                return r[...]
            cols = start + jax.lax.broadcasted_iota(jnp.int32, (bkh,), 0)
            return plt.load(r, mask=cols < i, other=0.0)

        tot = one(0)
        for s in range(1, cfg.split13):
            tot = tot + one(s)
        return tot

    def hidden(start):
        # ARCHITECTURE.md §8.2: SiLU(min(a, L)) * clamp(u, -L, L) times the routing weight (moe.expert_ffn),
        # rounded to bf16 (the product's operand); padding columns have a = u = 0, so h = 0.
        a = jnp.minimum(partial_sum(a1_ref, start) * g1, limit)
        u = jnp.clip(partial_sum(a3_ref, start) * g3, -limit, limit)
        return _row_operand(a / (1.0 + jnp.exp(-a)) * u * rw, bm, cfg.fma)

    def body(t, acc):
        j0 = pl.multiple_of((sk * steps + t) * bkh, bkh)
        w_lo, w_hi = decode_tile(q_ref, s_ref, (e,), pl.ds(pn * bn, bn), j0, bkh, half, decode)
        mv = functools.partial(_row_product, fma=cfg.fma)
        return acc + mv(w_lo, hidden(j0)) + mv(w_hi, hidden(half + j0))

    cols = pn * bn + jax.lax.broadcasted_iota(jnp.int32, (bn,), 0)

    @pl.when(e_raw >= 0)
    def _():
        acc = jax.lax.fori_loop(0, steps, body, _row_zero(bn, bm, cfg.fma))
        plt.store(y_ref.at[sk, pair, pl.ds(pn * bn, bn)],
                  _row_result(acc) * (g2_ref[e] * UNDO_DECODE_SCALE), mask=cols < n_d)

    @pl.when(e_raw < 0)
    def _():
        plt.store(y_ref.at[sk, pair, pl.ds(pn * bn, bn)], jnp.zeros((bn,), jnp.float32), mask=cols < n_d)


def _fit(bn: int, np_: int) -> int:
    while np_ % bn:
        bn //= 2
    return bn


def _fit_split(split: int, kp: int, bk: int) -> int:
    while kp % (bk * split):
        split //= 2
    return split


def _moe_pairs(x, ids, weights, w1: Nvfp4Packed, w2: Nvfp4Packed, w3: Nvfp4Packed, limit: float, cfg: MoeConfig,
               decode, interpret: bool):
    """Decode schedule (module docstring): one row tile per (token, expert) pair, split K, no sort."""
    t, top_k = ids.shape
    d = x.shape[1]
    p, n_i = t * top_k, w1.n
    pair_e = ids.reshape(-1).astype(jnp.int32)
    params = plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    s13, s2 = cfg.split13, cfg.split2
    part = jax.ShapeDtypeStruct((s13, p, n_i), jnp.float32)
    k1 = functools.partial(_pair_w13_kernel, cfg=cfg, top_k=top_k, d=d, kp=w1.kp, n_i=n_i,
                           steps=w1.kp // (cfg.bk * s13), decode=decode)
    a1, a3 = pl.pallas_call(
        k1, out_shape=(part, part), grid=(p, w1.np_ // cfg.bn13, s13), interpret=interpret,
        compiler_params=params, name="nvfp4_moe_pairs_w13",
    )(pair_e, x.astype(jnp.bfloat16), w1.qweight, w1.scale, w3.qweight, w3.scale)
    k2 = functools.partial(_pair_w2_kernel, cfg=cfg, i=n_i, kp=w2.kp, n_d=d, steps=w2.kp // (cfg.bk * s2),
                           limit=limit, decode=decode)
    y = pl.pallas_call(
        k2, out_shape=jax.ShapeDtypeStruct((s2, p, d), jnp.float32), grid=(p, w2.np_ // cfg.bn2, s2),
        interpret=interpret, compiler_params=params, name="nvfp4_moe_pairs_w2",
    )(pair_e, weights.reshape(-1).astype(jnp.float32), a1, a3, w1.weight_scale_2, w3.weight_scale_2, w2.qweight,
      w2.scale, w2.weight_scale_2)
    return y.reshape(s2, t, top_k, d).sum(axis=(0, 2))


def _moe_sorted(x, ids, weights, w1: Nvfp4Packed, w2: Nvfp4Packed, w3: Nvfp4Packed, limit: float,
                cfg: MoeConfig, decode, interpret: bool):
    """Sorted schedule (module docstring): row tiles of one expert each."""
    t, d = x.shape
    n_e, n_i = w1.qweight.shape[0], w1.n
    sched = make_schedule(ids, weights, n_e, cfg.bm)
    n_tiles = sched.tile_expert.shape[0]
    rows = n_tiles * cfg.bm
    params = plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    k1 = functools.partial(_w13_kernel, cfg=cfg, t=t, d=d, kp=w1.kp, n_i=n_i, limit=limit, decode=decode)
    h = pl.pallas_call(
        k1, out_shape=jax.ShapeDtypeStruct((rows, n_i), jnp.bfloat16), grid=(n_tiles, w1.np_ // cfg.bn13),
        interpret=interpret, compiler_params=params, name="nvfp4_moe_w13",
    )(sched.tile_expert, sched.row_token, sched.row_weight, x.astype(jnp.bfloat16), w1.qweight, w1.scale,
      w1.weight_scale_2, w3.qweight, w3.scale, w3.weight_scale_2)
    k2 = functools.partial(_w2_kernel, cfg=cfg, i=n_i, kp=w2.kp, n_d=d, decode=decode)
    y = pl.pallas_call(
        k2, out_shape=jax.ShapeDtypeStruct((rows, d), jnp.float32), grid=(n_tiles, w2.np_ // cfg.bn2),
        interpret=interpret, compiler_params=params, name="nvfp4_moe_w2",
    )(sched.tile_expert, h, w2.qweight, w2.scale, w2.weight_scale_2)
    y = jnp.where((ids.reshape(-1) >= 0)[:, None], y[sched.pair_slot], 0.0)  # skipped pairs' rows are unwritten
    return y.reshape(t, ids.shape[1], d).sum(axis=1)


@functools.partial(jax.jit, static_argnames=("limit", "cfg", "interpret"))
def _moe(x, ids, weights, w1: Nvfp4Packed, w2: Nvfp4Packed, w3: Nvfp4Packed, limit: float, cfg: MoeConfig,
         interpret: bool):
    d = x.shape[1]
    n_i = w1.n
    if w3.n != n_i or w1.k != d or w3.k != d or w2.k != n_i or w2.n != d:
        raise ValueError(f"expert shapes w1 {w1.shape}, w3 {w3.shape}, w2 {w2.shape} do not match D={d}")
    if cfg.schedule in ("mgpu_pairs", "mgpu_sorted"):
        def tiles(split):
            return nvfp4_mgpu.MgpuConfig.from_step(cfg.bk, split or None, cfg.num_stages)

        mcfg = nvfp4_mgpu.MoeMgpuConfig(schedule=cfg.schedule[5:], rows=cfg.bm, w13=tiles(cfg.split13),
                                         w2=tiles(cfg.split2))
        return nvfp4_mgpu.nvfp4_moe_mgpu(x, ids, weights, w1, w2, w3, limit, config=mcfg, interpret=interpret)
    bk = min(cfg.bk, w1.kp, w2.kp)
    while (w1.kp % bk or w2.kp % bk) and bk > 32:  # a long default step that does not divide a padded input
        bk //= 2
    cfg = dataclasses.replace(cfg, bn13=_fit(cfg.bn13, w1.np_), bn2=_fit(cfg.bn2, w2.np_), bk=bk,
                              split13=_fit_split(cfg.split13, w1.kp, bk), split2=_fit_split(cfg.split2, w2.kp, bk))
    if w1.kp % cfg.bk or w2.kp % cfg.bk:
        raise ValueError(f"bk={cfg.bk} does not divide the padded inputs {w1.kp}, {w2.kp}")
    decode = decode_int if (interpret or cfg.decode == "int") else decode_asm
    if cfg.schedule not in ("pairs", "sorted"):
        raise ValueError(f"unknown schedule {cfg.schedule!r}")
    run = _moe_pairs if cfg.schedule == "pairs" else _moe_sorted
    return run(x, ids, weights, w1, w2, w3, limit, cfg, decode, interpret)


def nvfp4_moe(x: jax.Array, ids: jax.Array, weights: jax.Array, w1: Nvfp4Packed, w2: Nvfp4Packed,
              w3: Nvfp4Packed, swiglu_limit: float, *, config: MoeConfig | None = None,
              interpret: bool = False) -> jax.Array:
    """Routed experts, fp32 ``[T, D]``. ``x [T, D]`` (cast to bf16), ``ids, weights [T, k]``; stacked
    packed weights ``w1, w3 [E, I, D]``, ``w2 [E, D, I]``; ``swiglu_limit <= 0``: no clip (the official code's
    meaning)."""
    t, k = ids.shape
    if t == 0:
        return jnp.zeros((0, x.shape[1]), jnp.float32)
    cfg = config or default_config(t * k)
    if cfg.schedule.startswith("mgpu") and config is None and not nvfp4_mgpu.moe_supported(w1, w2):
        cfg = default_config(t * k, mgpu=False)
    return _moe(x, ids, weights, w1, w2, w3, swiglu_bound(swiglu_limit), cfg, interpret)


def nvfp4_moe_reference(x: jax.Array, ids: jax.Array, weights: jax.Array, w1: quant.Nvfp4, w2: quant.Nvfp4,
                        w3: quant.Nvfp4, swiglu_limit: float) -> jax.Array:
    """Reference (``moe.routed_experts`` in bf16 compute): per (token, expert) pair, exact bf16 weights,
    fp32 accumulation, global scales on the accumulators, routing weight on the hidden before w2."""
    lim = swiglu_bound(swiglu_limit)

    def one(xi, e, wi):
        def lin(v, w):
            we = jax.tree.map(lambda a: a[e], w)
            return quant.linear(v, we, jnp.bfloat16, jnp.float32)

        a = jnp.minimum(lin(xi, w1), lim)
        u = jnp.clip(lin(xi, w3), -lim, lim)
        h = jax.nn.silu(a) * u * wi
        return lin(h.astype(jnp.bfloat16), w2)

    t, k = ids.shape
    flat = ids.reshape(-1)
    ys = jax.vmap(one)(jnp.repeat(x, k, axis=0), jnp.maximum(flat, 0), weights.reshape(-1))
    ys = jnp.where((flat >= 0)[:, None], ys, 0.0)  # -1: a pair of another shard's expert
    return ys.reshape(t, k, -1).sum(axis=1)


def reference_from_packed(x, ids, weights, w1: Nvfp4Packed, w2: Nvfp4Packed, w3: Nvfp4Packed,
                          swiglu_limit: float) -> jax.Array:
    """:func:`nvfp4_moe_reference` on packed weights."""
    return nvfp4_moe_reference(x, ids, weights, unpack_nvfp4(w1), unpack_nvfp4(w2), unpack_nvfp4(w3),
                               swiglu_limit)
