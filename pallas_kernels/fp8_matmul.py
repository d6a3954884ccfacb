"""FP8 e4m3 x bf16 matmul with 128x128 power-of-two block scales (attention and shared-expert weights,
CHECKPOINT.md §3.4), in Pallas-Triton and as an XLA formulation, with the pure-JAX reference.

``x [M, K]`` bf16, ``W [N, K]`` e4m3 with ``scale [ceil(N/128), ceil(K/128)]`` UE8M0 -> ``y [M, N]``.
The weights are used in their stored layout (no repacking). The kernel walks K in 128-wide steps, so one
scale covers a whole ``[bn <= 128, 128]`` weight tile: the tile is converted to bf16 (exact; by Triton's
conversion or by the bit-placement PTX of :func:`decode_e4m3_asm`), multiplied against ``x`` with fp32
accumulation, and the partial product is scaled by ``2^(e - 127)`` (exact) before it joins the accumulator.

The XLA formulation (:func:`fp8_matmul_xla`) folds the power-of-two scales into the activations instead,
``x_b = x * 2^(e[b, kb])`` (exact in bf16 away from over/underflow), and runs one batched dot over the
128-row blocks of W with the fp8 -> bf16 convert fused into the operand; at large M it dequantises once and
calls cuBLAS.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from dsv4_jax import quant
from pallas_kernels import fp8_matmul_mgpu

BLOCK = quant.FP8_BLOCK


@dataclasses.dataclass(frozen=True)
class Fp8Config:
    """Tiles of one launch (``bn`` divides 128); ``method``: ``"pallas"``, ``"xla"``, ``"dequant_dot"`` or
    ``"mgpu"`` (the Mosaic GPU kernel of :mod:`pallas_kernels.fp8_matmul_mgpu`, Hopper only, split along K
    by ``split_k``); ``decode``: ``"convert"`` (Triton's e4m3 -> bf16 conversion) or ``"asm"``
    (:func:`decode_e4m3_asm`)."""

    bm: int = 16
    bn: int = 64
    split_k: int = 1
    swap_ab: bool = True
    num_warps: int = 4
    num_stages: int = 4
    method: str = "pallas"
    decode: str = "convert"


def mgpu_pays(m: int, n: int, k: int) -> bool:
    """Where the Mosaic GPU kernel measured faster than the Triton kernel and the XLA formulation (H200,
    BENCHMARKS.md): one row for weights of 2^25+ elements (8192x8192 20.7 against 30.3 us, wo_b 12.1 against
    17.3 us); rows padded to a multiple of 8 (one more launch) for 2^26+; 8-64 rows from 2^22 elements, except
    K < 4096 beyond 16 rows (wq_b 1024->32768 at M=64: 26.8 against 25.4 us)."""
    size = n * k
    if m == 1:
        return size >= 2**25
    if m % 8:
        return size >= 2**26
    return size >= 2**22 and (m <= 16 or k >= 4096)


def default_config(m: int, n: int, k: int, *, mgpu: bool = True) -> Fp8Config:
    """Per-shape configuration (H200 measurements, BENCHMARKS.md): the XLA formulation where it measured
    faster (M=2..4 with N >= 4096: 8192x8192 26.2 against 30.6 us; M=1 with N <= 1024: wq_a 4.2 against
    5.2 us), else the Pallas kernel split along K to about 256 programs (narrow N: bn 32 and the PTX decoder,
    wq_a 5.2 against 5.7 us); dequantise + cuBLAS from M=256. On Hopper the Mosaic GPU kernel where it
    measured faster (:func:`mgpu_pays`). ``mgpu=False``: never the Mosaic GPU kernel."""
    if mgpu and mgpu_pays(m, n, k) and fp8_matmul_mgpu.supported(m, n, k) and fp8_matmul_mgpu.available():
        return Fp8Config(method="mgpu", split_k=fp8_matmul_mgpu.default_split(n, k))
    if m >= 256:
        return Fp8Config(method="dequant_dot")
    if (1 < m <= 4 and n >= 4096) or (m == 1 and n <= 1024):
        return Fp8Config(method="xla")
    bm = 16 if m <= 16 else (32 if m <= 32 else 64)
    if m <= 64:
        bn, decode = (32, "asm") if n <= 1024 else (64, "convert")
        tiles = -(-n // bn)
        kb = -(-k // BLOCK)
        split = 1
        while tiles * split < 256 and split < 8 and kb % (split * 2) == 0 and kb // (split * 2) >= 4:
            split *= 2
        return Fp8Config(bm=bm, bn=bn, split_k=split, swap_ab=True, decode=decode)
    return Fp8Config(bm=64, bn=128, split_k=1, swap_ab=False, num_warps=4, num_stages=3)


def fp8_matmul_reference(x: jax.Array, w: quant.Fp8Block, out_dtype=jnp.bfloat16) -> jax.Array:
    """Reference: exact bf16 weights ``e4m3 x 2^e``, fp32 accumulation (``quant.linear`` in bf16)."""
    return quant.linear(x, w, jnp.bfloat16, out_dtype)


def _e8m0_to_f32(byte: jax.Array) -> jax.Array:
    """UE8M0 byte -> ``2^(byte - 127)`` by placing it in the fp32 exponent (byte 0, 2^-127, reads as 0)."""
    return jax.lax.bitcast_convert_type(byte.astype(jnp.int32) << 23, jnp.float32)


# e4m3 -> bf16 by bit placement (KERNELS.md §4.2): byte (s, e3..e0, m2..m0) -> bf16 sign at 15, e at
# exponent bits 10-7, m at mantissa bits 6-4 reads as exactly e4m3 x 2^-120 (bf16 subnormals for e = 0, as
# e4m3's), and one `fma.rn.bf16x2` by 2^120 (0x7B80) makes it exact e4m3. 4 bytes per instance ($2), two bf16x2
# results ($0: bytes 0-1, $1: bytes 2-3); each result depends on its own byte only. NaN codes decode as 480.
_E4M3_PTX = """
{
.reg .b32 a0, a1, t0, t1, zero, e120, negz;
mov.b32 zero, 0;
mov.b32 e120, 0x7B807B80;
mov.b32 negz, 0x80008000;
prmt.b32 a0, zero, $2, 0x5140;
prmt.b32 a1, zero, $2, 0x7362;
shr.b32 t0, a0, 4;
shr.b32 t1, a1, 4;
and.b32 t0, t0, 0x07F007F0;
and.b32 t1, t1, 0x07F007F0;
lop3.b32 t0, t0, a0, 0x80008000, 0xF8;
lop3.b32 t1, t1, a1, 0x80008000, 0xF8;
fma.rn.bf16x2 $0, t0, e120, negz;
fma.rn.bf16x2 $1, t1, e120, negz;
}
"""


def decode_e4m3_asm(w: jax.Array) -> jax.Array:
    """uint8 tile of e4m3 bytes -> exact bf16 values (inline PTX; GPU only)."""
    [v] = plt.elementwise_inline_asm(_E4M3_PTX, args=[w], constraints="=r,=r,r", pack=4,
                                     result_shape_dtypes=[jax.ShapeDtypeStruct(w.shape, jnp.bfloat16)])
    return v


def emulate_e4m3_ptx(word: int) -> list[int]:
    """Bit-level model of ``_E4M3_PTX`` before the ``fma`` (CPU tests): 4 little-endian bytes -> the bf16 bit
    patterns (``e4m3 x 2^-120``) of the 4 values."""
    from .nvfp4_layout import _prmt

    out = []
    for sel in (0x5140, 0x7362):
        a = _prmt(0, word, sel)
        t = ((a >> 4) & 0x07F007F0) | (a & 0x80008000)
        out += [t & 0xFFFF, t >> 16]
    return out


def _dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _fp8_kernel(x_ref, w_ref, s_ref, o_ref, *, cfg: Fp8Config, m: int, n: int, k: int, steps: int):
    bm, bn = cfg.bm, cfg.bn
    n_n = pl.cdiv(n, bn)
    pid, sk = pl.program_id(0), pl.program_id(1)
    pm, pn = pid // n_n, pid % n_n
    rows = pm * bm + jax.lax.broadcasted_iota(jnp.int32, (bm,), 0)
    wrows = pn * bn + jax.lax.broadcasted_iota(jnp.int32, (bn,), 0)
    row_ok, wrow_ok = rows < m, wrows < n
    sb = (pn * bn) // BLOCK

    def body(t, acc):
        kb = sk * steps + t
        k0 = pl.multiple_of(kb * BLOCK, BLOCK)
        cols = k0 + jax.lax.broadcasted_iota(jnp.int32, (BLOCK,), 0)
        col_ok = (cols < k)[None, :]
        w_ref_t = w_ref.at[pl.ds(pn * bn, bn), pl.ds(k0, BLOCK)]
        if n % bn or k % BLOCK:
            w = plt.load(w_ref_t, mask=wrow_ok[:, None] & col_ok, other=0 if cfg.decode == "asm" else 0.0)
        else:
            w = w_ref_t[...]
        x_ref_t = x_ref.at[pl.ds(pm * bm, bm), pl.ds(k0, BLOCK)]
        if m % bm or k % BLOCK:
            x = plt.load(x_ref_t, mask=row_ok[:, None] & col_ok, other=0.0)
        else:
            x = x_ref_t[...]
        w = decode_e4m3_asm(w) if cfg.decode == "asm" else w.astype(jnp.bfloat16)
        part = _dot_nt(w, x) if cfg.swap_ab else _dot_nt(x, w)
        return acc + part * _e8m0_to_f32(s_ref[sb, kb])

    shape = (bn, bm) if cfg.swap_ab else (bm, bn)
    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros(shape, jnp.float32))
    if cfg.swap_ab:
        acc = acc.T
    mask = row_ok[:, None] & wrow_ok[None, :]
    if cfg.split_k == 1:
        plt.store(o_ref.at[pl.ds(pm * bm, bm), pl.ds(pn * bn, bn)], acc.astype(o_ref.dtype), mask=mask)
    else:
        plt.store(o_ref.at[sk, pl.ds(pm * bm, bm), pl.ds(pn * bn, bn)], acc, mask=mask)


@functools.partial(jax.jit, static_argnames=("out_dtype", "cfg", "interpret"))
def _pallas(x, w: quant.Fp8Block, out_dtype, cfg: Fp8Config, interpret: bool):
    m, k = x.shape
    n = w.weight.shape[0]
    if BLOCK % cfg.bn:
        raise ValueError(f"bn={cfg.bn} must divide {BLOCK}")
    kb = pl.cdiv(k, BLOCK)
    if kb % cfg.split_k:
        raise ValueError(f"split_k={cfg.split_k} does not divide the {kb} K blocks")
    steps = kb // cfg.split_k
    grid = (pl.cdiv(m, cfg.bm) * pl.cdiv(n, cfg.bn), cfg.split_k)
    if cfg.split_k == 1:
        out_shape = jax.ShapeDtypeStruct((m, n), out_dtype)
    else:
        out_shape = jax.ShapeDtypeStruct((cfg.split_k, m, n), jnp.float32)
    if interpret:
        cfg = dataclasses.replace(cfg, decode="convert")
    kernel = functools.partial(_fp8_kernel, cfg=cfg, m=m, n=n, k=k, steps=steps)
    scale = jax.lax.bitcast_convert_type(w.scale, jnp.uint8)
    weight = jax.lax.bitcast_convert_type(w.weight, jnp.uint8) if cfg.decode == "asm" else w.weight
    y = pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, interpret=interpret, name="fp8_block_matmul",
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    )(x.astype(jnp.bfloat16), weight, scale)
    if cfg.split_k == 1:
        return y
    return y.sum(0).astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def fp8_matmul_xla(x: jax.Array, w: quant.Fp8Block, out_dtype=jnp.bfloat16) -> jax.Array:
    """XLA formulation for small M: scales folded into ``x`` per 128-row block of W, one batched dot
    ``[NB, M, K] x [NB, 128, K]`` with the fp8 convert fused. ``x [M, K]`` -> ``[M, N]``."""
    m, k = x.shape
    n = w.weight.shape[0]
    nb = w.scale.shape[0]
    s = jnp.repeat(quant.e8m0_to_f32(w.scale), BLOCK, axis=1)[:, :k]  # [NB, K]
    xs = (x.astype(jnp.float32)[None] * s[:, None, :]).astype(jnp.bfloat16)  # exact: powers of two
    wq = jnp.pad(w.weight, ((0, nb * BLOCK - n), (0, 0))).reshape(nb, BLOCK, k)
    y = jnp.einsum("bmk,bnk->mbn", xs, wq.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    return y.reshape(m, nb * BLOCK)[:, :n].astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def fp8_matmul_dequant_dot(x: jax.Array, w: quant.Fp8Block, out_dtype=jnp.bfloat16) -> jax.Array:
    """Large M: dequantise to bf16 once (exact), then cuBLAS."""
    wb = quant.dequantize(w, jnp.bfloat16)
    return jnp.dot(x.astype(jnp.bfloat16), wb.T, preferred_element_type=jnp.float32).astype(out_dtype)


def fp8_matmul(x: jax.Array, w: quant.Fp8Block, out_dtype=jnp.bfloat16, *, config: Fp8Config | None = None,
               interpret: bool = False) -> jax.Array:
    """``x [..., K] @ W[N, K]^T`` -> ``[..., N]`` in ``out_dtype`` (W FP8 with 128x128 block scales)."""
    if w.weight.ndim != 2:
        raise ValueError(f"fp8_matmul takes one [N, K] weight, got {w.shape}")
    n, k = w.weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} inputs, the weight {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m == 0:
        return jnp.zeros((*lead, n), out_dtype)
    cfg = config or default_config(m, n, k)
    od = jnp.dtype(out_dtype)
    if cfg.method == "xla":
        y = fp8_matmul_xla(x2, w, od)
    elif cfg.method == "dequant_dot":
        y = fp8_matmul_dequant_dot(x2, w, od)
    elif cfg.method == "mgpu":
        y = fp8_matmul_mgpu.fp8_matmul_mgpu(x2, w, od, split=cfg.split_k, interpret=interpret)
    else:
        y = _pallas(x2, w, od, cfg, interpret)
    return y.reshape(*lead, n)
