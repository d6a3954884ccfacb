"""Lightning Indexer scoring and exact top-k selection (ARCHITECTURE.md §7.2-7.4) in Pallas-Triton, with the
pure-JAX references (``dsv4_jax.indexer``).

Scoring: ``score[b, t, c] = sum_h w[b, t, h] * ReLU(q[b, t, h] . K[b, c])`` rounded to bf16 (§7.4), rows that
are not yet eligible (``c >= (pos + 1) // ratio``) set to -inf. One program scores ``bt`` query tokens against
``nk`` blocks of ``bk`` index rows, skipping (writing -inf for) the blocks no token of the program may see yet;
``bt = 1`` for decode, larger in prefill. Each product is ``[bk rows, d_I] x [d_I, H_I heads]``: the heads lie
on the matmul's N axis, so the weighted head sum stays inside each thread and its quad.

Selection (exact, ties to the lower row index as ``lax.top_k``): bf16 scores map to 16-bit keys whose integer
order is the float total order (-inf and padding: key -1, never counted). A radix search finds the k-th largest
key ``tau`` ``bits`` bits per pass: each pass counts, per chunk of the row, the keys ``>=`` each of its
``2^bits`` candidate thresholds (each thread histograms its keys' next digit in registers, 8-bit bins packed
four to an int32, summed across the threads once a chunk); every program of the next pass first derives
``tau`` so far from the previous passes' counts (a few hundred integers), so no XLA step runs between passes.
The counts also give, per chunk, the keys above ``tau`` and the ties with it (``count(>= tau + 1)`` is a
candidate of the last pass whose digit is not all ones), so a last pass writes the selected row indices,
ascending, straight to their slots: keys above ``tau`` and ties in index order (in-block cumulative sums, chunk
offsets from prefix sums of the counts). ``16 / bits + 1`` launches over the bf16 scores, no sort, no mask; a
row's columns past its eligible count (the causal tail of a prefill) are not read.
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
    """Scoring tiles (``bt`` tokens x ``nk`` blocks of ``bk`` rows per program) and the selection's radix
    (``bits`` per pass) and chunk (``chunk`` scores per program, walked in blocks of ``bs``)."""

    bt: int = 1
    bk: int = 128
    nk: int = 4
    chunk: int = 8192
    bs: int = 1024
    bits: int = 4
    num_warps: int = 4
    num_stages: int = 2


def default_config(t: int, r: int, batch: int = 1) -> IndexConfig:
    """Decode scores one token per program (64 key rows x 8 blocks) and counts in chunks of 1024-4096 scores
    (about 256 chunks over the batch); prefill scores two tokens per program (2 x 64 heads on the matmul's N
    axis, 16 blocks of 128 key rows). Chosen with ``scripts/bench_attention.py --sweep-indexer`` on an H200
    (BENCHMARKS.md)."""
    bs = min(1024, pl.next_power_of_2(max(r, 16)))
    if t == 1:
        chunk = max(min(bs, 512), min(4096, max(1024, pl.next_power_of_2(pl.cdiv(batch * r, 256))),
                                      pl.next_power_of_2(r)))
        return IndexConfig(bt=1, bk=64, nk=8, chunk=chunk, bs=min(bs, 512))
    return IndexConfig(bt=2, bk=128, nk=16, chunk=max(bs, min(8192, pl.next_power_of_2(r))), bs=bs)


def index_scores_reference(q: jax.Array, w: jax.Array, keys: jax.Array, positions: jax.Array, ratio: int,
                           dtype=jnp.bfloat16) -> jax.Array:
    """``dsv4_jax.indexer.index_scores`` with ineligible rows at -inf: ``[B, T, R]`` fp32 (bf16 values)."""
    s = index_scores(q, w, keys, dtype)
    return jnp.where(jnp.arange(keys.shape[1]) < ((positions + 1) // ratio)[..., None], s, -jnp.inf)


def index_select_reference(q: jax.Array, w: jax.Array, keys: jax.Array, positions: jax.Array, ratio: int,
                           top_k: int, dtype=jnp.bfloat16) -> jax.Array:
    """``select(index_scores(...))``: bool ``[B, T, R]``."""
    return select(index_scores(q, w, keys, dtype), positions, ratio, top_k)


def mask_to_indices(mask: jax.Array, k: int) -> jax.Array:
    """The selected rows of ``mask [..., R]`` (at most ``k``) as ascending indices padded with -1: ``[..., k]``
    int32, the layout :func:`index_select` returns."""
    r = mask.shape[-1]
    key = jnp.where(mask, jnp.arange(r, dtype=jnp.int32), r)
    idx = -jax.lax.top_k(-key, min(k, r))[0]
    idx = jnp.where(idx < r, idx, -1)
    return jnp.pad(idx, [(0, 0)] * (idx.ndim - 1) + [(0, k - idx.shape[-1])], constant_values=-1)


def indices_to_mask(idx: jax.Array, r: int) -> jax.Array:
    """Inverse of :func:`mask_to_indices`: ``[..., k]`` (-1 = none) -> bool ``[..., R]``."""
    flat = idx.reshape(-1, idx.shape[-1])
    rows = jnp.arange(flat.shape[0])[:, None]
    mask = jnp.zeros((flat.shape[0], r), bool).at[rows, jnp.maximum(flat, 0)].max(flat >= 0)
    return mask.reshape(*idx.shape[:-1], r)


def _score_kernel(pos0_ref, q_ref, w_ref, k_ref, o_ref, *, t: int, h: int, r: int, ratio: int, cfg: IndexConfig):
    b, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bt, bk = cfg.bt, cfg.bk
    tok = i * bt + jax.lax.broadcasted_iota(jnp.int32, (bt,), 0)
    lim_max = jnp.minimum((pos0_ref[b] + jnp.minimum(i * bt + bt - 1, t - 1) + 1) // ratio, r)
    base = j * cfg.nk * bk
    n_eff = jnp.minimum(jnp.maximum(pl.cdiv(lim_max - base, bk), 0), cfg.nk)  # blocks some token may see
    # Key rows on the matmul's M axis, one token's heads on N: the head sum is a row sum inside each thread's
    # registers and its quad. (Heads on M, as one [bt * H, bk] product, sum across warps: 1.5-1.8x slower.)
    toks = [i * bt + u for u in range(bt)]
    qs = [plt.load(q_ref.at[b, pl.ds(jnp.minimum(tk, t - 1) * h, h), :]) for tk in toks]
    ws = [plt.load(w_ref.at[b, pl.ds(jnp.minimum(tk, t - 1) * h, h)]) for tk in toks]

    def store(off, c, s):
        plt.store(o_ref.at[b, pl.ds(i * bt, bt), pl.ds(off, bk)], s.astype(o_ref.dtype),
                  mask=(tok < t)[:, None] & (c < r)[None, :])

    def score(kb, carry):
        off = base + kb * bk
        c = off + jax.lax.broadcasted_iota(jnp.int32, (bk,), 0)
        k = plt.load(k_ref.at[b, pl.ds(off, bk), :], mask=(c < r)[:, None], other=0.0)
        for tk, qt, wk in zip(toks, qs, ws):
            s = jax.lax.dot_general(k, qt, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            s = jnp.sum(jnp.maximum(s, 0.0) * wk[None, :], axis=1)
            s = jnp.where(c < (pos0_ref[b] + tk + 1) // ratio, s.astype(o_ref.dtype), -jnp.inf)
            plt.store(o_ref.at[b, jnp.minimum(tk, t - 1), pl.ds(off, bk)], s.astype(o_ref.dtype),
                      mask=(c < r) & (tk < t))
        return carry

    def fill(kb, carry):
        off = base + kb * bk
        c = off + jax.lax.broadcasted_iota(jnp.int32, (bk,), 0)
        store(off, c, jnp.full((bt, bk), -jnp.inf, jnp.float32))
        return carry

    jax.lax.fori_loop(0, n_eff, score, 0)
    jax.lax.fori_loop(n_eff, cfg.nk, fill, 0)


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
        grid=(b, pl.cdiv(t, cfg.bt), pl.cdiv(r, cfg.bk * cfg.nk)), interpret=interpret, name="indexer_scores",
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    )(pos0.astype(jnp.int32), q.reshape(b, t * h, d).astype(jnp.bfloat16), w.reshape(b, t * h).astype(jnp.float32),
      keys.astype(jnp.bfloat16))


def _keys(x: jax.Array, valid: jax.Array) -> jax.Array:
    """bf16 -> int32 in [0, 0xFFFF] ordered as the floats (total order: -0 < +0); -inf and ``~valid``: -1."""
    u = jax.lax.bitcast_convert_type(x, jnp.int16).astype(jnp.int32) & 0xFFFF
    kk = jnp.where(u >= 0x8000, 0xFFFF - u, u + 0x8000)
    return jnp.where(valid & (kk > _NEG_INF_KEY), kk, -1)


def _shifts(bits: int) -> list[int]:
    return list(range(16 - bits, -1, -bits))


def _radix_state(n, prev_refs, top_k: int, bits: int, n_c: int):
    """``tau`` after the passes whose per-chunk counts are ``prev_refs`` (each ``[N, Cp, 2^bits]``), the last
    pass's per-chunk counts of keys ``>= tau`` and (so far) ``>= tau + 1``: ``(tau, ge [Cp], gt [Cp])``."""
    nc = 1 << bits
    cp = prev_refs[0].shape[1]
    ci = jax.lax.broadcasted_iota(jnp.int32, (cp,), 0)
    lane = jax.lax.broadcasted_iota(jnp.int32, (cp, nc), 1)
    tau = jnp.int32(0)
    ge = gt = jnp.zeros((cp,), jnp.int32)
    for ref, shift in zip(prev_refs, _shifts(bits)):
        pc = plt.load(ref.at[n, pl.ds(0, cp), pl.ds(0, nc)], mask=(ci < n_c)[:, None], other=0)
        tot = jnp.sum(pc, axis=0)
        j = jnp.maximum(jnp.sum((tot >= top_k).astype(jnp.int32)) - 1, 0)
        tau = tau + (j << shift)
        ge = jnp.sum(jnp.where(lane == j, pc, 0), axis=1)
        last = (j == nc - 1).astype(jnp.int32)  # digit all ones: tau + 1 is a candidate of an earlier pass
        gt = last * gt + (1 - last) * jnp.sum(jnp.where(lane == j + 1, pc, 0), axis=1)
    return tau, ge, gt


