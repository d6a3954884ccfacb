"""Lightning Indexer scoring and exact top-k selection (ARCHITECTURE.md §7.2-7.4) in Pallas-Triton, with the
pure-JAX references (``dsv4_jax.indexer``).

Scoring: ``score[b, t, c] = sum_h w[b, t, h] * ReLU(q[b, t, h] . K[b, c])`` rounded to bf16 (§7.4), rows that
are not yet eligible (``c >= (pos + 1) // ratio``) set to -inf. One program scores ``bt`` query tokens
(``bt * H_I`` rows of one bf16 matmul) against ``bk`` index rows; ``bt = 1`` for decode, larger in prefill.

Selection (exact, ties to the lower row index as ``lax.top_k``): bf16 scores map to 16-bit keys whose integer
order is the float total order. A radix search finds the k-th largest key ``tau`` four bits per pass (16
candidate thresholds counted per pass, in parallel over row chunks); one more count gives the keys above
``tau`` per chunk, so the number of tied keys each chunk may take follows from a prefix sum; a last pass writes
the mask (keys above ``tau``, and ties in index order through an in-block cumulative sum). Six passes over the
bf16 scores, no sort.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from dsv4_jax.indexer import index_scores, select

_NEG_INF_KEY = 0x7F  # key of bf16 -inf (0xFF80)


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    """Scoring tiles (``bt`` tokens x ``bk`` rows) and the selection's chunk (``chunk`` scores per program,
    walked in blocks of ``bs``)."""

    bt: int = 1
    bk: int = 128
    chunk: int = 8192
    bs: int = 1024
    num_warps: int = 4


def default_config(t: int, r: int) -> IndexConfig:
    """Decode scores one token per program; prefill two (128 matmul rows at 64 heads)."""
    bs = min(1024, pl.next_power_of_2(max(r, 16)))
    return IndexConfig(bt=1 if t == 1 else 2, bk=128, chunk=max(bs, min(8192, pl.next_power_of_2(r))), bs=bs)


def index_scores_reference(q: jax.Array, w: jax.Array, keys: jax.Array, positions: jax.Array, ratio: int,
                           dtype=jnp.bfloat16) -> jax.Array:
    """``dsv4_jax.indexer.index_scores`` with ineligible rows at -inf: ``[B, T, R]`` fp32 (bf16 values)."""
    s = index_scores(q, w, keys, dtype)
    return jnp.where(jnp.arange(keys.shape[1]) < ((positions + 1) // ratio)[..., None], s, -jnp.inf)


def index_select_reference(q: jax.Array, w: jax.Array, keys: jax.Array, positions: jax.Array, ratio: int,
                           top_k: int, dtype=jnp.bfloat16) -> jax.Array:
    """``select(index_scores(...))``: bool ``[B, T, R]``."""
    return select(index_scores(q, w, keys, dtype), positions, ratio, top_k)


def _score_kernel(pos0_ref, q_ref, w_ref, k_ref, o_ref, *, t: int, h: int, r: int, ratio: int, cfg: IndexConfig):
    b, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bt, bk = cfg.bt, cfg.bk
    rid = i * bt * h + jax.lax.broadcasted_iota(jnp.int32, (bt * h,), 0)
    q = plt.load(q_ref.at[b, pl.ds(i * bt * h, bt * h), :], mask=(rid < t * h)[:, None], other=0.0)
    wt = plt.load(w_ref.at[b, pl.ds(i * bt * h, bt * h)], mask=rid < t * h, other=0.0)
    c = j * bk + jax.lax.broadcasted_iota(jnp.int32, (bk,), 0)
    k = plt.load(k_ref.at[b, pl.ds(j * bk, bk), :], mask=(c < r)[:, None], other=0.0)
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    s = jnp.maximum(s, 0.0) * wt[:, None]
    s = jnp.sum(s.reshape(bt, h, bk), axis=1) if bt > 1 else jnp.sum(s, axis=0, keepdims=True)
    tok = i * bt + jax.lax.broadcasted_iota(jnp.int32, (bt,), 0)
    lim = (pos0_ref[b] + tok + 1) // ratio
    s = jnp.where(c[None, :] < lim[:, None], s.astype(o_ref.dtype), -jnp.inf)
    plt.store(o_ref.at[b, pl.ds(i * bt, bt), pl.ds(j * bk, bk)], s.astype(o_ref.dtype),
              mask=(tok < t)[:, None] & (c < r)[None, :])


@functools.partial(jax.jit, static_argnames=("ratio", "cfg", "interpret"))
def index_scores_kernel(q: jax.Array, w: jax.Array, keys: jax.Array, pos0: jax.Array, *, ratio: int,
                        cfg: IndexConfig, interpret: bool = False) -> jax.Array:
    """Scores of the tokens at ``pos0[b] + t``: ``q [B, T, H_I, d_I]``, ``w [B, T, H_I]`` fp32,
    ``keys [B, R, d_I]`` -> ``[B, T, R]`` bf16, ineligible rows -inf."""
    b, t, h, d = q.shape
    r = keys.shape[1]
    kernel = functools.partial(_score_kernel, t=t, h=h, r=r, ratio=ratio, cfg=cfg)
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((b, t, r), jnp.bfloat16),
        grid=(b, pl.cdiv(t, cfg.bt), pl.cdiv(r, cfg.bk)), interpret=interpret, name="indexer_scores",
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=2),
    )(pos0.astype(jnp.int32), q.reshape(b, t * h, d).astype(jnp.bfloat16), w.reshape(b, t * h).astype(jnp.float32),
      keys.astype(jnp.bfloat16))


def _keys(x: jax.Array) -> jax.Array:
    """bf16 -> int32 in [0, 0xFFFF] ordered as the floats (total order: -0 < +0)."""
    u = jax.lax.bitcast_convert_type(x, jnp.int16).astype(jnp.int32) & 0xFFFF
    return jnp.where(u >= 0x8000, 0xFFFF - u, u + 0x8000)


def _count_kernel(s_ref, cand_ref, o_ref, *, r: int, cfg: IndexConfig):
    n, c = pl.program_id(0), pl.program_id(1)
    cand = cand_ref[n, :]  # [16]

    def body(i, cnt):
        col = c * cfg.chunk + i * cfg.bs + jax.lax.broadcasted_iota(jnp.int32, (cfg.bs,), 0)
        x = plt.load(s_ref.at[n, pl.ds(c * cfg.chunk + i * cfg.bs, cfg.bs)], mask=col < r, other=-jnp.inf)
        kk = jnp.where(col < r, _keys(x), -1)
        return cnt + jnp.sum((kk[None, :] >= cand[:, None]).astype(jnp.int32), axis=1)

    o_ref[n, c, :] = jax.lax.fori_loop(0, cfg.chunk // cfg.bs, body, jnp.zeros((16,), jnp.int32))


def _write_kernel(s_ref, tau_ref, need_ref, before_ref, o_ref, *, r: int, cfg: IndexConfig):
    n, c = pl.program_id(0), pl.program_id(1)
    tau, need = tau_ref[n], need_ref[n]

    def body(i, run):
        off = c * cfg.chunk + i * cfg.bs
        col = off + jax.lax.broadcasted_iota(jnp.int32, (cfg.bs,), 0)
        x = plt.load(s_ref.at[n, pl.ds(off, cfg.bs)], mask=col < r, other=-jnp.inf)
        kk = _keys(x)
        tie = (kk == tau) & (col < r)
        rank = run + jnp.cumsum(tie.astype(jnp.int32))
        sel = ((kk > tau) | (tie & (rank <= need))) & (kk > _NEG_INF_KEY)
        plt.store(o_ref.at[n, pl.ds(off, cfg.bs)], sel.astype(jnp.int8), mask=col < r)
        return run + jnp.sum(tie.astype(jnp.int32))

    jax.lax.fori_loop(0, cfg.chunk // cfg.bs, body, before_ref[n, c])


@functools.partial(jax.jit, static_argnames=("top_k", "cfg", "interpret"))
def topk_mask(scores: jax.Array, *, top_k: int, cfg: IndexConfig, interpret: bool = False) -> jax.Array:
    """Exact top-k of each row of ``scores [N, R]`` (bf16 values; -inf = ineligible, never selected), ties to
    the lower index -> bool ``[N, R]``; fewer than ``top_k`` finite scores: all of them."""
    n, r = scores.shape
    scores = scores.astype(jnp.bfloat16)
    n_c = pl.cdiv(r, cfg.chunk)
    params = plt.CompilerParams(num_warps=cfg.num_warps, num_stages=2)

    def count(cand):
        return pl.pallas_call(
            functools.partial(_count_kernel, r=r, cfg=cfg), out_shape=jax.ShapeDtypeStruct((n, n_c, 16), jnp.int32),
            grid=(n, n_c), interpret=interpret, name="topk_count", compiler_params=params)(scores, cand)

    steps = jnp.arange(16, dtype=jnp.int32)
    tau = jnp.zeros((n,), jnp.int32)
    for shift in (12, 8, 4, 0):
        per_chunk = count(tau[:, None] + (steps << shift))
        j = jnp.maximum(jnp.sum(per_chunk.sum(1) >= top_k, axis=1) - 1, 0)
        tau = tau + (j << shift)
    ge = jnp.take_along_axis(per_chunk, j[:, None, None], axis=2)[..., 0]  # [N, C]: keys >= tau
    gt = count(tau[:, None] + 1 + steps)[..., 0]  # [N, C]: keys > tau
    ties = ge - gt
    need = top_k - gt.sum(1)
    before = jnp.cumsum(ties, axis=1) - ties
    mask = pl.pallas_call(
        functools.partial(_write_kernel, r=r, cfg=cfg), out_shape=jax.ShapeDtypeStruct((n, r), jnp.int8),
        grid=(n, n_c), interpret=interpret, name="topk_write", compiler_params=params,
    )(scores, tau, need, before)
    return mask.astype(bool)


def index_select(q: jax.Array, w: jax.Array, keys: jax.Array, pos0: jax.Array, *, ratio: int, top_k: int,
                 config: IndexConfig | None = None, query_block: int = 0, interpret: bool = False) -> jax.Array:
    """Kernel path of :func:`index_select_reference` for tokens at ``pos0[b] + t``: bool ``[B, T, R]``.
    ``query_block > 0`` scores and selects that many tokens at a time (bounds the ``[T, R]`` score buffer)."""
    b, t, _, _ = q.shape
    r = keys.shape[1]
    cfg = config or default_config(t, r)
    tb = t if query_block <= 0 else min(query_block, t)
    out = []
    for t0 in range(0, t, tb):
        s = index_scores_kernel(q[:, t0:t0 + tb], w[:, t0:t0 + tb], keys, pos0 + t0, ratio=ratio, cfg=cfg,
                                interpret=interpret)
        tt = s.shape[1]
        out.append(topk_mask(s.reshape(b * tt, r), top_k=min(top_k, r), cfg=cfg, interpret=interpret)
                   .reshape(b, tt, r))
    return out[0] if len(out) == 1 else jnp.concatenate(out, axis=1)
