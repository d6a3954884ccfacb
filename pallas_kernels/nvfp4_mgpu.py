"""NVFP4 x bf16 decode-shaped matmuls for Hopper in Mosaic GPU (``plgpu``), dense and grouped (the routed
MoE): the second backend beside the Pallas-Triton kernels of :mod:`pallas_kernels.nvfp4_matmul` and
:mod:`pallas_kernels.nvfp4_moe`, reading the *same* packed weights (:class:`~.nvfp4_layout.Nvfp4Packed`).

One kernel, :func:`block_gemv`, computes ``out[s, b] = W[e_b] @ rows[b]^T`` for blocks ``b`` of up to 64
activation rows, each against one weight matrix ``e_b`` of a stack (the dense matmul is one block of one
matrix; the MoE has one block per run of rows routed to the same expert), summed over K in ``split`` slices
``s``. It is the transposed product ``y^T = W x^T``: the weight is the wgmma's 64-row left operand, decoded
into registers, and the block's rows its narrow right operand (8 to 64 columns, zero rows where fewer).

Per program (block, 64 weight rows, K slice) TMA streams, ``tile_k`` logical columns a step, the
``[64, tile_k/2]`` packed code tile, the two ``[64, tile_k/32]`` e4m3 scale tiles of its halves (the packed
layout's half split: a byte holds a code of column ``j`` and one of ``Kp/2 + j``), and the ``[rows,
tile_k]`` activation tile. In 8-bit wgmma layout a thread holds 4 bytes ``16g + 4t' .. +3`` of a row (for
each ``g < tile_k/32``; ``t'`` its lane in the quad); these are exactly the 8 weights of its four bf16
A-operand registers ``G = 4g .. 4g+3`` (columns ``8G + 2t'``, ``+1``) once the activation columns are put in
the matching order (:func:`to_virtual`, one XLA transpose fused with the padding): register ``4g`` holds the
lo codes of bytes 0-1, ``4g+1`` of bytes 2-3, ``4g+2`` and ``4g+3`` the hi codes. The decode is the
bit-placement PTX of the Triton kernels (:func:`~.nvfp4_layout.ptx_decode_lo` / ``_hi``: byte permutes, a
shift, a mask; 2 integer instructions per weight) and one ``bf16x2`` multiply by the block scale times
``2^119``, which gives the exact bf16 ``E2M1 x scale x 2^-7``; every 16-weight block a thread touches lies
in one scale block. Scales come from shared memory (16-byte TMA rows of the ``[Np, Kp/256, 16]`` view) and
are converted ``e4m3x2 -> f16x2 -> f32 -> bf16`` (exact, zero and NaN included). Products accumulate in
fp32; ``2^7 x weight_scale_2`` is applied by the caller's XLA epilogue (with the split-K sum).

The GPU interpreter (``interpret=True``, CPU tests) has neither inline PTX nor a register wgmma operand: there
the same tile is decoded with array operations into the same virtual column order and reaches the wgmma
through shared memory. :func:`emulate_block_gemv` is the numpy model of the PTX path's data movement.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .fp8_matmul_mgpu import available, smem_transforms  # noqa: F401  (available: shared Hopper check)
from .nvfp4_layout import (
    ASM_SCALE_LOG2,
    DECODE_LOG2,
    UNDO_DECODE_SCALE,
    Nvfp4Packed,
    decode_int,
    ptx_decode_hi,
    ptx_decode_lo,
)

TILE_M = 64
"""Weight rows per program: one warpgroup's wgmma M."""
MAX_ROWS = 64
"""Most activation rows per block (wgmma N; decode shapes)."""
UNIT = 16
"""Scale bytes per TMA row (the ``[Np, Kp/256, 16]`` view)."""
IDX_ROW = 128
"""Block matrix ids per row of the index array copied to shared memory."""
ONCE_MAX_BYTES = 32 << 10
"""Most bytes of block scales a program copies at once (``scales_once``)."""
SMEM_BYTES = 227 << 10
"""Shared memory of one program on Hopper (the kernel refuses configurations that need more)."""


