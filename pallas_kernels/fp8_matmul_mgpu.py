"""FP8 e4m3 x bf16 decode-shaped matmul for Hopper in Mosaic GPU (``plgpu``): the second backend beside the
Pallas-Triton kernel of :mod:`pallas_kernels.fp8_matmul`, for ``M <= 64`` rows on sm_90.

``x [M, K]`` bf16, ``W [N, K]`` e4m3 with ``scale [ceil(N/128), ceil(K/128)]`` UE8M0 -> ``y [M, N]``; the
same contract and reference (:func:`pallas_kernels.fp8_matmul.fp8_matmul_reference`), exact products with
fp32 accumulation.

The product is computed transposed, ``y^T = W x^T``, so the weight is the wgmma's 64-row left operand and the
few activation rows its narrow right operand (M rounded up to 8: zero rows, filled by TMA for one row).
Each program owns 64 weight rows and a range of K; TMA streams ``[64, 128]`` weight tiles and ``[M, 128]``
activation tiles through shared memory; each weight tile is loaded into registers, converted e4m3 -> fp32 ->
bf16 (both exact) and fed to ``wgmma`` from registers; the tile's fp32 partial product is multiplied by its
power-of-two block scale (exact) before it joins the accumulator.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
from jax import lax

from dsv4_jax import quant

BLOCK = quant.FP8_BLOCK
TILE_M = 64
"""Weight rows per program: one warpgroup's wgmma M."""
MAX_M = 64
"""Largest activation row count this kernel takes (wgmma N <= 256; beyond decode shapes the other
formulations win)."""


@functools.cache
def available() -> bool:
    """Whether the default device is a Hopper GPU (sm_90) and this jax has Mosaic GPU's Pallas API."""
    try:
        dev = jax.devices()[0]
        if dev.platform not in ("gpu", "cuda") or not str(dev.compute_capability).startswith("9"):
            return False
        importlib.import_module("jax.experimental.pallas.mosaic_gpu")
    except Exception:  # noqa: BLE001
        return False
    return True


_ONE_ROW_READ_PAST = tuple(int(v) for v in jax.__version__.split(".")[:2]) < (0, 12)
"""jax 0.11 lowers an 8-row activation block over a one-row array (TMA zero-fills the rest); jax 0.12 refuses the
out-of-bounds block when it traces the kernel, so the row is padded there."""


def supported(m: int, n: int, k: int) -> bool:
    """Shapes the kernel takes: ``1 <= M <= 64``, ``N`` a multiple of 64, ``K`` of 128 and at most 32768 (one
    TMA copy of a row of block scales)."""
    return 1 <= m <= MAX_M and n % TILE_M == 0 and k % BLOCK == 0 and n > 0 and 0 < k <= 256 * BLOCK


