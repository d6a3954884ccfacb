"""Window + compressed-row attention for Hopper in Mosaic GPU (``plgpu``), without a selection: the sliding-window
layers and HCA (all visible compressed rows), prefill and decode. The second backend beside the Pallas-Triton
kernel of :mod:`pallas_kernels.compressed_attention`, with the same contract and reference
(:func:`~.compressed_attention.compressed_attention_reference`); CSA's gathered rows stay with Triton.

Why a second kernel: with one shared 512-d latent (K = V) the ``64 x 512`` fp32 output accumulator of a token's 64
heads is 256 registers a thread for one warpgroup. Triton spreads it over 8 warps with a layout it chooses itself,
spills 424-448 bytes a thread, and runs one program an SM with nothing to overlap its loads and softmax
(BENCHMARKS.md, "What Triton makes of the kernels"): 150-250 TFLOP/s. Here the layout is chosen by hand:

* a program takes one token's ``H = 64`` heads (wgmma's M) against its keys at a time. In decode a token's
  compressed rows are split over ``splits`` programs for long contexts (split 0 also walks the window, so it
  takes fewer rows). In prefill one wave of resident programs walks the chunk's tokens, each every
  ``programs``-th token (which balances the growing row counts): the next token's queries load as soon as
  the last ``Q K^T`` of the current one is done, its first key tiles stream in during the current token's last
  steps, and the output leaves through the key slot of the token's last step. A program a token (session 11)
  paid about 5 µs a token for its start and end (BENCHMARKS.md, session 13);
* three warpgroups, each with its own job, so ``S = Q K^T`` is computed once:
  - a *scores* warpgroup multiplies ``S = Q K^T`` (K-dim ``d``), masks it, keeps the running maximum and sum,
    and publishes ``P = exp2(S - m)`` in bf16 (``64 x bk``) with the rescale factors ``exp2(m_old - m)``
    through two shared-memory slots;
  - two *value* warpgroups each own half of the output columns (a ``64 x d/2`` fp32 accumulator, 128 registers
    a thread at d = 512): they rescale it and add ``P @ V`` (P from shared memory, V their half of the key
    tile). Each also streams its half of the ``[bk, d]`` key tiles with TMA through ``stages`` slots: once its
    ``P @ V`` of step i is done, nothing reads that half of the slot again (the scores' ``Q K^T`` of step i
    came before P), so it refills it with step ``i + stages`` at once.
  So the scores warpgroup's ``Q K^T`` of step i + 1 and its softmax overlap the values' ``P @ V`` of step i
  (session 11; the first version had both compute warpgroups multiply the whole ``Q K^T``, 1.5x the tensor
  work, and a fourth warpgroup is no option: 512 threads leave 128 registers a thread, and the ``64 x 256``
  accumulator's wgmma needs 154);
* keys are visited as a list of ``bk``-row blocks: the ring (positions before the chunk, slot = position mod W),
  the chunk's own window rows from the token's first one, then the compressed rows
  ``c < min((pos + 1) // ratio, count)``. A block that would run past the end of its array starts earlier
  instead (``start = min(nominal, rows - bk)``) and masks the rows before its nominal start, so no copy leaves
  its array and no row is counted twice. Every mask depends on the key only (all rows of a program are one
  token), so it is a column predicate from ``iota``; a block of rows wholly visible skips it;
* shared-memory tiles are ``64`` columns wide (the 128-byte swizzle's width), so a ``[rows, 64]`` tile has the same
  bytes under ``(1, 64)`` and ``(8, 64)`` tiling (``plgpu.RefUnion``): key rows land through the ``(1, 64)``
  view, by one copy a column tile, at any row offset (Mosaic's TMA into ``(8, 64)`` tiles takes multiples of 8),
  and wgmma reads the ``(8, 64)`` view: ``Q K^T`` as a sum over the ``d / 64`` column tiles, ``P @ V`` into
  ``d / 128`` accumulators of ``64 x 64`` a warpgroup. So a token's window of W = 128 rows is two 64-key steps
  (session 16; with row offsets rounded down to multiples of 8, 7 tokens in 8 took three).

Numerics as the Triton kernel: fp32 scores and statistics (base 2, ``scale * log2 e`` folded into the scores),
bf16 ``exp2(s - m_running)`` into ``P @ V``, fp32 sums; the sink is the initial maximum of split 0 with weight
1. Each program writes its output normalised, in bf16, with its log-sum-exp (base 2); splits are merged by XLA
in fp32 (a split's rounding to bf16 adds at most 2^-9 relative to its share).

The GPU interpreter (``interpret=True``, CPU tests) runs no wgmma in a kernel of several warpgroups: there the two
products are ``jnp.dot`` of the same shared-memory tiles (the copies, barriers, masks, softmax and epilogue are
the kernel's). It runs each warpgroup as an XLA:CPU program blocking on the barriers, so XLA's CPU thread pool
must hold all three at once: at least 3 threads (``NPROC`` before jax starts; the default is one a core, and
:func:`compressed_attention_mgpu` refuses to start below 3 rather than wait forever).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
from jax import lax

from .compressed_attention import _NEG, _dot_nt, sm_count, split_blocks, window_blocks
from .fp8_matmul_mgpu import available, smem_transforms  # noqa: F401  (available: shared Hopper check)

HEADS = 64
"""Query rows of a program: one token's heads (wgmma's M); the kernel takes exactly this head count."""
SMEM_BYTES = 227 << 10
MOSAIC_RESERVED = 5 << 10
"""Shared memory Mosaic GPU adds to the kernel's own buffers (4.7 KB measured at these tiles: alignment, barriers)."""
_LOG2E = math.log2(math.e)
WARPGROUPS = 3
"""Warpgroups of a program: the scores one and two value ones."""
REGS_SCORES, REGS_VALUES = 152, 176
"""Registers a thread of each warpgroup keeps (``setmaxnreg``): the value warpgroups hold a ``64 x d/2`` fp32
accumulator (128 at d = 512). 152 + 2 x 176 = 504 of the 512 a lane of the SM's 64K leaves what the launch (168
each) left free; a first build asking for all 512 (160 + 2 x 176) hung on the H200 (it also indexed the copies'
halves dynamically: the cause was not isolated)."""