@dataclasses.dataclass(frozen=True)
class MgpuConfig:
    """``tile_k``: K columns of one decode + wgmma (128 or 256); ``sub``: such steps per pipeline step (1 or
    2); ``split``: K slices (programs along K; ``None``: :func:`default_split`); ``stages``: pipeline depth."""

    tile_k: int = 256
    split: int | None = None
    stages: int = 4
    sub: int = 1

    @classmethod
    def from_step(cls, bk: int, split: int | None, stages: int) -> MgpuConfig:
        """The configuration of a pipeline step of ``bk`` columns (128, 256 or 512)."""
        if bk not in (128, 256, 512):
            raise ValueError(f"the Mosaic GPU NVFP4 kernel takes pipeline steps of 128, 256 or 512 columns, got {bk}")
        tile_k = min(bk, 256)
        return cls(tile_k=tile_k, split=split, stages=stages, sub=bk // tile_k)


def supported(kp: int, np_: int, tile_k: int = 256) -> bool:
    """Packed sizes the kernel takes: ``Np`` a multiple of 64 and ``Kp`` of 256 (whole 16-byte rows of block
    scales; always, for the package's default padding of 128 x 256)."""
    return tile_k in (128, 256) and np_ % TILE_M == 0 and kp % max(tile_k, 16 * UNIT) == 0 and kp > 0


def default_split(programs: int, steps: int, target: int = 1024) -> int:
    """K slices so that about ``target`` programs run (8 per SM), keeping >= 2 steps a slice."""
    split = 1
    while programs * split * 2 <= target and steps % (split * 2) == 0 and steps // (split * 2) >= 2:
        split *= 2
    return split


def to_virtual(x: jax.Array, tile_k: int) -> jax.Array:
    """Activations ``[..., Kp]`` (logical column order, zero-padded to the packed ``Kp``) -> the column order
    of the kernel's decoded tiles: virtual column ``v = step*tk + 32g + 16hh + 8jj + 2t' + e`` holds logical
    column ``hh*Kp/2 + step*tk/2 + 16g + 4t' + 2jj + e`` (``hh``: lo/hi half of the packed byte)."""
    *lead, kp = x.shape
    n = len(lead)
    x = x.reshape(*lead, 2, kp // tile_k, tile_k // 32, 4, 2, 2)  # hh, step, g, t', jj, e
    x = x.transpose(*range(n), n + 1, n + 2, n, n + 4, n + 3, n + 5)
    return x.reshape(*lead, kp)


def virtual_columns(kp: int, tile_k: int) -> np.ndarray:
    """``perm`` with ``to_virtual(x)[..., v] == x[..., perm[v]]`` (for tests and the numpy model)."""
    return np.asarray(to_virtual(jnp.arange(kp, dtype=jnp.int32), tile_k))


# ---------------------------------------------------------------------------------------------------------
# The in-kernel decode (GPU): inline PTX on the wgmma register fragments.

# Two e4m3 scales (the low 16 bits of $1) -> two bf16x2 splats of scale x 2^119, packed in a 64-bit result.
_PTX_SCALES = f"""{{
.reg .b16 e2, ha, hb;
.reg .b32 h2, a, b;
.reg .f32 fa, fb;
cvt.u16.u32 e2, $1;
cvt.rn.f16x2.e4m3x2 h2, e2;
mov.b32 {{ha, hb}}, h2;
cvt.f32.f16 fa, ha;
cvt.f32.f16 fb, hb;
mul.f32 fa, fa, 0f{(127 + ASM_SCALE_LOG2) << 23:08X};
mul.f32 fb, fb, 0f{(127 + ASM_SCALE_LOG2) << 23:08X};
cvt.rn.bf16x2.f32 a, fa, fa;
cvt.rn.bf16x2.f32 b, fb, fb;
mov.b64 $0, {{a, b}};
}}"""


def _word_ptx(decode) -> str:
    """One word's decode (:func:`~.nvfp4_layout.ptx_decode_lo` / ``_hi``) as one instruction: ``$1`` the word,
    ``$2`` the bf16x2 scale splat of its four weights, both bf16x2 results in the 64-bit ``$0``."""
    return "{\n.reg .b32 r0, r1;\n" + decode("$1", "$2", "$2", "r0", "r1") + "\nmov.b64 $0, {r0, r1};\n}"


_PTX_WORD_LO = _word_ptx(ptx_decode_lo)
_PTX_WORD_HI = _word_ptx(ptx_decode_hi)


def _decode_ptx(tile_k: int):
    """``decode(codes, s_lo, s_hi)``: codes ``[64, tile_k/2]`` uint8 in 8-bit wgmma layout, the two scale refs
    ``[64, tile_k/32]`` (uint8 e4m3 bytes) -> the ``[64, tile_k]`` bf16 A operand in wgmma layout (virtual
    column order, values ``E2M1 x scale x 2^-7``)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, llvm, vector
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    from jax.experimental.mosaic.gpu import utils as mu

    nb = tile_k // 32  # scale blocks of each half per step (one per g)

    def decode(ctx, codes, s_lo, s_hi):
        del ctx
        i32, i64 = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(64)
        i8, i16 = ir.IntegerType.get_signless(8), ir.IntegerType.get_signless(16)
        bf16x2 = ir.VectorType.get((2,), ir.BF16Type.get())
        regs = codes.registers
        if regs.shape != (1, nb, 1, 1, 2, 1, 1, 1, 1):
            raise NotImplementedError(f"unexpected 8-bit wgmma register tiling {regs.shape}")
        tid = mu.thread_idx()
        lane = arith.remui(tid, mu.c(32, i32))
        warp = arith.remui(arith.divui(tid, mu.c(32, i32)), mu.c(4, i32))
        base_row = arith.addi(arith.muli(warp, mu.c(16, i32)), arith.divui(lane, mu.c(4, i32)))
        idx0 = mu.c(0, ir.IndexType.get())

        def scales(ref, h):  # the nb block scales of the thread's row r + 8h, as bf16x2 splats of s x 2^119
            row = arith.index_castui(ir.IndexType.get(), arith.addi(base_row, mu.c(8 * h, i32)))
            v = vector.load(ir.VectorType.get((nb,), i8), ref, [row, idx0])
            v16 = vector.bitcast(ir.VectorType.get((nb // 2,), i16), v)
            out = []
            for j in range(nb // 2):
                pair = arith.extui(i32, vector.extract(v16, dynamic_position=[], static_position=[j]))
                both = llvm.inline_asm(i64, [pair], _PTX_SCALES, "=l,r")
                out += [arith.trunci(i32, both), arith.trunci(i32, arith.shrui(both, mu.c(32, i64)))]
            return out

        s = {(h, half): scales(ref, h) for h in range(2) for half, ref in enumerate((s_lo, s_hi))}
        out = np.empty((1, tile_k // 8, 1, 1, 2, 1, 1, 1, 1), dtype=object)
        for g in range(nb):
            for h in range(2):
                w = mu.bitcast(regs[0, g, 0, 0, h, 0, 0, 0, 0], i32)
                for half, ptx in enumerate((_PTX_WORD_LO, _PTX_WORD_HI)):
                    both = llvm.inline_asm(i64, [w, s[h, half][g]], ptx, "=l,r,r")
                    for j, r in enumerate((arith.trunci(i32, both),
                                           arith.trunci(i32, arith.shrui(both, mu.c(32, i64))))):
                        out[0, 4 * g + 2 * half + j, 0, 0, h, 0, 0, 0, 0] = mu.bitcast(r, bf16x2)
        return fa.FragmentedArray(_registers=out, _layout=fa.WGMMA_LAYOUT, _is_signed=None)

    return plgpu.inline_mgpu(
        arg_types=(plgpu.Layout.WGMMA_8BIT, plgpu.RefType(), plgpu.RefType()),
        return_type=plgpu.ShapeDtypeStruct((TILE_M, tile_k), jnp.bfloat16, plgpu.Layout.WGMMA),
    )(decode)


def _decode_arrays(q, s_lo, s_hi, tile_k: int):
    """The interpreter's decode: the same virtual-order tile with array operations (``decode_int``)."""
    lo, hi = decode_int(q, lax.bitcast_convert_type(s_lo, jnp.float8_e4m3fn),
                        lax.bitcast_convert_type(s_hi, jnp.float8_e4m3fn))
    shape = (TILE_M, tile_k // 32, 4, 2, 2)  # g, t', jj, e
    a = jnp.stack([lo.reshape(shape), hi.reshape(shape)], axis=2)  # [r, g, hh, t', jj, e]
    return a.transpose(0, 1, 2, 4, 3, 5).reshape(TILE_M, tile_k)


# ---------------------------------------------------------------------------------------------------------
# The kernel.

def pipeline_specs(wide: int, kp: int, r: int, step0):
    """The TMA copies of one pipeline step of ``wide`` columns (step ``kk`` of a program whose K slice starts
    at step ``step0``): the ``[64, wide/2]`` code tile, the 16-byte rows holding the step's lo and hi block
    scales (of the ``[.., Kp/256, 16]`` scale view), the ``[r, wide]`` activation tile."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    nbs = wide // 32  # scale bytes of each half a step

    def s_index(base):
        return lambda kk: (0, (base + nbs * (step0 + kk)) // UNIT, 0)

    return (plgpu.BlockSpec((TILE_M, wide // 2), lambda kk: (0, kk), transforms=smem_transforms(wide // 2, 8)),
            plgpu.BlockSpec((TILE_M, 1, UNIT), s_index(0)), plgpu.BlockSpec((TILE_M, 1, UNIT), s_index(kp // 32)),
            plgpu.BlockSpec((r, wide), lambda kk: (0, kk), transforms=smem_transforms(wide, 16)))


def block_gemv(codes: jax.Array, scales: jax.Array, rows: jax.Array, block_matrix: jax.Array | None, *,
               n_weights: int = 1, tile_k: int = 256, sub: int = 1, split: int = 1, stages: int = 4,
               shared_rows: bool = False, scales_once: bool = False, interpret: bool = False) -> jax.Array:
    """``out [split, B, n_weights*Np, R]`` fp32 with ``sum_s out[s, b, w*Np + n, r] = sum_k W_w[e_b][n, k]
    rows[b, r, k] * 2^-7`` (``W = E2M1 x weight_scale``, global scale excluded).

    ``codes``: ``n_weights`` stacks ``[E, Np, Kp/2]`` uint8 (packed layout), ``scales`` the matching ``[E, Np,
    Kp/16]`` e4m3 (the stacks of one call share their shape; the MoE passes w1 and w3 together, their
    outputs side by side along N); ``rows [B, R, Kp]`` bf16 in virtual column order (:func:`to_virtual`),
    ``R`` a multiple of 8, or with ``shared_rows`` ``rows [ceil(B/R), R, Kp]`` of which block ``b`` multiplies
    ``rows[b // R]`` (blocks of one live row each, row ``b % R``, without padding each to ``R`` rows);
    ``block_matrix [B]`` int32 the matrix ``e_b`` of each block (``-1``: the block is skipped and its output
    left unwritten; ``None``: every block uses matrix 0). A pipeline step spans ``sub`` steps of ``tile_k``
    columns (fewer, larger copies). ``scales_once``: each program copies the block scales of its whole K range
    once, when it starts, instead of two small copies a step (measured no faster: 44.5 against 42.0-42.4 us for
    the batch-1 MoE in other runs of the same session, so off by default)."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    codes = codes if isinstance(codes, (tuple, list)) else (codes,)
    scales = scales if isinstance(scales, (tuple, list)) else (scales,)
    if len(codes) != n_weights or len(scales) != n_weights:
        raise ValueError(f"expected {n_weights} weight stacks, got {len(codes)} and {len(scales)}")
    n_e, np_, kp2 = codes[0].shape
    kp = 2 * kp2
    n_b, r, kr = rows.shape
    if shared_rows:
        if block_matrix is None:
            raise ValueError("shared_rows needs block_matrix")
        n_b = block_matrix.shape[0]
        if -(-n_b // r) != rows.shape[0]:
            raise ValueError(f"shared_rows: {n_b} blocks need {-(-n_b // r)} row blocks of {r}, got {rows.shape}")
    problems = [msg for bad, msg in (
        (kr != kp, f"rows have {kr} columns, the weights {kp} (packed)"),
        (r % 8 or not 8 <= r <= MAX_ROWS, f"{r} rows a block (a multiple of 8, at most {MAX_ROWS})"),
        (tile_k not in (128, 256) or sub not in (1, 2), f"tile_k {tile_k} / sub {sub} (128 or 256 / 1 or 2)"),
        (np_ % TILE_M, f"{np_} weight rows (a multiple of {TILE_M})"),
        (kp % (16 * UNIT), f"{kp} packed columns (a multiple of {16 * UNIT}: whole 16-byte rows of scales)"),
        (n_b < 1, "no blocks")) if bad]
    if problems:
        raise ValueError("block_gemv cannot take " + "; ".join(problems))
    wide = tile_k * sub  # columns a pipeline step
    steps = kp // wide
    if kp % wide:
        raise ValueError(f"pipeline steps of {wide} columns do not divide the {kp} packed columns")
    if steps % split:
        raise ValueError(f"split={split} does not divide the {steps} pipeline steps of {wide} columns")
    kper, sper = kp // split, steps // split
    nb = tile_k // 32  # scale bytes of each half a sub-step
    nbs = nb * sub  # ... a pipeline step (4, 8 or 16: never straddles a 16-byte row)
    n_tiles = np_ // TILE_M
    # Scales as rows of 16 bytes: [E, Np, Kp/256, 16]; a step's nb lo (hi) blocks start at byte nb*step (+ Kp/32).
    svs = [lax.bitcast_convert_type(s, jnp.uint8).reshape(n_e, np_, kp // (16 * UNIT), UNIT) for s in scales]
    decode = None if interpret else _decode_ptx(tile_k)
    grouped = block_matrix is not None
    nu = kper // (32 * UNIT)  # 16-byte rows of scales of each half a program
    once_ok = kp % (32 * UNIT) == 0 and kper % (32 * UNIT) == 0 and 2 * TILE_M * UNIT * nu <= ONCE_MAX_BYTES
    once = bool(scales_once)
    if once and not once_ok:
        raise ValueError(f"scales_once needs Kp and Kp/split multiples of {32 * UNIT} and at most "
                         f"{ONCE_MAX_BYTES} bytes of scales a program; got Kp {kp}, Kp/split {kper}")
    n_idx = -(-n_b // IDX_ROW) if block_matrix is not None else 0  # [rows, 128]: one TMA copy
    smem = (stages * (TILE_M * wide // 2 + r * wide * 2 + (0 if once else 2 * TILE_M * UNIT))
            + (2 * TILE_M * UNIT * nu if once else 0) + TILE_M * r * 4 + n_idx * IDX_ROW * 4
            + (TILE_M * tile_k * 2 if interpret else 0))
    if smem > SMEM_BYTES or n_idx > 256:
        raise ValueError(f"block_gemv needs {smem} bytes of shared memory ({stages} stages of {wide} columns, {r} "
                         f"rows, {n_b} blocks); one program has {SMEM_BYTES} (fewer stages, rows or blocks)")

    def body(*refs, o_smem, a_smem=None, i_smem=None, barrier=None, sl_all=None, sh_all=None, s_bars=None):
        if grouped:
            i_gmem, refs = refs[0], refs[1:]
        c_gmem, s_gmem, x_gmem, o_gmem = refs[:n_weights], refs[n_weights:2 * n_weights], refs[-2], refs[-1]
        b, mi, si = lax.axis_index("b"), lax.axis_index("m"), lax.axis_index("s")
        if grouped:
            plgpu.copy_gmem_to_smem(i_gmem, i_smem, barrier)
            plgpu.barrier_wait(barrier)
            e = i_smem[b // IDX_ROW, b % IDX_ROW]
        else:
            e = 0
        w_of = mi // n_tiles
        row0 = (mi % n_tiles) * TILE_M

        def step(idx, c_smem, *rest):
            (kk,) = idx
            if once:
                x_smem, acc = rest

                @pl.when(kk == 0)
                def _():  # this program's scales (copied before the pipeline started)
                    plgpu.barrier_wait(s_bars.at[0])
                    plgpu.barrier_wait(s_bars.at[1])
            else:
                sl_smem, sh_smem, x_smem, acc = rest
                lo = nbs * (si * sper + kk)
                off_lo, off_hi = lo % UNIT, (kp // 32 + lo) % UNIT
            for j in range(sub):
                c = c_smem.at[:, pl.ds(j * (tile_k // 2), tile_k // 2)] if sub > 1 else c_smem
                x = x_smem.at[:, pl.ds(j * tile_k, tile_k)] if sub > 1 else x_smem
                if once:
                    q = nbs * kk + j * nb  # byte of this program's scale rows
                    s_lo = sl_all.at[:, q // UNIT, pl.ds(q % UNIT, nb)]
                    s_hi = sh_all.at[:, q // UNIT, pl.ds(q % UNIT, nb)]
                else:
                    s_lo = sl_smem.at[:, 0, pl.ds(off_lo + j * nb, nb)]
                    s_hi = sh_smem.at[:, 0, pl.ds(off_hi + j * nb, nb)]
                if interpret:
                    a_smem[...] = _decode_arrays(c[...], s_lo[...], s_hi[...], tile_k)
                    plgpu.commit_smem()
                    plgpu.wgmma(acc, a_smem, x.T)
                else:
                    a = decode(plgpu.load(c, layout=plgpu.Layout.WGMMA_8BIT), s_lo, s_hi)
                    plgpu.wgmma(acc, a, x.T)
                plgpu.wgmma_wait(0)
            return acc

        c_spec, *s_specs, x_spec = pipeline_specs(wide, kp, r, si * sper)

        def run(c_ref, s_ref):
            s_rows = s_ref.at[e].at[pl.ds(row0, TILE_M)]
            if once:
                for bar, dst, u0 in ((0, sl_all, 0), (1, sh_all, kp // (32 * UNIT))):
                    plgpu.copy_gmem_to_smem(s_rows.at[:, pl.ds(u0 + si * nu, nu)], dst, s_bars.at[bar])

            @functools.partial(pl.run_scoped, acc=plgpu.ACC((TILE_M, r), jnp.float32))
            def _scope(acc):
                codes_in = c_ref.at[e].at[pl.ds(row0, TILE_M), pl.ds(si * (kper // 2), kper // 2)]
                rows_in = x_gmem.at[b // r if shared_rows else b].at[:, pl.ds(si * kper, kper)]
                specs, ins = ([c_spec, x_spec], (codes_in, rows_in)) if once else \
                    ([c_spec, *s_specs, x_spec], (codes_in, s_rows, s_rows, rows_in))
                plgpu.emit_pipeline(step, grid=(sper,), in_specs=specs, max_concurrent_steps=stages,
                                    init_carry=acc)(*ins)
                o_smem[...] = acc[...]
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[si, b, pl.ds(mi * TILE_M, TILE_M), :])
                plgpu.wait_smem_to_gmem(0)

        def weights(w):
            if n_weights == 1:
                run(c_gmem[0], s_gmem[0])
            else:
                pl.when(w_of == w)(lambda: run(c_gmem[w], s_gmem[w]))

        if grouped:
            @pl.when(e >= 0)
            def _live():
                for w in range(n_weights):
                    weights(w)
        else:
            for w in range(n_weights):
                weights(w)

    scratch = {"o_smem": plgpu.SMEM((TILE_M, r), jnp.float32, transforms=smem_transforms(r, 32))}
    if interpret:
        scratch["a_smem"] = plgpu.SMEM((TILE_M, tile_k), jnp.bfloat16, transforms=smem_transforms(tile_k, 16))
    if once:
        scratch["sl_all"] = plgpu.SMEM((TILE_M, nu, UNIT), jnp.uint8)
        scratch["sh_all"] = plgpu.SMEM((TILE_M, nu, UNIT), jnp.uint8)
        scratch["s_bars"] = plgpu.Barrier(num_arrivals=1, num_barriers=2)
    args = [*codes, *svs, rows]
    if grouped:
        idx = jnp.pad(block_matrix.astype(jnp.int32), (0, n_idx * IDX_ROW - n_b), constant_values=-1)
        args = [idx.reshape(n_idx, IDX_ROW), *args]
        scratch["i_smem"] = plgpu.SMEM((n_idx, IDX_ROW), jnp.int32)
        scratch["barrier"] = plgpu.Barrier(num_arrivals=1)
    kw = {"interpret": plgpu.InterpretGPUParams()} if interpret else {}

    def nvfp4_block_gemv_mgpu(*refs, **scratch_refs):
        body(*refs, **scratch_refs)

    call = plgpu.kernel(
        nvfp4_block_gemv_mgpu, out_type=jax.ShapeDtypeStruct((split, n_b, n_weights * np_, r), jnp.float32),
        grid=(n_b, n_weights * n_tiles, split), grid_names=("b", "m", "s"), scratch_types=scratch,
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup), **kw)
    return call(*args)


# ---------------------------------------------------------------------------------------------------------
# Dense matmul.

def matmul_config(m: int, np_: int, kp: int) -> MgpuConfig:
    """Default tiles for ``[m, kp] x [np_, kp]`` (H200, BENCHMARKS.md, session 8): 256-column steps, about
    1024 programs, 3 stages to 4 rows and 2 above (8192x8192: 18.1-18.7 us at M=1, 34.2 at M=64)."""
    return MgpuConfig(tile_k=256, split=default_split(np_ // TILE_M, kp // 256), stages=3 if m <= 4 else 2)


@functools.partial(jax.jit, static_argnames=("out_dtype", "cfg", "interpret"))
def nvfp4_matmul_mgpu(x: jax.Array, p: Nvfp4Packed, scale: jax.Array, out_dtype=jnp.bfloat16,
                      cfg: MgpuConfig | None = None, interpret: bool = False) -> jax.Array:
    """``x [M, k] @ W[n, k]^T * scale`` -> ``[M, n]``, ``1 <= M <= 64``; ``scale`` the fp32 epilogue scale
    (``weight_scale_2``, times the activation scale of the W4A4 option)."""
    m = x.shape[0]
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"nvfp4_matmul_mgpu takes 1..{MAX_ROWS} rows, got {m}")
    if p.qweight.ndim != 2 or x.ndim != 2 or x.shape[1] != p.k:
        raise ValueError(f"nvfp4_matmul_mgpu takes x [M, K] and one [N, K] weight; got {x.shape} and {p.shape}")
    kp, np_ = p.kp, p.np_
    cfg = cfg or matmul_config(m, np_, kp)
    split = cfg.split or default_split(np_ // TILE_M, kp // (cfg.tile_k * cfg.sub))
    mp = -(-m // 8) * 8
    xv = to_virtual(jnp.pad(x.astype(jnp.bfloat16), ((0, mp - m), (0, kp - x.shape[1]))), cfg.tile_k)
    out = block_gemv(p.qweight[None], p.scale[None], xv[None], None, tile_k=cfg.tile_k, sub=cfg.sub, split=split,
                     stages=cfg.stages, interpret=interpret)
    y = out.sum(0)[0, :p.n, :m].T
    return (y * (scale * UNDO_DECODE_SCALE)).astype(out_dtype)


# ---------------------------------------------------------------------------------------------------------
# Grouped MoE.

@dataclasses.dataclass(frozen=True)
class MoeMgpuConfig:
    """``schedule``: ``"pairs"`` (decode: one block per (token, expert) pair, no sort; 8 pairs' rows share one
    8-row activation block) or ``"sorted"`` (blocks of ``rows`` rows of one expert,
    :func:`~.nvfp4_moe.make_schedule`); tiles of the w13 and w2 launches (defaults: the batch-1 measurements,
    512-column steps, 2 stages, no K split)."""

    schedule: str = "pairs"
    rows: int = 8
    w13: MgpuConfig = MgpuConfig(split=1, stages=2, sub=2)
    w2: MgpuConfig = MgpuConfig(split=1, stages=2, sub=2)


def _fit(c: MgpuConfig, kp: int) -> MgpuConfig:
    """``c`` with its step and split reduced until they divide ``kp`` (for the multiples of 256 the kernel
    takes, only a 512-column step is ever shortened)."""
    while kp % (c.tile_k * c.sub):
        c = dataclasses.replace(c, sub=1) if c.sub > 1 else dataclasses.replace(c, tile_k=c.tile_k // 2)
    while c.split and (kp // (c.tile_k * c.sub)) % c.split:
        c = dataclasses.replace(c, split=c.split // 2)
    return c


def moe_supported(w1: Nvfp4Packed, w2: Nvfp4Packed, tile_k: int = 256) -> bool:
    """Whether the packed expert stacks suit the kernel (:func:`supported`)."""
    return supported(w1.kp, w1.np_, tile_k) and supported(w2.kp, w2.np_, tile_k)


def nvfp4_moe_mgpu(x: jax.Array, ids: jax.Array, weights: jax.Array, w1: Nvfp4Packed, w2: Nvfp4Packed,
                   w3: Nvfp4Packed, swiglu_limit: float, *, config: MoeMgpuConfig | None = None,
                   interpret: bool = False) -> jax.Array:
    """Routed experts, fp32 ``[T, D]``, the contract of :func:`pallas_kernels.nvfp4_moe.nvfp4_moe` (ids ``-1``
    skipped). The ``T*k`` pairs form blocks of one expert each (:class:`MoeMgpuConfig`: one pair a block, or
    sorted by expert into blocks of ``rows`` rows); one launch computes ``x w1^T`` and ``x w3^T`` for every
    block, XLA applies the global scales, the clipped SwiGLU and the routing weight, a second launch ``h w2^T``,
    and XLA sums each token's pairs."""
    t = ids.shape[0]
    if t == 0:
        return jnp.zeros((0, x.shape[1]), jnp.float32)
    from dsv4_jax.config import swiglu_bound

    return _moe(x, ids, weights, w1, w2, w3, swiglu_bound(swiglu_limit), config or MoeMgpuConfig(), interpret)


@functools.partial(jax.jit, static_argnames=("limit", "cfg", "interpret"))
def _moe(x, ids, weights, w1: Nvfp4Packed, w2: Nvfp4Packed, w3: Nvfp4Packed, limit: float, cfg: MoeMgpuConfig,
         interpret: bool):
    from .nvfp4_moe import make_schedule

    t, d = x.shape
    k = ids.shape[1]
    n_e, n_i = w1.qweight.shape[0], w1.n
    if w3.n != n_i or w1.k != d or w3.k != d or w2.k != n_i or w2.n != d or w1.qweight.shape != w3.qweight.shape:
        raise ValueError(f"expert shapes w1 {w1.shape}, w3 {w3.shape}, w2 {w2.shape} do not match D={d}")
    x = x.astype(jnp.bfloat16)
    pairs = cfg.schedule == "pairs"
    if pairs:  # block p = pair p: row block p // 8 of the pairs' rows (its own row p % 8; the others' unused)
        r = 8
        e_b = ids.reshape(-1).astype(jnp.int32)
        n_b = e_b.shape[0]
        n_rb = -(-n_b // r)
        xr = jnp.pad(jnp.repeat(x, k, axis=0), ((0, n_rb * r - n_b), (0, w1.kp - d))).reshape(n_rb, r, w1.kp)
        row_weight = weights.reshape(n_b, 1).astype(jnp.float32)
        own = (jnp.arange(n_b) % r)[:, None, None]  # each block's column of its output
    elif cfg.schedule == "sorted":
        r = cfg.rows
        sched = make_schedule(ids, weights, n_e, r)
        e_b = sched.tile_expert
        n_b = e_b.shape[0]
        xr = jnp.where((sched.row_token >= 0)[:, None], x[jnp.maximum(sched.row_token, 0)], 0)
        xr = jnp.pad(xr, ((0, 0), (0, w1.kp - d))).reshape(n_b, r, w1.kp)
        row_weight = sched.row_weight.reshape(n_b, r)
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r}")
    e_safe = jnp.maximum(e_b, 0)

    def launch(c: MgpuConfig, codes, scales, rows, n_w: int):
        np_, kp = codes[0].shape[-2], 2 * codes[0].shape[-1]
        c = _fit(c, kp)  # one configuration serves w13 and w2: shorter steps / fewer splits where K is short
        split = c.split or default_split(n_b * n_w * np_ // TILE_M, kp // (c.tile_k * c.sub))
        return block_gemv(codes, scales, to_virtual(rows, c.tile_k), e_b, n_weights=n_w, tile_k=c.tile_k,
                          sub=c.sub, split=split, stages=c.stages, shared_rows=pairs, interpret=interpret)

    o13 = launch(cfg.w13, (w1.qweight, w3.qweight), (w1.scale, w3.scale), xr, 2)
    h13 = o13.sum(0)  # [B, 2 Np, R]
    if pairs:
        h13 = jnp.take_along_axis(h13, own, axis=2)
    np1 = w1.np_
    a = h13[:, :n_i] * (UNDO_DECODE_SCALE * w1.weight_scale_2[e_safe])[:, None, None]
    u = h13[:, np1:np1 + n_i] * (UNDO_DECODE_SCALE * w3.weight_scale_2[e_safe])[:, None, None]
    a = jnp.minimum(a, limit)
    u = jnp.clip(u, -limit, limit)
    h = jax.nn.silu(a) * u * row_weight[:, None, :]  # [B, I, R] (R = 1: pairs)
    h = jnp.pad(h.transpose(0, 2, 1).astype(jnp.bfloat16), ((0, 0), (0, 0), (0, w2.kp - n_i)))
    if pairs:
        h = jnp.pad(h[:, 0], ((0, n_rb * r - n_b), (0, 0))).reshape(n_rb, r, w2.kp)
    o2 = launch(cfg.w2, (w2.qweight,), (w2.scale,), h, 1)
    scale2 = UNDO_DECODE_SCALE * w2.weight_scale_2[e_safe]
    if pairs:
        y = jnp.take_along_axis(o2.sum(0)[:, :d], own, axis=2)[..., 0] * scale2[:, None]  # [P, D]
        y = jnp.where((e_b >= 0)[:, None], y, 0.0)  # skipped pairs' blocks are unwritten
    else:
        y = o2.sum(0)[:, :d] * scale2[:, None, None]  # [B, D, R]
        y = y.transpose(0, 2, 1).reshape(n_b * r, d)
        y = jnp.where((ids.reshape(-1) >= 0)[:, None], y[sched.pair_slot], 0.0)  # unused blocks are unwritten
    return y.reshape(t, k, d).sum(axis=1)


# ---------------------------------------------------------------------------------------------------------
# numpy model of the PTX path (CPU tests).

def emulate_block_gemv(codes: np.ndarray, scales: np.ndarray, rows: np.ndarray, tile_k: int) -> np.ndarray:
    """What :func:`block_gemv` computes for one matrix and one block, modelled on the data movement of the PTX
    path: ``codes [Np, Kp/2]`` packed bytes, ``scales [Np, Kp/16]`` e4m3, ``rows [R, Kp]`` in virtual order ->
    ``[Np, R]`` float64 (``x 2^-7``). Each thread's 4 bytes ``16g + 4t' .. +3`` go through the bit-level model
    of the PTX (:func:`~.nvfp4_layout.emulate_decode_ptx`) into registers ``4g .. 4g+3``, columns ``8G + 2t'
    + e``, each times the scale its register reads."""
    from .nvfp4_layout import emulate_decode_ptx

    np_, kp2 = codes.shape
    kp = 2 * kp2
    sv = np.asarray(scales).view(np.uint8) if scales.dtype != np.uint8 else scales
    s_val = sv.view(jnp.float8_e4m3fn).astype(np.float64)
    a = np.zeros((np_, kp))
    words = np.ascontiguousarray(codes).view("<u4")  # [Np, Kp/8]
    nb = tile_k // 32
    for n in range(np_):
        for step in range(kp // tile_k):
            for g in range(nb):
                for tq in range(4):
                    w = int(words[n, (step * tile_k // 2 + 16 * g + 4 * tq) // 4])
                    lo, hi = emulate_decode_ptx(w)
                    for half, bits in enumerate((lo, hi)):
                        blk = half * (kp // 32) + step * nb + g
                        for j in range(2):
                            for e in range(2):
                                v = np.array([bits[2 * j + e]], np.uint16).view(jnp.bfloat16).astype(np.float64)[0]
                                col = step * tile_k + 8 * (4 * g + 2 * half + j) + 2 * tq + e
                                a[n, col] = v * 2.0**126 * s_val[n, blk] * 2.0**DECODE_LOG2
    return a @ np.asarray(rows, np.float64).T