def default_split(n: int, k: int) -> int:
    """Split of K so that about 256 programs run (two per SM), keeping at least two 128-column steps each."""
    kb = k // BLOCK
    split = 1
    while (n // TILE_M) * split < 256 and kb % (split * 2) == 0 and kb // (split * 2) >= 2:
        split *= 2
    return split


def _kernel(w_gmem, x_gmem, s_gmem, o_gmem, *, o_smem, s_smem, barrier, a_smem_scratch=None, kper: int,
            steps: int, stages: int, mp: int):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    mi = lax.axis_index("m")
    si = lax.axis_index("s")
    # The block scales of this program's 128-row block (one small TMA copy).
    plgpu.copy_gmem_to_smem(s_gmem.at[(mi * TILE_M) // BLOCK], s_smem, barrier)
    plgpu.barrier_wait(barrier)
    s0 = si * steps

    def step(idx, a_smem, b_smem, acc):
        (kk,) = idx
        a = a_smem[...].astype(jnp.float32).astype(jnp.bfloat16)  # (Hopper has no e4m3 -> bf16 conversion)

        def product(r):
            if a_smem_scratch is not None:  # the GPU interpreter has no register operand: the same values via SMEM
                a_smem_scratch[...] = a
                plgpu.commit_smem()
                plgpu.wgmma(r, a_smem_scratch, b_smem.T)
            else:
                plgpu.wgmma(r, a, b_smem.T)
            return r[...]

        part = pl.run_scoped(product, plgpu.ACC((TILE_M, mp), jnp.float32))
        scale = s_smem[s0 + kk]
        if s_smem.dtype == jnp.uint8:  # UE8M0 byte -> 2^(byte - 127) as quant.e8m0_to_f32 (0: 2^-127, 255: NaN)
            e = scale.astype(jnp.int32)
            bits = jnp.where(e == 0, 1 << 22, jnp.where(e == 255, 0x7FC00000, e << 23))
            scale = lax.bitcast_convert_type(jnp.full((TILE_M, mp), bits, jnp.int32), jnp.float32)
        return acc + part * scale

    w_tr = smem_transforms(BLOCK, 8)
    x_tr = smem_transforms(BLOCK, 16)
    acc = plgpu.emit_pipeline(
        step, grid=(steps,), max_concurrent_steps=stages,
        in_specs=[plgpu.BlockSpec((TILE_M, BLOCK), lambda kk: (0, kk), transforms=w_tr),
                  plgpu.BlockSpec((mp, BLOCK), lambda kk: (0, kk), transforms=x_tr)],
        init_carry=jnp.zeros((TILE_M, mp), jnp.float32),
    )(w_gmem.at[pl.ds(mi * TILE_M, TILE_M), pl.ds(si * kper, kper)], x_gmem.at[:, pl.ds(si * kper, kper)])
    o_smem[...] = acc
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[si, pl.ds(mi * TILE_M, TILE_M)])
    plgpu.wait_smem_to_gmem(0)


def smem_transforms(row_elems: int, elem_bits: int):
    """The widest swizzle for shared-memory rows of ``row_elems`` elements, with its (8, swizzle) tiling."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    swizzle = plgpu.find_swizzle(row_elems * elem_bits)
    return plgpu.TilingTransform((8, swizzle * 8 // elem_bits)), plgpu.SwizzleTransform(swizzle)


@functools.partial(jax.jit, static_argnames=("out_dtype", "split", "stages", "interpret"))
def fp8_matmul_mgpu(x: jax.Array, w: quant.Fp8Block, out_dtype=jnp.bfloat16, *, split: int | None = None,
                    stages: int = 4, interpret: bool = False) -> jax.Array:
    """``x [M, K] @ W[N, K]^T`` -> ``[M, N]`` (see the module docstring). ``split``: programs along K (default
    :func:`default_split`); ``interpret``: Mosaic GPU's interpreter (CPU tests; the weight tile then reaches
    the wgmma through shared memory instead of registers)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    m, k = x.shape
    n = w.weight.shape[0]
    if not supported(m, n, k):
        raise ValueError(f"fp8_matmul_mgpu takes 1 <= M <= {MAX_M}, N % {TILE_M} == 0 and K % {BLOCK} == 0; "
                         f"got M={m}, N={n}, K={k}")
    kb = k // BLOCK
    split = default_split(n, k) if split is None else split
    if kb % split:
        raise ValueError(f"split={split} does not divide the {kb} K blocks")
    mp = -(-m // 8) * 8
    if kb % 16 == 0:  # rows of UE8M0 bytes are whole 16-byte TMA units: the kernel converts them
        ns, s = kb, lax.bitcast_convert_type(w.scale, jnp.uint8)
    else:  # else fp32 (one small XLA launch), rows padded to 16 bytes
        ns = -(-kb // 4) * 4
        s = jnp.pad(quant.e8m0_to_f32(w.scale), ((0, 0), (0, ns - kb)))
    kw = {"interpret": plgpu.InterpretGPUParams()} if interpret else {}
    scratch = {"o_smem": plgpu.SMEM((TILE_M, mp), jnp.float32, transforms=smem_transforms(mp, 32)),
               "s_smem": plgpu.SMEM((ns,), s.dtype), "barrier": plgpu.Barrier(num_arrivals=1)}
    if interpret:
        scratch["a_smem_scratch"] = plgpu.SMEM((TILE_M, BLOCK), jnp.bfloat16, transforms=smem_transforms(BLOCK, 16))

    def fp8_block_matmul_mgpu(*refs, **scratch_refs):
        _kernel(*refs, **scratch_refs, kper=k // split, steps=kb // split, stages=stages, mp=mp)

    call = plgpu.kernel(
        fp8_block_matmul_mgpu, out_type=jax.ShapeDtypeStruct((split, n, mp), jnp.float32),
        grid=(n // TILE_M, split), grid_names=("m", "s"), scratch_types=scratch,
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup), **kw)
    x = x.astype(jnp.bfloat16)
    if m != mp and (m != 1 or interpret or not _ONE_ROW_READ_PAST):
        # Rows past M are zeros: TMA fills them for a single row where this jax lets the block read past the
        # array (one launch fewer); other partial tiles are padded here.
        x = jnp.pad(x, ((0, mp - m), (0, 0)))
    y = call(w.weight, x, s)  # [split, N, mp]
    return y.sum(0)[:, :m].T.astype(out_dtype)