@dataclasses.dataclass(frozen=True)
class MgpuAttnConfig:
    """``bk`` keys a pipeline step (a multiple of 64: ``P @ V``'s K with 128-byte swizzled tiles), ``stages``
    shared-memory slots of ``[bk, d]`` bf16, ``splits`` programs over the compressed rows, ``programs`` along the
    tokens of a chunk (0: one a token; fewer: each walks every ``programs``-th token, unsplit, 64-key steps)."""

    bk: int = 64
    stages: int = 2
    splits: int = 1
    programs: int = 0


def _token_programs(t: int, cfg: MgpuAttnConfig) -> int:
    """Programs along a chunk's ``t`` tokens."""
    return min(t, cfg.programs) if cfg.programs > 0 else t


def smem_bytes(d: int, cfg: MgpuAttnConfig) -> int:
    """Shared memory of one program: the query tile, the key slots, two slots of P and of the rescale factors,
    the sinks, sums and log-sum-exps, Mosaic's own."""
    return (2 * HEADS * d + cfg.stages * cfg.bk * d * 2 + 2 * HEADS * cfg.bk * 2 + 5 * HEADS * 4 + 16
            + MOSAIC_RESERVED)


def supported(h: int, d: int, cfg: MgpuAttnConfig | None = None) -> bool:
    """Shapes the kernel takes: 64 heads, ``d`` a multiple of 128 up to 512 (each compute warpgroup's half is
    whole 64-column tiles and at most wgmma's N of 256), and the tiles' shared memory within one SM's."""
    cfg = cfg or MgpuAttnConfig()
    return (h == HEADS and d % 128 == 0 and 128 <= d <= 512 and cfg.bk % 64 == 0 and cfg.stages >= 1
            and smem_bytes(d, cfg) <= SMEM_BYTES)