def _count_kernel(s_ref, lim_ref, *refs, r: int, top_k: int, shift: int, n_c: int, cfg: IndexConfig):
    *prev_refs, o_ref = refs
    n, c = pl.program_id(0), pl.program_id(1)
    nc = 1 << cfg.bits
    tau = _radix_state(n, prev_refs, top_k, cfg.bits, n_c)[0] if prev_refs else jnp.int32(0)
    lim = jnp.minimum(lim_ref[n], r)  # columns past it are -inf: not read

    nl, per = _lanes(cfg)
    lane = jax.lax.broadcasted_iota(jnp.int32, (nl,), 0)
    words = max(1, nc // 4)

    def body(i, acc):
        # A histogram of the keys' next digit (keys above the digit's range in the top bin, keys below tau in
        # none) in each thread's registers: 8-bit bins packed four to an int32, summed across the threads once
        # at the end. (Comparing each key with every candidate and summing across the block every step costs
        # ~4 instructions per key and candidate, a warp reduction per candidate and a barrier.)
        for a in range(per):
            off = c * cfg.chunk + i * cfg.bs + a * nl
            ok = off + lane < lim
            kk = _keys(plt.load(s_ref.at[n, pl.ds(off, nl)], mask=ok, other=-jnp.inf), ok)
            e = jnp.minimum((kk - tau) >> shift, nc - 1)  # < 0 below tau (and for -1, no key)
            inc = 1 << ((e & 3) << 3)
            acc = tuple(x + jnp.where(e >> 2 == k, inc, 0) for k, x in enumerate(acc))
        return acc

    acc = jax.lax.fori_loop(0, _blocks(lim, c, cfg), body, (jnp.zeros((nl,), jnp.int32),) * words)
    row = jax.lax.broadcasted_iota(jnp.int32, (nc, nl), 0)
    packed = sum(jnp.where(row >> 2 == k, x[None, :], 0) for k, x in enumerate(acc))
    hist = jnp.sum((packed >> ((row & 3) << 3)) & 0xFF, axis=1)
    cand, bins = jax.lax.broadcasted_iota(jnp.int32, (nc, nc), 0), jax.lax.broadcasted_iota(jnp.int32, (nc, nc), 1)
    o_ref[n, c, :] = jnp.sum(jnp.where(bins >= cand, hist[None, :], 0), axis=1)  # keys >= each candidate


def _lanes(cfg: IndexConfig) -> tuple[int, int]:
    """A block of ``bs`` scores as ``[lanes, per lane]``: one row per thread where the block allows."""
    nl = min(cfg.bs, 32 * cfg.num_warps)
    return nl, cfg.bs // nl


def _blocks(lim, c, cfg: IndexConfig):
    """Blocks of ``bs`` columns of chunk ``c`` before the limit."""
    return jnp.minimum(jnp.maximum(pl.cdiv(lim - c * cfg.chunk, cfg.bs), 0), cfg.chunk // cfg.bs)


def _write_kernel(s_ref, lim_ref, *refs, r: int, top_k: int, n_c: int, cfg: IndexConfig):
    *prev_refs, o_ref = refs
    n, c = pl.program_id(0), pl.program_id(1)
    lim = jnp.minimum(lim_ref[n], r)
    tau, ge, gt = _radix_state(n, prev_refs, top_k, cfg.bits, n_c)
    ci = jax.lax.broadcasted_iota(jnp.int32, ge.shape, 0)
    ties = ge - gt
    need = top_k - jnp.sum(gt)  # ties to take, lowest indices first
    tie0 = jnp.cumsum(ties) - ties  # ties in the chunks before
    taken = jnp.minimum(jnp.maximum(need - tie0, 0), ties)
    sel0 = jnp.cumsum(gt + taken) - (gt + taken)  # selected rows in the chunks before
    n_sel = jnp.sum(gt + taken)
    here = ci == c
    lane = jax.lax.broadcasted_iota(jnp.int32, (cfg.bs,), 0)

    def body(i, carry):
        run_tie, run_sel = carry
        off = c * cfg.chunk + i * cfg.bs
        col = off + lane
        kk = _keys(plt.load(s_ref.at[n, pl.ds(off, cfg.bs)], mask=col < lim, other=-jnp.inf), col < lim)
        tie = (kk == tau).astype(jnp.int32)
        sel = ((kk > tau) | ((tie > 0) & (run_tie + jnp.cumsum(tie) <= need))).astype(jnp.int32)
        slot = run_sel + jnp.cumsum(sel) - 1
        # Unselected lanes write to a private scratch slot past top_k (no masked scatter, no collisions).
        plt.store(o_ref.at[n, jnp.where(sel > 0, slot, top_k + lane)], col)
        return run_tie + jnp.sum(tie), run_sel + jnp.sum(sel)

    start = (jnp.sum(jnp.where(here, tie0, 0)), jnp.sum(jnp.where(here, sel0, 0)))
    jax.lax.fori_loop(0, _blocks(lim, c, cfg), body, start)

    def pad(i, carry):  # chunk 0 writes -1 into the slots past the last selected row
        slot = i * cfg.bs + lane
        plt.store(o_ref.at[n, jnp.where((slot >= n_sel) & (slot < top_k), slot, top_k + lane)],
                  jnp.full((cfg.bs,), -1, jnp.int32))
        return carry

    jax.lax.fori_loop(0, (c == 0).astype(jnp.int32) * pl.cdiv(top_k, cfg.bs), pad, 0)


@functools.partial(jax.jit, static_argnames=("top_k", "cfg", "interpret"))
def topk_indices(scores: jax.Array, limit: jax.Array | None = None, *, top_k: int, cfg: IndexConfig,
                 interpret: bool = False) -> jax.Array:
    """Exact top-k of each row of ``scores [N, R]`` (bf16 values; -inf = ineligible, never selected), ties to
    the lower index -> ascending row indices ``[N, top_k]`` int32, padded with -1 where a row has fewer than
    ``top_k`` finite scores. ``limit [N]`` (optional): row ``n``'s columns from ``limit[n]`` on are taken as
    -inf without being read (the causal tail of a prefill's scores)."""
    n, r = scores.shape
    if 16 % cfg.bits or cfg.chunk % cfg.bs:
        raise ValueError(f"bits={cfg.bits} must divide 16 and bs={cfg.bs} the chunk {cfg.chunk}")
    if cfg.chunk // (lanes := _lanes(cfg)[0]) > 255:
        raise ValueError(f"chunk={cfg.chunk} over {lanes} lanes: more than 255 scores a lane overflow the count "
                         "passes' 8-bit bins")
    scores = scores.astype(jnp.bfloat16)
    limit = jnp.full((n,), r, jnp.int32) if limit is None else jnp.asarray(limit, jnp.int32).reshape(n)
    n_c = pl.cdiv(r, cfg.chunk)
    cp = max(2, pl.next_power_of_2(n_c))
    params = plt.CompilerParams(num_warps=cfg.num_warps, num_stages=2)
    counts = []
    for shift in _shifts(cfg.bits):
        kernel = functools.partial(_count_kernel, r=r, top_k=top_k, shift=shift, n_c=n_c, cfg=cfg)
        counts.append(pl.pallas_call(
            kernel, out_shape=jax.ShapeDtypeStruct((n, cp, 1 << cfg.bits), jnp.int32), grid=(n, n_c),
            interpret=interpret, name="topk_count", compiler_params=params)(scores, limit, *counts))
    idx = pl.pallas_call(
        functools.partial(_write_kernel, r=r, top_k=top_k, n_c=n_c, cfg=cfg),
        out_shape=jax.ShapeDtypeStruct((n, top_k + cfg.bs), jnp.int32), grid=(n, n_c), interpret=interpret,
        name="topk_write", compiler_params=params)(scores, limit, *counts)
    return idx[:, :top_k]


def topk_mask(scores: jax.Array, *, top_k: int, cfg: IndexConfig, interpret: bool = False) -> jax.Array:
    """:func:`topk_indices` as a bool mask ``[N, R]`` (tests)."""
    return indices_to_mask(topk_indices(scores, top_k=top_k, cfg=cfg, interpret=interpret), scores.shape[1])


def index_select(q: jax.Array, w: jax.Array, keys: jax.Array, pos0: jax.Array, *, ratio: int, top_k: int,
                 config: IndexConfig | None = None, query_block: int = 0, interpret: bool = False,
                 mgpu: bool | None = None) -> jax.Array:
    """Kernel path of :func:`index_select_reference` for tokens at ``pos0[b] + t``, as indices: ascending
    ``[B, T, top_k]`` int32 padded with -1 (``mask_to_indices`` of the reference's mask). ``query_block > 0``
    scores and selects that many tokens at a time (bounds the ``[T, R]`` score buffer). A head count ``H_I``
    that is not a power of two of at least 16 is padded with heads of zero weight. ``mgpu``: score with the
    Mosaic GPU kernel (:mod:`pallas_kernels.indexer_mgpu`); by default where :func:`indexer_mgpu.use` says
    (prefill chunks of 64 heads on Hopper), ``False`` for the Triton scoring everywhere."""
    from . import indexer_mgpu

    b, t, h, d = q.shape
    hp = max(16, pl.next_power_of_2(h))
    if hp != h:  # Triton tiles are powers of two, a dot's side >= 16: extra heads of zero weight add nothing
        q = jnp.pad(q, ((0, 0), (0, 0), (0, hp - h), (0, 0)))
        w = jnp.pad(w, ((0, 0), (0, 0), (0, hp - h)))
    r = keys.shape[1]
    cfg = config or default_config(t, r, b)
    tb = t if query_block <= 0 else min(query_block, t)
    mgpu = indexer_mgpu.use(tb, hp, d, interpret) if mgpu is None else mgpu
    if mgpu and not indexer_mgpu.supported(hp, d, indexer_mgpu.default_config(d)):
        raise ValueError(f"the Mosaic GPU scoring takes {indexer_mgpu.HEADS} heads and d_I a multiple of 64 up to "
                         f"256; got H_I={h}, d_I={d}")
    out = []
    for t0 in range(0, t, tb):
        qb, wb = q[:, t0:t0 + tb], w[:, t0:t0 + tb]
        tt = qb.shape[1]
        if mgpu:  # padded scores, nothing written past a token's eligible rows (the top-k does not read there)
            s = indexer_mgpu.index_scores_raw(qb, wb, keys, pos0 + t0, ratio=ratio,
                                              cfg=indexer_mgpu.default_config(d), interpret=interpret)
        else:
            s = index_scores_kernel(qb, wb, keys, pos0 + t0, ratio=ratio, cfg=cfg, interpret=interpret)
        ts, rs = s.shape[1:]
        tok = jnp.arange(ts)
        lim = jnp.where(tok < tt, jnp.minimum((pos0[:, None] + t0 + tok + 1) // ratio, r), 0)  # eligible rows
        idx = topk_indices(s.reshape(b * ts, rs), lim.reshape(b * ts), top_k=top_k, cfg=cfg, interpret=interpret)
        out.append(idx.reshape(b, ts, top_k)[:, :tt])
    return out[0] if len(out) == 1 else jnp.concatenate(out, axis=1)
