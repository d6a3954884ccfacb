"""FP8 e4m3 x bf16 decode-shaped matmul for Hopper in Mosaic GPU (``plgpu``): the second backend beside the
Pallas-Triton kernel of :mod:`pallas_kernels.fp8_matmul`, for ``M <= 64`` rows on sm_90.

``x [M, K]`` bf16, ``W [N, K]`` e4m3 with ``scale [ceil(N/128), ceil(K/128)]`` UE8M0 -> ``y [M, N]``; the
same contract and reference (:func:`pallas_kernels.fp8_matmul.fp8_matmul_reference`).

The product is computed transposed, ``y^T = W x^T``, so the weight is the wgmma's 64-row left operand and the
few activation rows its narrow right operand (N = M rounded up to 8). Each program owns 64 weight rows and a
range of K; TMA streams ``[64, 128]`` weight tiles and ``[M, 128]`` activation tiles through shared memory;
each tile is loaded into registers, converted e4m3 -> f16 by the hardware conversion (exact: e4m3 is a subset
of f16) and fed to ``wgmma`` from registers; the tile's fp32 partial product is multiplied by its power-of-two
block scale (exact) before it joins the accumulator.

Hopper converts e4m3 only to f16 in hardware, and wgmma needs both operands in one type, so the activations
enter as f16: each row is multiplied by a power of two ``2^-e`` that brings its largest magnitude into
``[2^14, 2^15)``, and the output row by ``2^e`` (:func:`activations_f16`). A bf16 value has 8 significant
bits and f16 11, so every element within ``2^31`` of its row's largest magnitude converts exactly; smaller ones
are rounded to f16's subnormal grid, an absolute error below ``2^-39`` of the row maximum (far below the fp32
accumulation's own rounding).
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


E_MIN, E_MAX = -126, 113
"""Range of the per-row exponent ``e`` (so that ``2^e`` and ``2^-e`` are normal fp32 numbers)."""


def _pow2(e: jax.Array) -> jax.Array:
    """``2^e`` in fp32 for integer ``e`` in ``[-126, 127]``, by placing ``e + 127`` in the exponent field."""
    return jax.lax.bitcast_convert_type((e + 127) << 23, jnp.float32)


def activations_f16(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x [M, K]`` -> ``(x * 2^-e [M, K] f16, 2^e [M] fp32)`` with ``e`` the exponent that brings the row's
    largest magnitude into ``[2^14, 2^15)``, clipped to ``[-126, 113]`` (rows of zeros, and rows of
    magnitudes below ``2^-112``, take ``2^126``; a non-finite row stays non-finite)."""
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=-1)
    biased = jax.lax.bitcast_convert_type(amax, jnp.int32) >> 23  # floor(log2(amax)) + 127 for normal amax
    e = jnp.clip(biased - 127 - 14, E_MIN, E_MAX)
    return (xf * _pow2(-e)[:, None]).astype(jnp.float16), _pow2(e)


def _kernel(w_gmem, x_gmem, s_gmem, o_gmem, *, o_smem, s_smem, barrier, a_smem_scratch=None, kper: int,
            steps: int, stages: int, mp: int):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    mi = lax.axis_index("m")
    si = lax.axis_index("s")
    # The fp32 block scales of this program's 128-row block (one small TMA copy).
    plgpu.copy_gmem_to_smem(s_gmem.at[(mi * TILE_M) // BLOCK], s_smem, barrier)
    plgpu.barrier_wait(barrier)
    s0 = si * steps

    def step(idx, a_smem, b_smem, acc):
        (kk,) = idx
        a = a_smem[...].astype(jnp.float16)

        def product(r):
            if a_smem_scratch is not None:  # GPU-interpret mode has no register operands: the same values through SMEM
                a_smem_scratch[...] = a
                plgpu.commit_smem()
                plgpu.wgmma(r, a_smem_scratch, b_smem.T)
            else:
                plgpu.wgmma(r, a, b_smem.T)
            return r[...]

        part = pl.run_scoped(product, plgpu.ACC((TILE_M, mp), jnp.float32))
        return acc + part * s_smem[s0 + kk]

    w_tr = _transforms(BLOCK * 8)
    x_tr = _transforms(BLOCK * 16)
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


def _transforms(row_bits: int):
    import jax.experimental.pallas.mosaic_gpu as plgpu

    swizzle = plgpu.find_swizzle(row_bits)
    return plgpu.TilingTransform((8, swizzle * 8 // (row_bits // BLOCK))), plgpu.SwizzleTransform(swizzle)


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
    x16, f = activations_f16(x)
    x16 = jnp.pad(x16, ((0, mp - m), (0, 0)))
    ns = -(-kb // 4) * 4  # a row of scales is a whole number of 16-byte TMA units
    s = quant.e8m0_to_f32(w.scale)
    if ns != kb:
        s = jnp.pad(s, ((0, 0), (0, ns - kb)))
    kw = {"interpret": plgpu.InterpretGPUParams()} if interpret else {}
    o_tr = plgpu.find_swizzle(mp * 32)
    o_transforms = (plgpu.TilingTransform((8, o_tr * 8 // 32)), plgpu.SwizzleTransform(o_tr))
    scratch = {"o_smem": plgpu.SMEM((TILE_M, mp), jnp.float32, transforms=o_transforms),
               "s_smem": plgpu.SMEM((ns,), jnp.float32), "barrier": plgpu.Barrier(num_arrivals=1)}
    if interpret:
        scratch["a_smem_scratch"] = plgpu.SMEM((TILE_M, BLOCK), jnp.float16, transforms=_transforms(BLOCK * 16))

    def fp8_block_matmul_mgpu(*refs, **scratch_refs):
        _kernel(*refs, **scratch_refs, kper=k // split, steps=kb // split, stages=stages, mp=mp)

    call = plgpu.kernel(
        fp8_block_matmul_mgpu, out_type=jax.ShapeDtypeStruct((split, n, mp), jnp.float32),
        grid=(n // TILE_M, split), grid_names=("m", "s"), scratch_types=scratch,
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup), **kw)
    y = call(w.weight, x16, s)  # [split, N, mp]
    return (y.sum(0)[:, :m].T * f[:, None]).astype(out_dtype)