def default_config(t: int, r: int, batch: int, d: int = 512, sms: int = 132) -> MgpuAttnConfig:
    """Prefill: one wave of ``sms`` resident programs (at least one a sequence), each walking every
    ``programs``-th token of its sequence, unsplit. Decode: one program a token, the compressed rows split until
    about one wave of ``sms`` programs, at least 2 blocks a split. 64-key steps in 2 slots (3 where ``d`` leaves
    room)."""
    bk = 64
    stages = 3 if smem_bytes(d, MgpuAttnConfig(bk, 3)) <= SMEM_BYTES else 2
    splits, programs = 1, 0
    if t == 1 and r:
        blocks = -(-r // bk)
        while batch * splits * 2 <= sms and blocks // (splits * 2) >= 2:
            splits *= 2
    elif t > 1:
        programs = max(1, sms // batch)
        programs = 0 if programs >= t else programs
    return MgpuAttnConfig(bk=bk, stages=stages, splits=splits, programs=programs)


def _kernel(meta_g, sink_g, q_g, kv_g, ring_g, rows_g, o_g, lse_g, scoped, *, t: int, w: int, r: int, ratio: int,
            dense: bool, cfg: MgpuAttnConfig, d: int, scale: float, interpret: bool):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    bk, stages, half = cfg.bk, cfg.stages, d // 2
    ct = half // 64  # 64-column tiles of a half
    tp, wp, rp = kv_g.shape[1], ring_g.shape[1], rows_g.shape[1]  # padded to at least bk rows
    ((meta_s, sink_s, q_s, (k_cp, k_s), p_s, alpha_s, l_s, lse_s),
     (bars, q_bar, k_bar, p_bar, pfree_bar, fin_bar, lfree_bar)) = scoped
    k_cp = k_s if interpret else k_cp  # the interpreter does not alias a RefUnion's views (nor needs the (1, 64) one)
    pt, b, s = lax.axis_index("t"), lax.axis_index("b"), lax.axis_index("s")
    wg = lax.axis_index("wg")
    # A program walks the tokens pt, pt + nt, ... (one token where nt = t). With several, the next token's queries
    # and first key tiles load during the current one's last steps, and the output leaves through the key slot of
    # the token's last step (the queries' tile is by then the next token's).
    nt = _token_programs(t, cfg)
    multi = nt < t
    items = lax.div(t - pt + (nt - 1), jnp.int32(nt)) if multi else 1

    def copy_q(tk):
        for hh in range(2):
            for c in range(ct):
                plgpu.copy_gmem_to_smem(q_g.at[b, tk, :, pl.ds(hh * half + c * 64, 64)], q_s.at[hh, c],
                                        q_bar.at[hh])

    @pl.when(wg == 2)
    def _first_copies():  # the first token's queries and the sinks do not wait for the meta row
        plgpu.copy_gmem_to_smem(meta_g.at[pl.ds(b, 1)], meta_s, bars.at[0])
        plgpu.copy_gmem_to_smem(sink_g, sink_s, bars.at[1])
        copy_q(pt)

    # Which keys: per-token scalars, computed alike by all three warpgroups once the meta row has landed.
    plgpu.barrier_wait(bars.at[0])
    pos0, cnt = meta_s[0, 0], meta_s[0, 1]
    r0 = lax.rem(pos0, jnp.int32(w))  # the ring's oldest slot
    first = (s == 0).astype(jnp.int32)

    def plan(tk):
        """The key blocks of token ``tk``: (tk, pos, n_ring, j_lo, n_chunk, lim, lo, n)."""
        pos = pos0 + tk
        n_ring = first * (pos0 > 0).astype(jnp.int32) * (tk < w - 1).astype(jnp.int32) * (-(-wp // bk))
        j_lo = jnp.maximum(0, tk - w + 1)  # the window's first row (any offset: copies into the (1, 64) view)
        n_chunk = first * lax.div(tk + bk - j_lo, jnp.int32(bk))
        if dense:
            lim = jnp.minimum(jnp.minimum(lax.div(pos + 1, jnp.int32(ratio)), cnt), r)
            lo, hi = split_blocks(s, cfg.splits, -(-r // bk), window_blocks(t, wp, bk, cfg.splits))
            n_rows = jnp.maximum(0, jnp.minimum(hi, lax.div(lim + bk - 1, jnp.int32(bk))) - lo)
        else:
            lim, lo, n_rows = jnp.int32(0), 0, 0
        return tk, pos, n_ring, j_lo, n_chunk, lim, lo, n_ring + n_chunk + n_rows

    def block(pn, i):
        """(source 0 ring / 1 chunk / 2 rows, first row copied, nominal first row) of step ``i`` of a token."""
        _, _, n_ring, j_lo, n_chunk, _, lo, _ = pn
        src = (i >= n_ring).astype(jnp.int32) + (i >= n_ring + n_chunk).astype(jnp.int32)
        nom_ring = i * bk
        nom_chunk = j_lo + (i - n_ring) * bk
        nom_rows = (lo + i - n_ring - n_chunk) * bk
        nominal = jnp.where(src == 0, nom_ring, jnp.where(src == 1, nom_chunk, nom_rows))
        last = jnp.where(src == 0, wp - bk, jnp.where(src == 1, tp - bk, rp - bk))
        return src, jnp.minimum(nominal, last), nominal

    def issue(pn, i, slot, hh):
        """TMA of half ``hh`` of step ``i``'s key tile into ``slot`` (by the warpgroup that reads it as V)."""
        src, start, _ = block(pn, i)

        def copy(ref):
            for c in range(ct):
                plgpu.copy_gmem_to_smem(ref.at[b, pl.ds(start, bk), pl.ds(hh * half + c * 64, 64)],
                                        k_cp.at[slot, hh, c], k_bar.at[slot * 2 + hh])

        for sid, ref in ((0, ring_g), (1, kv_g), (2, rows_g)):
            if sid < 2 or dense:
                pl.when(src == sid)(functools.partial(copy, ref))

    def token_loop(body, init):
        return lax.fori_loop(0, items, body, init) if multi else body(0, init)

    @pl.when(wg == 2)
    def _scores():
        plgpu.set_max_registers(REGS_SCORES, action="decrease")
        plgpu.barrier_wait(bars.at[1])
        row = plgpu.Layout.WGMMA.reduce(1)
        z = plgpu.load(sink_s, layout=row)
        ff = first.astype(jnp.float32)
        m0 = z * (_LOG2E * ff) + _NEG * (1.0 - ff)
        l0 = z * 0.0 + ff
        col = plgpu.broadcasted_iota(jnp.int32, (HEADS, bk), 1, layout=plgpu.Layout.WGMMA)

        def token(j, g):  # g: steps of the program's earlier tokens (the slots' and P's cycle runs on)
            pn = plan(pt + j * nt)
            tk, pos, _, _, _, lim, _, n = pn
            plgpu.barrier_wait(q_bar.at[0])
            plgpu.barrier_wait(q_bar.at[1])

            def step(i, carry):
                m, l_ = carry
                gi = g + i
                slot, ps = lax.rem(gi, jnp.int32(stages)), lax.rem(gi, jnp.int32(2))
                plgpu.barrier_wait(k_bar.at[slot * 2])
                plgpu.barrier_wait(k_bar.at[slot * 2 + 1])

                if interpret:  # the interpreter runs no wgmma in a multi-warpgroup kernel: the same products
                    sc = sum(_dot_nt(q_s.at[hh, c][...], k_s.at[slot, hh, c][...])
                             for hh in range(2) for c in range(ct)) * (scale * _LOG2E)
                else:
                    def qk(acc_ref):
                        for hh in range(2):
                            for c in range(ct):
                                plgpu.wgmma(acc_ref, q_s.at[hh, c], k_s.at[slot, hh, c].T)
                        plgpu.wgmma_wait(0)
                        return acc_ref[...]

                    sc = pl.run_scoped(qk, plgpu.ACC((HEADS, bk), jnp.float32)) * (scale * _LOG2E)
                if multi:  # the token's last read of its queries is done: the next token's may land
                    pl.when((i == n - 1) & (j + 1 < items))(lambda: copy_q(tk + nt))
                src, start, nominal = block(pn, i)

                def masked():
                    key = start + col
                    # valid: nominal <= key <= khi and vlo <= val <= vhi, val = the key's position (ring) or index
                    is_ring = (src == 0).astype(jnp.int32)
                    kpos = pos0 - w + key - r0 + jnp.where(key < r0, w, 0)  # ring slot -> position (pos mod W)
                    val = key + is_ring * (kpos - key)
                    vlo = jnp.where(src == 0, jnp.maximum(0, pos - w + 1), jnp.where(src == 1, tk - w + 1, 0))
                    vhi = jnp.where(src == 0, pos, jnp.where(src == 1, tk, lim - 1))
                    khi = jnp.where(src == 0, w - 1, rp + tp)
                    ok = (key >= nominal) & (key <= khi) & (val >= vlo) & (val <= vhi)
                    return jnp.where(ok, sc, -jnp.inf)

                # a block of compressed rows wholly below the limit, where it should start, needs no mask
                whole = (src == 2) & (start == nominal) & (start + bk <= lim)
                sc = lax.cond(whole, lambda: sc, masked)
                m_new = jnp.maximum(m, sc.max(axis=1))
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(sc - lax.broadcast_in_dim(m_new, sc.shape, [0]))
                l_ = l_ * alpha + p.sum(axis=1)

                @pl.when(gi >= 2)
                def _():  # both P @ V warpgroups are done with this slot's P of two steps ago
                    plgpu.barrier_wait(pfree_bar.at[ps])

                p_s.at[ps][...] = p.astype(jnp.bfloat16)
                alpha_s.at[ps][...] = alpha
                plgpu.commit_smem()
                plgpu.barrier_arrive(p_bar.at[ps])
                return m_new, l_

            m, l_ = lax.fori_loop(0, n, step, (m0, l0))
            l_safe = jnp.maximum(l_, 1e-30)  # a split that saw no key: l = 0 and acc = 0
            if multi:
                @pl.when(j > 0)
                def _():  # the value warpgroups have read the last token's sums; its lse has left shared memory
                    plgpu.barrier_wait(lfree_bar)
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

            l_s[...] = l_safe
            lse_s[...] = m + jnp.log2(l_safe)
            plgpu.commit_smem()
            plgpu.barrier_arrive(fin_bar)  # also: this warpgroup's last read of q_s for the token is done
            plgpu.copy_smem_to_gmem(lse_s, lse_g.at[b, s, tk])
            return g + n

        token_loop(token, jnp.int32(0))
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the program may end once shared memory is read

    @pl.when(wg < 2)
    def _values():
        plgpu.set_max_registers(REGS_VALUES, action="increase")
        row = plgpu.Layout.WGMMA.reduce(1)
        acc0 = plgpu.layout_cast(jnp.zeros((HEADS, 64), jnp.float32), plgpu.Layout.WGMMA)

        def refill(cur, go=True):
            """Issue this warpgroup's half of the next key tile in the program's order: ``cur`` = (token, step of
            the token, step of the program), advanced past it (left as is where ``go`` is false)."""
            jc, ic, gc = cur
            pn = plan(pt + jc * nt)
            ok = (jc < items) & (ic < pn[-1]) & go
            for hh in range(2):
                pl.when((wg == hh) & ok)(functools.partial(issue, pn, ic, lax.rem(gc, jnp.int32(stages)), hh))
            nxt = ic + 1 >= pn[-1]
            adv = (jc + nxt.astype(jnp.int32), jnp.where(nxt, 0, ic + 1), gc + 1)
            return tuple(jnp.where(go, a, c) for a, c in zip(adv, cur))

        cur = (jnp.int32(0), jnp.int32(0), jnp.int32(0))
        for _ in range(stages):
            cur = refill(cur)

        def token(j, carry):
            g, cur = carry
            pn = plan(pt + j * nt)
            tk, n = pn[0], pn[-1]

            def step(i, c):
                accs, cur = c
                gi = g + i
                slot, ps = lax.rem(gi, jnp.int32(stages)), lax.rem(gi, jnp.int32(2))
                plgpu.barrier_wait(k_bar.at[slot * 2 + wg])  # this warpgroup's half of the key tile (V)
                plgpu.barrier_wait(p_bar.at[ps])
                alpha = lax.broadcast_in_dim(plgpu.load(alpha_s.at[ps], layout=row), (HEADS, 64), [0])
                accs = tuple(a * alpha for a in accs)
                if interpret:
                    accs = tuple(a + jnp.dot(p_s.at[ps][...], k_s.at[slot, wg, c][...],
                                             preferred_element_type=jnp.float32) for c, a in enumerate(accs))
                else:
                    def pv(acc_refs):
                        for c, acc_ref in enumerate(acc_refs):
                            plgpu.wgmma(acc_ref, p_s.at[ps], k_s.at[slot, wg, c])
                        plgpu.wgmma_wait(0)

                    accs = pl.run_state(pv)(tuple(plgpu.ACC.init(a) for a in accs))
                plgpu.barrier_arrive(pfree_bar.at[ps])
                # this half of the slot is free (the scores warpgroup's Q K^T of step i came before P): refill it,
                # except after a token's last step, whose slot first carries the output out
                return accs, refill(cur, (i < n - 1) if multi else True)

            accs, cur = lax.fori_loop(0, n, step, ((acc0,) * ct, cur))
            plgpu.barrier_wait(fin_bar)
            inv_l = lax.broadcast_in_dim(1.0 / plgpu.load(l_s, layout=row), (HEADS, 64), [0])
            if multi:
                plgpu.barrier_arrive(lfree_bar)
            stage = k_s.at[lax.rem(g + n - 1, jnp.int32(stages)), wg] if multi else q_s.at[wg]
            for c, a in enumerate(accs):
                stage.at[c][...] = (a * inv_l).astype(jnp.bfloat16)
            plgpu.commit_smem()
            for c in range(ct):
                col0 = pl.multiple_of(wg * half + c * 64, 64)
                plgpu.copy_smem_to_gmem(stage.at[c], o_g.at[b, s, tk, :, pl.ds(col0, 64)])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            if multi:
                cur = refill(cur)
            return g + n, cur

        token_loop(token, (jnp.int32(0), cur))


@functools.partial(jax.jit, static_argnames=("ratio", "cfg", "interpret", "scale"))
def _call(q, kv, ring, pos0, sink, rows, count, *, ratio: int, cfg: MgpuAttnConfig, interpret: bool, scale: float):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    b, t, _, d = q.shape
    bk, w = cfg.bk, ring.shape[1]  # the window before the ring is padded
    dense = rows is not None
    r = rows.shape[1] if dense else 0
    splits = cfg.splits if dense else 1

    def at_least(a, n_rows):  # every copy of bk rows lies inside its array
        return a if a.shape[1] >= n_rows else jnp.pad(a, ((0, 0), (0, n_rows - a.shape[1]), (0, 0)))

    kv = at_least(kv.astype(jnp.bfloat16), bk)
    ring = at_least(ring.astype(jnp.bfloat16), bk)
    rows = at_least(rows.astype(jnp.bfloat16), bk) if dense else kv
    cnt = count.astype(jnp.int32) if count is not None else jnp.full((b,), r, jnp.int32)
    meta = jnp.stack([pos0.astype(jnp.int32), cnt, jnp.zeros_like(cnt), jnp.zeros_like(cnt)], axis=1)
    cfg = dataclasses.replace(cfg, splits=splits)
    if _token_programs(t, cfg) < t and (splits > 1 or bk != HEADS):
        raise ValueError(f"programs walking several tokens take one split and 64-key steps; got {cfg}")
    ct = d // 128
    kernel = functools.partial(_kernel, t=t, w=w, r=r, ratio=ratio, dense=dense, cfg=cfg, d=d, scale=scale,
                               interpret=interpret)
    swizzle = plgpu.SwizzleTransform(128)
    tiles = (plgpu.TilingTransform((8, 64)), swizzle)

    def entry(meta_g, sink_g, q_g, kv_g, ring_g, rows_g, o_g, lse_g):
        # A [rows, 64] tile has the same bytes under (1, 64) and (8, 64) tiling: copies land through the first
        # view at any row offset (under (8, 64) tiling Mosaic's TMA takes multiples of 8), wgmma reads the second
        keys = plgpu.RefUnion(
            plgpu.SMEM((cfg.stages, 2, ct, bk, 64), jnp.bfloat16, transforms=(plgpu.TilingTransform((1, 64)), swizzle)),
            plgpu.SMEM((cfg.stages, 2, ct, bk, 64), jnp.bfloat16, transforms=tiles))
        scratch = [plgpu.SMEM((1, 4), jnp.int32), plgpu.SMEM((HEADS,), jnp.float32),
                   plgpu.SMEM((2, ct, HEADS, 64), jnp.bfloat16, transforms=tiles), keys,
                   plgpu.SMEM((2, HEADS, bk), jnp.bfloat16, transforms=smem_transforms(bk, 16)),
                   plgpu.SMEM((2, HEADS), jnp.float32), plgpu.SMEM((HEADS,), jnp.float32),
                   plgpu.SMEM((HEADS,), jnp.float32)]
        # meta and sinks, query halves (a copy a column tile), key halves landed (idem), P published, P slot free
        # (both value warpgroups), final sums written, final sums read (both)
        barriers = (plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_arrivals=ct, num_barriers=2),
                    plgpu.Barrier(num_arrivals=ct, num_barriers=2 * cfg.stages),
                    plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_arrivals=2, num_barriers=2), plgpu.Barrier(),
                    plgpu.Barrier(num_arrivals=2))
        pl.run_scoped(lambda *a: kernel(meta_g, sink_g, q_g, kv_g, ring_g, rows_g, o_g, lse_g, a), scratch,
                      barriers, collective_axes="wg")

    kw = {"interpret": plgpu.InterpretGPUParams()} if interpret else {}
    o, lse = plgpu.kernel(
        entry, out_type=(jax.ShapeDtypeStruct((b, splits, t, HEADS, d), jnp.bfloat16),
                         jax.ShapeDtypeStruct((b, splits, t, HEADS), jnp.float32)),
        grid=(splits, b, _token_programs(t, cfg)), grid_names=("s", "b", "t"), num_threads=WARPGROUPS, thread_name="wg",  # the last is CUDA's x
        compiler_params=plgpu.CompilerParams(approx_math=True), **kw,
    )(meta, sink.astype(jnp.float32), q.astype(jnp.bfloat16), kv, ring, rows)
    if splits == 1:
        return o[:, 0]
    mx = jnp.max(lse, axis=1, keepdims=True)
    wgt = jnp.exp2(lse - mx)
    return (jnp.sum(o.astype(jnp.float32) * wgt[..., None], axis=1)
            / jnp.sum(wgt, axis=1)[..., None]).astype(jnp.bfloat16)


def interpreter_threads() -> int:
    """Threads of XLA's CPU pool, which runs the interpreter's warpgroups: ``NPROC`` if set, else the CPUs this
    process may use."""
    n = os.environ.get("NPROC", "")
    if n.strip().isdigit():
        return int(n)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def compressed_attention_mgpu(q: jax.Array, kv: jax.Array, ring: jax.Array, pos0: jax.Array, sink: jax.Array,
                              rows: jax.Array | None = None, *, ratio: int = 1, count: jax.Array | None = None,
                              config: MgpuAttnConfig | None = None, interpret: bool = False) -> jax.Array:
    """:func:`~.compressed_attention.compressed_attention` without a selection, for ``H = 64`` and ``d`` of
    :func:`supported`: ``q [B, T, 64, d]``, ``kv [B, T, d]``, ``ring [B, W, d]``, ``pos0 [B]``, ``sink [64]``,
    optional ``rows [B, R, d]`` -> ``o [B, T, 64, d]`` bf16."""
    b, t, h, d = q.shape
    r = 0 if rows is None else rows.shape[1]
    cfg = config or default_config(t, r, b, d, sm_count())
    if interpret and (threads := interpreter_threads()) < WARPGROUPS:
        raise RuntimeError(f"Mosaic GPU's interpreter runs this kernel's {WARPGROUPS} warpgroups as concurrent XLA:CPU "
                           f"programs, but XLA's CPU thread pool has {threads}; set NPROC=4 (or more) in the "
                           "environment before jax starts")
    if not supported(h, d, cfg):
        raise ValueError(f"compressed_attention_mgpu takes 64 heads and d a multiple of 128 up to 512 within "
                         f"{SMEM_BYTES} bytes of shared memory; got H={h}, d={d}, {cfg}")
    return _call(q, kv, ring, pos0, sink, rows, count, ratio=ratio, cfg=cfg, interpret=interpret, scale=d**-0.5)
