"""CSA's attention for Hopper in Mosaic GPU (``plgpu``): a token's 64 heads against its raw window and the
compressed rows the indexer selected for it (``idx``), gathered row by row. The third backend of
:func:`pallas_kernels.compressed_attention.compressed_attention` beside the Triton kernel (which takes the
selection today) and :mod:`.compressed_attention_mgpu` (no selection), with the same contract and reference.

Why: the Triton kernel gathers each token's 512 rows at about 222 TFLOP/s (49.5 ms of a 131 ms CSA prefill at
128K on the H200, BENCHMARKS.md, session 15): its ``64 x 512`` fp32 accumulator does not fit Triton's layout.
This kernel keeps :mod:`.compressed_attention_mgpu`'s division of work: a *scores* warpgroup computes
``S = Q K^T`` once, masks it and runs the online softmax; two *value* warpgroups each own half of the output
columns, add ``P @ V`` and stream that half of the key tiles through ``stages`` slots. What differs:

* Hopper's TMA copies boxes, not scattered rows, and with the 128-byte swizzle wgmma reads, a box row is at most
  64 bf16 columns. So a key slot is ``[2 halves, d/128 column tiles, bk, 64]``: each ``[bk, 64]`` tile has the
  same bytes under ``(1, 64)`` and ``(8, 64)`` tiling (``plgpu.RefUnion``, ``scripts/probe_mgpu_gather.py``). A
  selected row lands by one copy a column tile into the ``(1, 64)`` view (``bk x d/128`` copies a half and
  step); the window's rows, contiguous, by one copy a tile into the ``(8, 64)`` view. wgmma reads the
  ``(8, 64)`` view: ``Q K^T`` as a sum over the ``d/64`` column tiles, ``P V`` into ``d/128`` accumulators of
  ``64 x 64`` a warpgroup;
* in prefill one wave of resident programs walks the chunk's tokens, each every ``programs``-th token, as the
  dense kernel does: the next token's queries load after the current one's last ``Q K^T``, its selection
  (``k`` indices, two buffers by token parity) when the current one starts, and the output leaves through the
  key slot of the token's last step. ``programs=0``: one program a token. No splits: a CSA token has at most
  ``k + W`` keys;
* the selected blocks past ``min(k, visible rows)`` are skipped (early tokens select fewer than ``k``); a
  selected index of -1 or at or past the visible rows is masked (its copy reads row 0).

Not yet the default (:data:`ON_BY_DEFAULT`): written after the session's GPU time was spent, verified in Mosaic
GPU's interpreter and by lowering for sm_90 on the CPU. ``compressed_attention(..., idx=..., mgpu=True)`` asks for
it; ``scripts/probe_mgpu_gather.py --time`` measures the gathers' cost, ``scripts/bench_attention.py
--mosaic-csa`` times the CSA layer with it and ``--sweep-prefill`` the kernel beside Triton's tiles.

The GPU interpreter (``interpret=True``, CPU tests) runs no wgmma in a kernel of several warpgroups (the products
are ``jnp.dot`` of the same tiles) and does not alias a ``RefUnion``'s views, so there the gathered rows land
through the ``(8, 64)`` view. It needs 3 CPU threads (``NPROC``), as :mod:`.compressed_attention_mgpu`.

Numerics as :mod:`.compressed_attention_mgpu`: fp32 scores and statistics (base 2), bf16 ``exp2(s - m)`` into
``P @ V``, fp32 sums, the sink as the initial maximum with weight 1, the output normalised in bf16.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from .compressed_attention import _dot_nt, sm_count
from .fp8_matmul_mgpu import available

HEADS = 64
SMEM_BYTES = 227 << 10
MOSAIC_RESERVED = 5 << 10
WARPGROUPS = 3
REGS_SCORES, REGS_VALUES = 152, 176  # as compressed_attention_mgpu (the value warpgroups: 128 accumulator registers)
_LOG2E = math.log2(math.e)

ON_BY_DEFAULT = False
"""Whether :func:`use` lets ``compressed_attention`` take this kernel for a selection without being asked. Off
until timed on a Hopper GPU against the Triton kernel (BENCHMARKS.md, session 15)."""


@dataclasses.dataclass(frozen=True)
class SparseAttnConfig:
    """``bk`` keys a step (64: wgmma's K of ``P @ V`` in whole swizzled tiles), ``stages`` key slots, ``programs``
    along the tokens of a chunk (0: one a token; fewer: each walks every ``programs``-th token)."""

    bk: int = 64
    stages: int = 2
    programs: int = 0


def _token_programs(t: int, cfg: SparseAttnConfig) -> int:
    return min(t, cfg.programs) if cfg.programs > 0 else t


def default_config(t: int, batch: int, sms: int = 132) -> SparseAttnConfig:
    """One wave of ``sms`` resident programs (at least one a sequence), each walking every ``programs``-th token
    of its sequence, as :func:`.compressed_attention_mgpu.default_config` in prefill (untimed here)."""
    programs = max(1, sms // batch)
    return SparseAttnConfig(programs=0 if programs >= t else programs)


def smem_bytes(d: int, k: int, cfg: SparseAttnConfig) -> int:
    """Queries, key slots, two slots of P and of the rescale factors, the selection, sink, sums, meta, Mosaic's."""
    kp = -(-k // cfg.bk) * cfg.bk
    return (2 * HEADS * d + cfg.stages * cfg.bk * d * 2 + 2 * HEADS * cfg.bk * 2 + 4 * HEADS * 4 + 2 * kp * 4 + 16
            + MOSAIC_RESERVED)


def supported(h: int, d: int, k: int, cfg: SparseAttnConfig | None = None) -> bool:
    """64 heads, ``d`` a multiple of 128 up to 512, 64-key steps, the buffers within one SM's shared memory."""
    cfg = cfg or SparseAttnConfig()
    return (h == HEADS and d % 128 == 0 and 128 <= d <= 512 and cfg.bk == 64 and cfg.stages >= 1 and k >= 1
            and smem_bytes(d, k, cfg) <= SMEM_BYTES)


def use(t: int, h: int, d: int, k: int, interpret: bool = False) -> bool:
    """Whether ``compressed_attention`` takes this kernel for a selection by default: where :data:`ON_BY_DEFAULT`,
    for prefill chunks (64 tokens or more) of the shapes it takes, on a Hopper GPU."""
    return ON_BY_DEFAULT and not interpret and t >= 64 and supported(h, d, k) and available()


def _kernel(meta_g, sink_g, q_g, kv_g, ring_g, rows_g, idx_g, o_g, scoped, *, t: int, w: int, r: int, ratio: int,
            cfg: SparseAttnConfig, d: int, scale: float, interpret: bool):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    bk, stages, half = cfg.bk, cfg.stages, d // 2
    ct = half // 64  # column tiles of a half
    tp, wp, rp = kv_g.shape[1], ring_g.shape[1], rows_g.shape[1]  # padded to at least bk rows
    kp = idx_g.shape[2] * bk  # the selection as [kp / bk, bk] (a copy takes at most 256 elements a dimension)
    ((meta_s, sink_s, q_s, (k_rows, k_s), idx_s, p_s, alpha_s, l_s),
     (bars, q_bar, idx_bar, kw_bar, kg_bar, p_bar, pfree_bar, fin_bar, lfree_bar)) = scoped
    b, pt = lax.axis_index("b"), lax.axis_index("t")
    wg = lax.axis_index("wg")
    # A program walks the tokens pt, pt + nt, ... (one token where nt = t). With several, the next token's queries
    # load after the current one's last Q K^T, its selection (two buffers, by the token's parity) when the
    # current one starts, and the output leaves through the key slot of the token's last step.
    nt = _token_programs(t, cfg)
    multi = nt < t
    items = lax.div(t - pt + (nt - 1), jnp.int32(nt)) if multi else 1
    k_rows = k_s if interpret else k_rows  # the interpreter does not alias a RefUnion's views

    def copy_q(tk):
        for hh in range(2):
            for c in range(ct):
                plgpu.copy_gmem_to_smem(q_g.at[b, tk, :, pl.ds(hh * half + c * 64, 64)], q_s.at[hh, c], q_bar)

    def copy_idx(tk, par):
        plgpu.copy_gmem_to_smem(idx_g.at[b, tk], idx_s.at[par], idx_bar.at[par])

    @pl.when(wg == 2)
    def _first_copies():
        plgpu.copy_gmem_to_smem(meta_g.at[pl.ds(b, 1)], meta_s, bars.at[0])
        plgpu.copy_gmem_to_smem(sink_g, sink_s, bars.at[1])
        copy_idx(pt, 0)
        copy_q(pt)

    plgpu.barrier_wait(bars.at[0])
    pos0, cnt = meta_s[0, 0], meta_s[0, 1]
    r0 = lax.rem(pos0, jnp.int32(w))  # the ring's oldest slot

    def plan(j):
        """The key steps of the program's ``j``-th token: (tk, pos, n_ring, j_lo, n_chunk, lim, par, n)."""
        tk = pt + j * nt
        pos = pos0 + tk
        n_ring = (pos0 > 0).astype(jnp.int32) * (tk < w - 1).astype(jnp.int32) * (-(-wp // bk))
        j_lo = lax.div(jnp.maximum(0, tk - w + 1), jnp.int32(8)) * 8  # TMA row offsets are multiples of 8
        n_chunk = lax.div(tk + bk - j_lo, jnp.int32(bk))
        lim = jnp.minimum(jnp.minimum(lax.div(pos + 1, jnp.int32(ratio)), cnt), r)
        n_sel = lax.div(jnp.minimum(jnp.int32(kp), lim) + bk - 1, jnp.int32(bk))  # blocks that may hold a visible row
        return tk, pos, n_ring, j_lo, n_chunk, lim, lax.rem(j, 2), n_ring + n_chunk + n_sel

    def block(pn, i):
        """(source 0 ring / 1 chunk / 2 selection, first row copied, nominal first row or selection offset)."""
        _, _, n_ring, j_lo, n_chunk, _, _, _ = pn
        src = (i >= n_ring).astype(jnp.int32) + (i >= n_ring + n_chunk).astype(jnp.int32)
        nom_ring = i * bk
        nom_chunk = j_lo + (i - n_ring) * bk
        nom_sel = (i - n_ring - n_chunk) * bk
        nominal = jnp.where(src == 0, nom_ring, jnp.where(src == 1, nom_chunk, nom_sel))
        last = jnp.where(src == 0, wp - bk, tp - bk)
        return src, pl.multiple_of(jnp.minimum(nominal, last), 8), nominal

    def issue(pn, i, slot, hh):
        """Half ``hh`` of step ``i``'s keys into ``slot``, by the value warpgroup that reads it as V."""
        src, start, nominal = block(pn, i)
        par = pn[6]

        def tiles(ref):
            for c in range(ct):
                plgpu.copy_gmem_to_smem(ref.at[b, pl.ds(start, bk), pl.ds(hh * half + c * 64, 64)],
                                        k_s.at[slot, hh, c], kw_bar.at[slot * 2 + hh])

        pl.when(src == 0)(functools.partial(tiles, ring_g))
        pl.when(src == 1)(functools.partial(tiles, kv_g))

        @pl.when(src == 2)
        def _gather():
            sb = lax.div(nominal, jnp.int32(bk))

            @pl.loop(0, bk)
            def _(j):
                row = idx_s[par, sb, j]
                row = jnp.where((row >= 0) & (row < rp), row, 0)
                for c in range(ct):
                    plgpu.copy_gmem_to_smem(rows_g.at[b, pl.ds(row, 1), pl.ds(hh * half + c * 64, 64)],
                                            k_rows.at[slot, hh, c, pl.ds(j, 1)], kg_bar.at[slot * 2 + hh])

    def wait_keys(pn, i, slot, hh):
        src = block(pn, i)[0]
        pl.when(src < 2)(lambda: plgpu.barrier_wait(kw_bar.at[slot * 2 + hh]))
        pl.when(src == 2)(lambda: plgpu.barrier_wait(kg_bar.at[slot * 2 + hh]))

    def token_loop(body, init):
        return lax.fori_loop(0, items, body, init) if multi else body(0, init)

    @pl.when(wg == 2)
    def _scores():
        plgpu.set_max_registers(REGS_SCORES, action="decrease")
        plgpu.barrier_wait(bars.at[1])
        row = plgpu.Layout.WGMMA.reduce(1)
        colv = plgpu.Layout.WGMMA.reduce(0)
        m0 = plgpu.load(sink_s, layout=row) * _LOG2E
        l0 = m0 * 0.0 + 1.0
        col = plgpu.broadcasted_iota(jnp.int32, (HEADS, bk), 1, layout=plgpu.Layout.WGMMA)

        def token(j, g):  # g: steps of the program's earlier tokens (the slots' and P's cycle runs on)
            pn = plan(j)
            tk, pos, _, _, _, lim, par, n = pn
            if multi:  # the other buffer's selection (token j - 1) is read: its issues and masks are done
                pl.when(j + 1 < items)(lambda: copy_idx(tk + nt, 1 - par))
            plgpu.barrier_wait(idx_bar.at[par])
            plgpu.barrier_wait(q_bar)

            def step(i, carry):
                m, l_ = carry
                gi = g + i
                slot, ps = lax.rem(gi, jnp.int32(stages)), lax.rem(gi, jnp.int32(2))
                wait_keys(pn, i, slot, 0)
                wait_keys(pn, i, slot, 1)
                if interpret:  # the interpreter runs no wgmma in a multi-warpgroup kernel: the same products
                    sc = sum(_dot_nt(q_s.at[hh, c][...], k_s.at[slot, hh, c][...])
                             for hh in range(2) for c in range(ct))
                else:
                    def qk(acc_ref):
                        for hh in range(2):
                            for c in range(ct):
                                plgpu.wgmma(acc_ref, q_s.at[hh, c], k_s.at[slot, hh, c].T)
                        plgpu.wgmma_wait(0)
                        return acc_ref[...]

                    sc = pl.run_scoped(qk, plgpu.ACC((HEADS, bk), jnp.float32))
                sc = sc * (scale * _LOG2E)
                if multi:  # the token's last read of its queries is done: the next token's may land
                    pl.when((i == n - 1) & (j + 1 < items))(lambda: copy_q(tk + nt))
                src, start, nominal = block(pn, i)

                def window_mask():
                    key = start + col
                    is_ring = (src == 0).astype(jnp.int32)
                    kpos = pos0 - w + key - r0 + jnp.where(key < r0, w, 0)  # ring slot -> position (pos mod W)
                    val = key + is_ring * (kpos - key)
                    vlo = jnp.where(src == 0, jnp.maximum(0, pos - w + 1), tk - w + 1)
                    vhi = jnp.where(src == 0, pos, tk)
                    khi = jnp.where(src == 0, w - 1, tp)
                    ok = (key >= nominal) & (key <= khi) & (val >= vlo) & (val <= vhi)
                    return jnp.where(ok, sc, -jnp.inf)

                def selection_mask():
                    sel = plgpu.load(idx_s.at[par, lax.div(nominal, jnp.int32(bk))], layout=colv)
                    sel = lax.broadcast_in_dim(sel, (HEADS, bk), [1])
                    return jnp.where((sel >= 0) & (sel < lim), sc, -jnp.inf)

                sc = lax.cond(src == 2, selection_mask, window_mask)
                m_new = jnp.maximum(m, sc.max(axis=1))
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(sc - lax.broadcast_in_dim(m_new, sc.shape, [0]))
                l_ = l_ * alpha + p.sum(axis=1)

                @pl.when(gi >= 2)
                def _():  # both value warpgroups are done with this slot's P of two steps ago
                    plgpu.barrier_wait(pfree_bar.at[ps])

                p_s.at[ps][...] = p.astype(jnp.bfloat16)
                alpha_s.at[ps][...] = alpha
                plgpu.commit_smem()
                plgpu.barrier_arrive(p_bar.at[ps])
                return m_new, l_

            _, l_ = lax.fori_loop(0, n, step, (m0, l0))
            if multi:
                @pl.when(j > 0)
                def _():  # the value warpgroups have read the last token's sums
                    plgpu.barrier_wait(lfree_bar)

            l_s[...] = l_  # >= the sink's weight 1
            plgpu.commit_smem()
            plgpu.barrier_arrive(fin_bar)  # also: this warpgroup's last read of the token's queries is done
            return g + n

        token_loop(token, jnp.int32(0))

    @pl.when(wg < 2)
    def _values():
        plgpu.set_max_registers(REGS_VALUES, action="increase")
        row = plgpu.Layout.WGMMA.reduce(1)
        zero = plgpu.layout_cast(jnp.zeros((HEADS, 64), jnp.float32), plgpu.Layout.WGMMA)

        def refill(cur, go=True):
            """Issue this warpgroup's half of the next key step in the program's order: ``cur`` = (token, step of
            the token, step of the program), advanced past it (left as is where ``go`` is false). A token's first
            issue waits for its selection."""
            jc, ic, gc = cur
            pn = plan(jc)
            ok = (jc < items) & (ic < pn[-1]) & go
            pl.when(ok & (ic == 0))(lambda: plgpu.barrier_wait(idx_bar.at[pn[6]]))
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
            pn = plan(j)
            tk, n = pn[0], pn[-1]

            def step(i, c):
                accs, cur = c
                gi = g + i
                slot, ps = lax.rem(gi, jnp.int32(stages)), lax.rem(gi, jnp.int32(2))
                for hh in range(2):
                    pl.when(wg == hh)(functools.partial(wait_keys, pn, i, slot, hh))
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

            accs, cur = lax.fori_loop(0, n, step, ((zero,) * ct, cur))
            plgpu.barrier_wait(fin_bar)
            inv_l = lax.broadcast_in_dim(1.0 / plgpu.load(l_s, layout=row), (HEADS, 64), [0])
            if multi:
                plgpu.barrier_arrive(lfree_bar)
            # the staging tiles: the last step's key slot (the queries' tile may hold the next token's by now)
            stage = k_s.at[lax.rem(g + n - 1, jnp.int32(stages)), wg] if multi else q_s.at[wg]
            for c, a in enumerate(accs):
                stage.at[c][...] = (a * inv_l).astype(jnp.bfloat16)
            plgpu.commit_smem()
            for c in range(ct):
                col0 = pl.multiple_of(wg * half + c * 64, 64)
                plgpu.copy_smem_to_gmem(stage.at[c], o_g.at[b, tk, :, pl.ds(col0, 64)])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            if multi:
                cur = refill(cur)
            return g + n, cur

        token_loop(token, (jnp.int32(0), cur))


@functools.partial(jax.jit, static_argnames=("ratio", "cfg", "interpret", "scale"))
def _call(q, kv, ring, pos0, sink, rows, idx, count, *, ratio: int, cfg: SparseAttnConfig, interpret: bool,
          scale: float):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    b, t, _, d = q.shape
    bk, w, r = cfg.bk, ring.shape[1], rows.shape[1]

    def at_least(a, n_rows):  # every TMA block lies inside its array and starts at a multiple of 8 rows
        n_rows = max(n_rows, -(-a.shape[1] // 8) * 8)
        return a if a.shape[1] == n_rows else jnp.pad(a, ((0, 0), (0, n_rows - a.shape[1]), (0, 0)))

    kv = at_least(kv.astype(jnp.bfloat16), bk)
    ring = at_least(ring.astype(jnp.bfloat16), bk)
    rows = at_least(rows.astype(jnp.bfloat16), bk)
    k = idx.shape[2]
    kp = -(-k // bk) * bk
    idx = jnp.pad(idx.astype(jnp.int32), ((0, 0), (0, 0), (0, kp - k)), constant_values=-1).reshape(b, t, kp // bk, bk)
    cnt = count.astype(jnp.int32) if count is not None else jnp.full((b,), r, jnp.int32)
    meta = jnp.stack([pos0.astype(jnp.int32), cnt, jnp.zeros_like(cnt), jnp.zeros_like(cnt)], axis=1)
    half = d // 2
    ct = half // 64
    kernel = functools.partial(_kernel, t=t, w=w, r=r, ratio=ratio, cfg=cfg, d=d, scale=scale, interpret=interpret)
    swizzle = plgpu.SwizzleTransform(128)
    tiles = (plgpu.TilingTransform((8, 64)), swizzle)

    def entry(meta_g, sink_g, q_g, kv_g, ring_g, rows_g, idx_g, o_g):
        keys = plgpu.RefUnion(  # the same bytes: (1, 64) tiles for the gathered rows, (8, 64) for the rest and wgmma
            plgpu.SMEM((cfg.stages, 2, ct, bk, 64), jnp.bfloat16, transforms=(plgpu.TilingTransform((1, 64)), swizzle)),
            plgpu.SMEM((cfg.stages, 2, ct, bk, 64), jnp.bfloat16, transforms=tiles))
        scratch = [plgpu.SMEM((1, 4), jnp.int32), plgpu.SMEM((HEADS,), jnp.float32),
                   plgpu.SMEM((2, ct, HEADS, 64), jnp.bfloat16, transforms=tiles), keys,
                   plgpu.SMEM((2, kp // bk, bk), jnp.int32),
                   plgpu.SMEM((2, HEADS, bk), jnp.bfloat16, transforms=(plgpu.TilingTransform((8, 64)), swizzle)),
                   plgpu.SMEM((2, HEADS), jnp.float32), plgpu.SMEM((HEADS,), jnp.float32)]
        # meta / sink, queries, selections (by token parity), window key halves, gathered key halves, P published, P
        # slot free (both value warpgroups), final sums written, final sums read (both)
        barriers = (plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_arrivals=2 * ct), plgpu.Barrier(num_barriers=2),
                    plgpu.Barrier(num_arrivals=ct, num_barriers=2 * cfg.stages),
                    plgpu.Barrier(num_arrivals=bk * ct, num_barriers=2 * cfg.stages),
                    plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_arrivals=2, num_barriers=2), plgpu.Barrier(),
                    plgpu.Barrier(num_arrivals=2))
        pl.run_scoped(lambda *a: kernel(meta_g, sink_g, q_g, kv_g, ring_g, rows_g, idx_g, o_g, a), scratch,
                      barriers, collective_axes="wg")

    kw = {"interpret": plgpu.InterpretGPUParams()} if interpret else {}
    return plgpu.kernel(
        entry, out_type=jax.ShapeDtypeStruct((b, t, HEADS, d), jnp.bfloat16),
        grid=(b, _token_programs(t, cfg)), grid_names=("b", "t"), num_threads=WARPGROUPS, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True), **kw,
    )(meta, sink.astype(jnp.float32), q.astype(jnp.bfloat16), kv, ring, rows, idx)


def sparse_attention_mgpu(q: jax.Array, kv: jax.Array, ring: jax.Array, pos0: jax.Array, sink: jax.Array,
                          rows: jax.Array, idx: jax.Array, *, ratio: int, count: jax.Array | None = None,
                          config: SparseAttnConfig | None = None, interpret: bool = False) -> jax.Array:
    """:func:`~.compressed_attention.compressed_attention` with a selection, for ``H = 64`` and ``d`` of
    :func:`supported`: ``q [B, T, 64, d]``, ``kv [B, T, d]``, ``ring [B, W, d]``, ``pos0 [B]``, ``sink [64]``,
    ``rows [B, R, d]``, ``idx [B, T, k]`` (ascending row indices, -1 padding) -> ``o [B, T, 64, d]`` bf16."""
    from .compressed_attention_mgpu import interpreter_threads

    b, t, h, d = q.shape
    cfg = config or default_config(t, b, sm_count())
    if not supported(h, d, idx.shape[2], cfg):
        raise ValueError(f"sparse_attention_mgpu takes 64 heads and d a multiple of 128 up to 512 within "
                         f"{SMEM_BYTES} bytes of shared memory; got H={h}, d={d}, k={idx.shape[2]}, {cfg}")
    if interpret and (threads := interpreter_threads()) < WARPGROUPS:
        raise RuntimeError(f"Mosaic GPU's interpreter runs this kernel's {WARPGROUPS} warpgroups as concurrent XLA:CPU "
                           f"programs, but XLA's CPU thread pool has {threads}; set NPROC=4 (or more) in the "
                           "environment before jax starts")
    return _call(q, kv, ring, pos0, sink, rows, idx, count, ratio=ratio, cfg=cfg, interpret=interpret,
                 scale=d**-0.5)
