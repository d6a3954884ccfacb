"""Dense NVFP4 x bf16 matmul ``y = x @ W^T`` (W4A16) in Pallas-Triton, with its pure-JAX reference.

``x [M, K]`` bf16, ``W [N, K]`` NVFP4 in kernel layout (:mod:`pallas_kernels.nvfp4_layout`) -> ``y [M, N]``.
Each program owns a ``[bm, bn]`` output tile (or one K slice of it under split-K) and walks K in steps of
``bk``: it loads ``bn x bk/2`` bytes of codes and the matching e4m3 scales, decodes them exactly into two
bf16 tiles (lo and hi codes: two contiguous K ranges, see the layout module; both ``W x 2^-7``), and runs
two bf16 dots with fp32 accumulation. The fp32 global scale times ``2^7`` (times the activation scale of the
W4A4 option) multiplies the accumulator in the epilogue. With ``swap_ab`` the weights are the left operand (``W_tile @ x_tile^T``),
so that a decode-sized M (16) is the narrow side of the tensor-core tile. Split-K writes fp32 partial sums
that one small XLA reduction adds up.

With ``method="fma"`` (a few rows, default for one row of a large matrix) the decoded tiles are multiplied on
the CUDA cores in fp32 instead: a decode-sized product has one live row, and the tensor-core path pads it to 16
and moves every decoded weight into the MMA operand layout.

On Hopper, decode-sized M (<= 64) dispatches to the Mosaic GPU kernel of :mod:`pallas_kernels.nvfp4_mgpu`
(``method="mgpu"``), which reads the same packed weights, where it measured faster (:func:`mgpu_pays`).

For large M a second path, :func:`nvfp4_dequantize` (an elementwise Pallas kernel writing the exact bf16
weights once) followed by cuBLAS through ``jnp.dot``, costs one weight pass amortised over M rows.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from dsv4_jax import quant

from . import nvfp4_mgpu
from .nvfp4_layout import UNDO_DECODE_SCALE, Nvfp4Packed, decode_asm, decode_int, decode_tile, unpack_nvfp4


@dataclasses.dataclass(frozen=True)
class MatmulConfig:
    """Tile sizes and schedule of one launch. ``method``: ``"fused"`` (decode inside a tensor-core matmul),
    ``"fma"`` (decode and multiply on the CUDA cores, fp32 FMAs; a GEMV for a few rows, ``bm`` unused) or
    ``"dequant_dot"`` (Pallas dequantise + cuBLAS) or ``"mgpu"`` (the Mosaic GPU kernel of
    :mod:`pallas_kernels.nvfp4_mgpu`, Hopper only: ``bk`` its pipeline step (128, 256 or 512 columns),
    ``split_k`` and ``num_stages`` its split and pipeline depth, ``split_k=0`` its default); ``decode``:
    ``"asm"`` (inline PTX) or ``"int"``."""

    bm: int = 16
    bn: int = 64
    bk: int = 256
    split_k: int = 1
    swap_ab: bool = True
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8
    decode: str = "asm"
    method: str = "fused"


def mgpu_config(m: int, n: int, k: int) -> MatmulConfig:
    """The Mosaic GPU kernel's configuration (:func:`pallas_kernels.nvfp4_mgpu.matmul_config`: 256-column
    steps, about 1024 programs, 3 stages to 4 rows and 2 above; H200, BENCHMARKS.md, session 8: 8192x8192 M=1
    18.1-18.7 us against 24.6 for the Triton kernel, M=64 34.2 against 53.3)."""
    c = nvfp4_mgpu.matmul_config(m, n, k)
    return MatmulConfig(method="mgpu", bk=c.tile_k * c.sub, split_k=c.split, num_stages=c.stages)


def mgpu_pays(m: int, n: int, k: int) -> bool:
    """Where the Mosaic GPU kernel measured faster: up to 16 rows at every shape tried, up to 64 rows on
    matrices of 2^26+ weights (the expert matrices at M=64: 11.5 against 10.9 us)."""
    return m <= 16 or (m <= nvfp4_mgpu.MAX_ROWS and n * k >= 1 << 26)


def default_config(m: int, n: int, k: int, *, mgpu: bool = True) -> MatmulConfig:
    """Per-shape configuration for ``x [m, k] @ W[n, k]^T`` with the *padded* weight sizes (H200 measurements,
    BENCHMARKS.md): on Hopper the Mosaic GPU kernel where it pays (:func:`mgpu_pays`, :func:`mgpu_config`;
    ``mgpu=False``: never); else decode-sized M uses swapped operands, small tiles and split-K to fill 132
    SMs; large M dequantises once and calls cuBLAS."""
    if mgpu and mgpu_pays(m, n, k) and nvfp4_mgpu.supported(k, n) and nvfp4_mgpu.available():
        return mgpu_config(m, n, k)
    if m > 64:
        # Measured (BENCHMARKS.md): from M = 256 on, one exact bf16 dequantisation + cuBLAS beats the fused
        # Triton kernel (8192x8192: 107 vs 128 us at M=256, 749 vs 1938 us at M=4096).
        return MatmulConfig(method="dequant_dot")
    if m <= 16:
        bm = 16
    elif m <= 32:
        bm = 32
    else:
        bm = 64
    # Split K until about 1024 programs (8 per SM), keeping >= 2 K steps per program.
    bn, bk = 64, 256
    tiles = -(-n // bn)
    split = 1
    while split < 8 and tiles * split * 2 <= 1024 and k % (bk * split * 2) == 0 and k // (bk * split * 2) >= 2:
        split *= 2
    if m == 1 and n * k >= 1 << 25:
        # 8192x8192, M=1 (BENCHMARKS.md): CUDA-core rows 24.9 us (bn 64, split 8, 8 warps, 2 stages; about 25 for
        # every tile tried) against 27.8 for the tensor-core kernel; at M=4 they take 51 us (4 rows of FMAs).
        return MatmulConfig(bn=64, bk=256, split_k=split, num_warps=8, num_stages=2, method="fma")
    # 8192x8192, M=1 (BENCHMARKS.md): bn 64, bk 256, split 8, 3 stages 27.7 us; 4 stages 30.0, 6 stages 36.0.
    return MatmulConfig(bm=bm, bn=bn, bk=bk, split_k=split, swap_ab=True, num_warps=4, num_stages=3)


def nvfp4_matmul_reference(x: jax.Array, w: quant.Nvfp4, out_dtype=jnp.bfloat16,
                           act_scale: jax.Array | None = None) -> jax.Array:
    """Reference: ``(x @ (E2M1 x weight_scale)^T) * weight_scale_2 [* act_scale]`` with exact bf16 weights,
    fp32 accumulation (this is ``quant.linear(x, w, bfloat16, out_dtype)``)."""
    y = quant.matmul("mk,nk->mn", x.astype(jnp.bfloat16), quant.dequantize(w, jnp.bfloat16))
    y = y * w.weight_scale_2
    if act_scale is not None:
        y = y * act_scale
    return y.astype(out_dtype)


def _decoder(cfg: MatmulConfig, interpret: bool):
    return decode_int if (interpret or cfg.decode == "int") else decode_asm


def _dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a [P, C] @ b [Q, C]^T`` -> fp32 ``[P, Q]``."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _tile_ids(pid, n_m: int, n_n: int, group_m: int):
    """Grouped ordering of output tiles (neighbouring programs share weight tiles in L2)."""
    width = group_m * n_n
    group = pid // width
    first_m = group * group_m
    size_m = jnp.minimum(n_m - first_m, group_m)
    pm = first_m + (pid % width) % size_m
    pn = (pid % width) // size_m
    return pm, pn


def _matmul_kernel(x_ref, q_ref, s_ref, g_ref, o_ref, *, cfg: MatmulConfig, m: int, n: int, k: int,
                   kp: int, np_: int, steps: int, interpret: bool):
    bm, bn, bkh = cfg.bm, cfg.bn, cfg.bk // 2
    half = kp // 2
    decode = _decoder(cfg, interpret)
    pm, pn = _tile_ids(pl.program_id(0), pl.cdiv(m, bm), np_ // bn, cfg.group_m)
    sk = pl.program_id(1)
    rows = pm * bm + jax.lax.broadcasted_iota(jnp.int32, (bm,), 0)
    row_ok = rows < m
    mask_rows = m % bm != 0
    mask_k = k != kp

    def load_x(start):
        ref = x_ref.at[pl.ds(pm * bm, bm), pl.ds(start, bkh)]
        if not (mask_rows or mask_k):
            return ref[...]
        cols = start + jax.lax.broadcasted_iota(jnp.int32, (bkh,), 0)
        return plt.load(ref, mask=row_ok[:, None] & (cols < k)[None, :], other=0.0)

    def body(t, acc):
        j0 = pl.multiple_of((sk * steps + t) * bkh, bkh)
        w_lo, w_hi = decode_tile(q_ref, s_ref, (), pl.ds(pn * bn, bn), j0, bkh, half, decode)
        x_lo, x_hi = load_x(j0), load_x(half + j0)
        if cfg.swap_ab:
            return acc + _dot_nt(w_lo, x_lo) + _dot_nt(w_hi, x_hi)
        return acc + _dot_nt(x_lo, w_lo) + _dot_nt(x_hi, w_hi)

    shape = (bn, bm) if cfg.swap_ab else (bm, bn)
    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros(shape, jnp.float32))
    if cfg.swap_ab:
        acc = acc.T
    cols = pn * bn + jax.lax.broadcasted_iota(jnp.int32, (bn,), 0)
    mask = row_ok[:, None] & (cols < n)[None, :]
    if cfg.split_k == 1:
        out = (acc * (g_ref[0] * UNDO_DECODE_SCALE)).astype(o_ref.dtype)
        plt.store(o_ref.at[pl.ds(pm * bm, bm), pl.ds(pn * bn, bn)], out, mask=mask)
    else:
        plt.store(o_ref.at[sk, pl.ds(pm * bm, bm), pl.ds(pn * bn, bn)], acc, mask=mask)


def _fma_kernel(x_ref, q_ref, s_ref, g_ref, o_ref, *, cfg: MatmulConfig, m: int, n: int, k: int, kp: int,
                steps: int, interpret: bool):
    """CUDA-core GEMV: each of the ``m`` rows of ``x`` times the decoded ``[bn, bk]`` weight tile, summed over
    K in fp32 (no tensor cores, so no operand layout conversion of the decoded weights)."""
    bn, bkh = cfg.bn, cfg.bk // 2
    half = kp // 2
    decode = _decoder(cfg, interpret)
    pn, sk = pl.program_id(0), pl.program_id(1)

    def load_x(r, start):  # [1, bkh]
        ref = x_ref.at[pl.ds(r, 1), pl.ds(start, bkh)]
        if k == kp:
            return ref[...].astype(jnp.float32)
        cols = start + jax.lax.broadcasted_iota(jnp.int32, (1, bkh), 1)
        return plt.load(ref, mask=cols < k, other=0.0).astype(jnp.float32)

    def body(t, accs):
        j0 = pl.multiple_of((sk * steps + t) * bkh, bkh)
        w_lo, w_hi = decode_tile(q_ref, s_ref, (), pl.ds(pn * bn, bn), j0, bkh, half, decode)
        w_lo, w_hi = w_lo.astype(jnp.float32), w_hi.astype(jnp.float32)
        return tuple(acc + jnp.sum(w_lo * load_x(r, j0) + w_hi * load_x(r, half + j0), axis=1)
                     for r, acc in enumerate(accs))

    accs = jax.lax.fori_loop(0, steps, body, tuple(jnp.zeros((bn,), jnp.float32) for _ in range(m)))
    cols = pn * bn + jax.lax.broadcasted_iota(jnp.int32, (bn,), 0)
    for r, acc in enumerate(accs):
        if cfg.split_k == 1:
            out = (acc * (g_ref[0] * UNDO_DECODE_SCALE)).astype(o_ref.dtype)
            plt.store(o_ref.at[pl.ds(r, 1), pl.ds(pn * bn, bn)], out[None, :], mask=(cols < n)[None, :])
        else:
            plt.store(o_ref.at[sk, pl.ds(r, 1), pl.ds(pn * bn, bn)], acc[None, :], mask=(cols < n)[None, :])


FMA_MAX_M = 8
"""Most rows the ``fma`` method takes (its accumulators are unrolled per row)."""


def _check(cfg: MatmulConfig, kp: int, np_: int) -> None:
    if np_ % cfg.bn or kp % (cfg.bk * cfg.split_k):
        raise ValueError(f"config {cfg} does not tile the padded weight [{np_}, {kp}]")


@functools.partial(jax.jit, static_argnames=("out_dtype", "cfg", "interpret"))
def _fused(x, p: Nvfp4Packed, scale, out_dtype, cfg: MatmulConfig, interpret: bool):
    m, k = x.shape
    n, kp, np_ = p.n, p.kp, p.np_
    _check(cfg, kp, np_)
    steps = kp // (cfg.bk * cfg.split_k)
    if cfg.split_k == 1:
        out_shape = jax.ShapeDtypeStruct((m, n), out_dtype)
    else:
        out_shape = jax.ShapeDtypeStruct((cfg.split_k, m, n), jnp.float32)
    if cfg.method == "fma":
        if m > FMA_MAX_M:
            raise ValueError(f"the fma method takes at most {FMA_MAX_M} rows, got {m}")
        grid = (np_ // cfg.bn, cfg.split_k)
        kernel = functools.partial(_fma_kernel, cfg=cfg, m=m, n=n, k=k, kp=kp, steps=steps, interpret=interpret)
    else:
        grid = (pl.cdiv(m, cfg.bm) * (np_ // cfg.bn), cfg.split_k)
        kernel = functools.partial(_matmul_kernel, cfg=cfg, m=m, n=n, k=k, kp=kp, np_=np_, steps=steps,
                                   interpret=interpret)
    y = pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, interpret=interpret, name="nvfp4_matmul",
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    )(x.astype(jnp.bfloat16), p.qweight, p.scale, scale.reshape(1))
    if cfg.split_k == 1:
        return y
    return (y.sum(0) * (scale * UNDO_DECODE_SCALE)).astype(out_dtype)


def _dequant_kernel(q_ref, s_ref, o_ref, *, bn: int, bkh: int, n: int, k: int, kp: int, decode):
    pn, pk = pl.program_id(0), pl.program_id(1)
    half = kp // 2
    j0 = pk * bkh
    w_lo, w_hi = decode_tile(q_ref, s_ref, (), pl.ds(pn * bn, bn), j0, bkh, half, decode)
    # Exact: the decoded tiles are W x 2^DECODE_LOG2 with at most 6 significant bits, in the normal range.
    w_lo, w_hi = w_lo * UNDO_DECODE_SCALE, w_hi * UNDO_DECODE_SCALE
    rows = pn * bn + jax.lax.broadcasted_iota(jnp.int32, (bn,), 0)
    cols = j0 + jax.lax.broadcasted_iota(jnp.int32, (bkh,), 0)
    row_ok = (rows < n)[:, None]
    plt.store(o_ref.at[pl.ds(pn * bn, bn), pl.ds(j0, bkh)], w_lo, mask=row_ok & (cols < k)[None, :])
    plt.store(o_ref.at[pl.ds(pn * bn, bn), pl.ds(half + j0, bkh)], w_hi,
              mask=row_ok & (cols + half < k)[None, :])


@functools.partial(jax.jit, static_argnames=("decode", "interpret"))
def nvfp4_dequantize(p: Nvfp4Packed, decode: str = "asm", interpret: bool = False) -> jax.Array:
    """Pallas kernel: the exact bf16 matrix ``E2M1 x weight_scale`` ``[n, k]`` (global scale excluded)."""
    bn, bkh = 64, 128
    kp, np_ = p.kp, p.np_
    bkh = min(bkh, kp // 2)
    dec = decode_int if (interpret or decode == "int") else decode_asm
    kernel = functools.partial(_dequant_kernel, bn=bn, bkh=bkh, n=p.n, k=p.k, kp=kp, decode=dec)
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((p.n, p.k), jnp.bfloat16), grid=(np_ // bn, kp // 2 // bkh),
        interpret=interpret, name="nvfp4_dequantize",
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=1),
    )(p.qweight, p.scale)


def nvfp4_matmul(x: jax.Array, p: Nvfp4Packed, out_dtype=jnp.bfloat16, *, act_scale: jax.Array | None = None,
                 config: MatmulConfig | None = None, interpret: bool = False) -> jax.Array:
    """``x [..., K] @ W[N, K]^T * weight_scale_2 [* act_scale]`` -> ``[..., N]`` in ``out_dtype``.

    ``x`` is cast to bf16 (the W4A16 product); ``act_scale`` is the fp32 activation global scale of the W4A4
    option (:mod:`pallas_kernels.nvfp4_act`)."""
    if p.qweight.ndim != 2:
        raise ValueError(f"nvfp4_matmul takes one [N, K] weight, got {p.shape}")
    if x.shape[-1] != p.k:
        raise ValueError(f"x has {x.shape[-1]} inputs, the weight {p.k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, p.k)
    m = x2.shape[0]
    cfg = config or default_config(m, p.np_, p.kp)
    scale = p.weight_scale_2.astype(jnp.float32)
    if act_scale is not None:
        scale = scale * jnp.asarray(act_scale, jnp.float32)
    if m == 0:
        return jnp.zeros((*lead, p.n), out_dtype)
    if cfg.method == "mgpu":
        mcfg = nvfp4_mgpu.MgpuConfig.from_step(cfg.bk, cfg.split_k or None, cfg.num_stages)
        y = nvfp4_mgpu.nvfp4_matmul_mgpu(x2, p, scale, jnp.dtype(out_dtype), mcfg, interpret)
    elif cfg.method == "dequant_dot":
        w = nvfp4_dequantize(p, decode=cfg.decode, interpret=interpret)
        y = jnp.dot(x2.astype(jnp.bfloat16), w.T, preferred_element_type=jnp.float32)
        y = (y * scale).astype(out_dtype)
    else:
        y = _fused(x2, p, scale, jnp.dtype(out_dtype), cfg, interpret)
    return y.reshape(*lead, p.n)


def reference_from_packed(x: jax.Array, p: Nvfp4Packed, out_dtype=jnp.bfloat16) -> jax.Array:
    """:func:`nvfp4_matmul_reference` on a packed weight (unpacks it first)."""
    return nvfp4_matmul_reference(x, unpack_nvfp4(p), out_dtype)
