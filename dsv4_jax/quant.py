"""Number formats of the checkpoint, their exact dequantisation, the quantisers, and the activation
simulations of the reference model.

Weights stay in their stored formats in memory (CHECKPOINT.md §2-§5):

* ``Fp8Block``  e4m3 weight ``[..., out, in]`` with one UE8M0 (power-of-two) scale per 128x128 block;
* ``Nvfp4``     E2M1 codes packed two per byte ``[..., out, in/2]`` (low nibble = even column), one e4m3
  scale per 16 inputs and one fp32 global scale (``weight_scale_2``) per matrix;
* ``Mxfp4``     E2M1 codes packed the same way, one UE8M0 scale per 32 inputs;
* plain ``jax.Array`` for bf16 / fp32 tensors.

Every product E2M1 x e4m3 x 2^k is exact in bf16 (KERNELS.md §4.2), so ``dequantize(w, bfloat16)`` loses
nothing for FP8 / MXFP4 weights and for NVFP4 weights up to the fp32 global scale, which ``linear``
applies to the fp32 accumulator.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from .pytree import pytree_dataclass

FP8_BLOCK = 128
NVFP4_BLOCK = 16
MXFP4_BLOCK = 32
E4M3_MAX = 448.0
E2M1_MAX = 6.0

# CHECKPOINT.md §2.1: code c -> (-1)^(c >> 3) * magnitude[c & 7].
E2M1_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)




@pytree_dataclass
class Fp8Block:
    """FP8 e4m3 weight with 128x128 power-of-two block scales. ``weight [..., out, in]`` float8_e4m3fn,
    ``scale [..., ceil(out/128), ceil(in/128)]`` float8_e8m0fnu."""

    weight: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)


@pytree_dataclass
class Nvfp4:
    """ModelOpt NVFP4. ``weight [..., out, in/2]`` uint8 (two E2M1 codes, low nibble = even input),
    ``weight_scale [..., out, in/16]`` float8_e4m3fn, ``weight_scale_2 [...]`` and ``input_scale [...]`` fp32."""

    weight: jax.Array
    weight_scale: jax.Array
    weight_scale_2: jax.Array
    input_scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.weight.shape[:-1], 2 * self.weight.shape[-1])


@pytree_dataclass
class Mxfp4:
    """MXFP4 (DeepSeek's native routed experts). ``weight [..., out, in/2]`` uint8, ``scale [..., out, in/32]``
    float8_e8m0fnu."""

    weight: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.weight.shape[:-1], 2 * self.weight.shape[-1])


Weight = jax.Array | Fp8Block | Nvfp4 | Mxfp4
QUANTIZED = (Fp8Block, Nvfp4, Mxfp4)


def logical_shape(w: Weight) -> tuple[int, ...]:
    """The shape of the dequantised matrix."""
    return tuple(w.shape)


# ---------------------------------------------------------------------------------------------------------
# Element decoding


def e2m1_decode(codes: jax.Array, dtype=jnp.float32) -> jax.Array:
    """4-bit codes (any integer dtype, values 0..15) -> values, by table (CHECKPOINT.md §2.1)."""
    return jnp.asarray(E2M1_VALUES, dtype)[codes.astype(jnp.int32)]


def unpack_nibbles(packed: jax.Array) -> jax.Array:
    """uint8 ``[..., n]`` -> codes uint8 ``[..., 2n]``: element 2k is the low nibble, 2k+1 the high one."""
    lo = packed & 0x0F
    hi = packed >> 4
    return jnp.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def pack_nibbles(codes: jax.Array) -> jax.Array:
    """codes ``[..., 2n]`` (0..15) -> uint8 ``[..., n]``; inverse of :func:`unpack_nibbles`."""
    c = codes.astype(jnp.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return c[..., 0] | (c[..., 1] << 4)


def e8m0_to_f32(scale: jax.Array) -> jax.Array:
    """UE8M0 scales -> fp32 powers of two (byte 255 -> NaN, byte 0 -> 2^-127)."""
    if scale.dtype != jnp.uint8:
        scale = jax.lax.bitcast_convert_type(scale, jnp.uint8)
    e = scale.astype(jnp.int32)
    # 2^(e-127) built from the bit pattern: exact, including the subnormal 2^-127.
    normal = jax.lax.bitcast_convert_type(jnp.clip(e, 1, 254) << 23, jnp.float32)
    out = jnp.where(e == 0, jnp.float32(2.0**-127), normal)
    return jnp.where(e == 255, jnp.float32(jnp.nan), out)


def _expand_blocks(s: jax.Array, axis: int, block: int, size: int) -> jax.Array:
    return jnp.repeat(s, block, axis=axis, total_repeat_length=None).take(jnp.arange(size), axis=axis)


def dequantize(w: Weight, dtype=jnp.float32) -> jax.Array:
    """The logical matrix ``[..., out, in]`` in ``dtype``.

    For ``Nvfp4`` the fp32 global scale ``weight_scale_2`` is included only when ``dtype`` is float32; in
    bf16 the product E2M1 x e4m3 is exact but its product with an arbitrary fp32 global scale is not, so
    :func:`linear` applies the global scale to the fp32 accumulator instead. Use :func:`dequantize_full` for
    the complete value in any dtype.
    """
    if isinstance(w, Fp8Block):
        out, inn = w.weight.shape[-2:]
        s = e8m0_to_f32(w.scale)
        s = _expand_blocks(s, -2, FP8_BLOCK, out)
        s = _expand_blocks(s, -1, FP8_BLOCK, inn)
        return (w.weight.astype(jnp.float32) * s).astype(dtype)
    if isinstance(w, Nvfp4):
        v = e2m1_decode(unpack_nibbles(w.weight))
        s = jnp.repeat(w.weight_scale.astype(jnp.float32), NVFP4_BLOCK, axis=-1)
        v = v * s
        if jnp.dtype(dtype) == jnp.float32:
            v = v * w.weight_scale_2[..., None, None]
        return v.astype(dtype)
    if isinstance(w, Mxfp4):
        v = e2m1_decode(unpack_nibbles(w.weight))
        s = jnp.repeat(e8m0_to_f32(w.scale), MXFP4_BLOCK, axis=-1)
        return (v * s).astype(dtype)
    return w.astype(dtype)


def dequantize_full(w: Weight) -> jax.Array:
    """The complete logical matrix in float32 (global NVFP4 scale included)."""
    return dequantize(w, jnp.float32)


def global_scale(w: Weight) -> jax.Array | None:
    """The fp32 factor :func:`dequantize` leaves out in low precision (NVFP4's ``weight_scale_2``)."""
    return w.weight_scale_2 if isinstance(w, Nvfp4) else None


REDUCE_MATMUL_LIMIT = 1 << 26
"""Largest fp32 product (multiplications) that ``matmul`` evaluates as a reduction on the CPU."""


def matmul(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """Two-operand ``einsum`` with fp32 accumulation and an fp32 result; fp32 operands at full precision.

    On the CPU, moderate fp32 products are multiplied elementwise and summed by a reduction instead of a dot:
    each output element is then reduced in an order that does not depend on the other rows of the batch.
    XLA:CPU's dot kernels change with the operand shapes (a single row takes another kernel than a batch), which
    would make a decode step round differently from the same token inside a prompt, and the model's FP8/FP4
    simulations turn such last-bit differences into visible ones. Large products (e.g. a big LM head) and all
    GPU products use dots (``Precision.HIGHEST``: no TF32)."""
    if a.dtype == jnp.float32 and b.dtype == jnp.float32:
        if jax.default_backend() == "cpu" and _product_size(spec, a, b) <= REDUCE_MATMUL_LIMIT:
            return _reduce_einsum(spec, a, b)
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def stable_sum(x: jax.Array, axis: int = -1, keepdims: bool = False) -> jax.Array:
    """``jnp.sum`` over one axis, on the CPU in an order fixed by that axis' length alone: a pairwise tree of
    elementwise adds (the axis zero-padded to a power of two). XLA:CPU's reductions sum a row in an order that
    depends on how many rows share the call (vectorised blocks of rows vs a remainder), so without this a decode
    step and the same token inside a prompt can differ in the last bit (see :func:`matmul`). Elsewhere a plain
    reduction."""
    if jax.default_backend() != "cpu":
        return jnp.sum(x, axis=axis, keepdims=keepdims)
    y = jnp.moveaxis(x, axis, -1)
    n = y.shape[-1]
    width = 1 << max(0, (n - 1).bit_length())
    if width != n:
        y = jnp.pad(y, [(0, 0)] * (y.ndim - 1) + [(0, width - n)])
    while y.shape[-1] > 1:
        h = y.shape[-1] // 2
        y = y[..., :h] + y[..., h:]
    y = y[..., 0]
    return jnp.expand_dims(y, axis) if keepdims else y


def softmax(x: jax.Array, axis: int = -1) -> jax.Array:
    """``jax.nn.softmax`` with its normaliser summed by :func:`stable_sum`."""
    e = jnp.exp(x - jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True)))
    return e / stable_sum(e, axis=axis, keepdims=True)


def _product_size(spec: str, a: jax.Array, b: jax.Array) -> int:
    la, lb = spec.replace(" ", "").split("->")[0].split(",")
    sizes = dict(zip(la, a.shape)) | dict(zip(lb, b.shape))
    return int(np.prod([sizes[c] for c in sizes]))


def _reduce_einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    ins, out = spec.replace(" ", "").split("->")
    la, lb = ins.split(",")
    if "..." in la or "..." in lb:
        raise ValueError(f"matmul: use explicit axis labels, got {spec!r}")
    labels = list(dict.fromkeys(out + la + lb))  # output axes first, then contracted ones

    def expand(x, lx):
        x = jnp.transpose(x, [lx.index(c) for c in labels if c in lx])
        return x.reshape([x.shape[[c for c in labels if c in lx].index(c)] if c in lx else 1 for c in labels])

    prod = expand(a, la) * expand(b, lb)
    return jnp.sum(prod, axis=tuple(range(len(out), len(labels))))


def dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x [..., K] @ w[N, K]^T`` -> fp32 ``[..., N]`` (see ``matmul``)."""
    lead = x.shape[:-1]
    return matmul("mk,nk->mn", x.reshape(-1, x.shape[-1]), w).reshape(*lead, w.shape[0])


def linear(x: jax.Array, w: Weight, dtype, out_dtype=None) -> jax.Array:
    """``x @ W^T`` with ``W [out, in]`` dequantised on the fly to the compute ``dtype``; fp32 accumulation.

    The result is cast to ``out_dtype`` (default: ``dtype``)."""
    out_dtype = dtype if out_dtype is None else out_dtype
    y = dense(x.astype(dtype), dequantize(w, dtype))
    g = global_scale(w)
    if g is not None and jnp.dtype(dtype) != jnp.float32:
        y = y * g
    return y.astype(out_dtype)


# ---------------------------------------------------------------------------------------------------------
# Rounding primitives shared by the quantisers and the activation simulations


def pow2ceil(x: jax.Array) -> jax.Array:
    """``2^ceil(log2 x)`` for x > 0, exactly (no log2 rounding): from the fp32 exponent."""
    m, e = jnp.frexp(x.astype(jnp.float32))  # x = m * 2^e, m in [0.5, 1)
    return jnp.ldexp(jnp.float32(1.0), jnp.where(m == 0.5, e - 1, e))


def e2m1_codes(x: jax.Array) -> jax.Array:
    """Round to the nearest E2M1 value, ties to even (CHECKPOINT.md §2.1); |x| > 6 saturates.

    Returns codes (uint8, 0..15); the sign bit is ``x < 0`` so -0.0 encodes as +0 (as ModelOpt does)."""
    a = jnp.abs(x.astype(jnp.float32))
    mag = jnp.select(
        [a <= 0.25, a < 0.75, a <= 1.25, a < 1.75, a <= 2.5, a < 3.5, a <= 5.0],
        [0, 1, 2, 3, 4, 5, 6],
        7,
    ).astype(jnp.uint8)
    return jnp.where(x < 0, mag | 8, mag).astype(jnp.uint8)


def e2m1_round(x: jax.Array) -> jax.Array:
    """x rounded to E2M1 (values), fp32."""
    return e2m1_decode(e2m1_codes(x))


def e4m3_round(x: jax.Array) -> jax.Array:
    """x (|x| <= 448) rounded to e4m3 with round-to-nearest-even, as fp32."""
    return x.astype(jnp.float32).astype(jnp.float8_e4m3fn).astype(jnp.float32)


def _blocks(x: jax.Array, block: int) -> jax.Array:
    if x.shape[-1] % block:
        raise ValueError(f"last dimension {x.shape[-1]} is not a multiple of the block size {block}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


def fp8_sim(x: jax.Array, block: int = 64) -> jax.Array:
    """ARCHITECTURE.md §2.3 FP8_SIM: per block of ``block`` values along the last axis, UE8M0 scale
    ``s = pow2ceil(max(amax, 1e-4) / 448)``, e4m3 round-to-nearest-even of ``x / s``; returns x's dtype."""
    xb = _blocks(x.astype(jnp.float32), block)
    s = pow2ceil(jnp.maximum(jnp.max(jnp.abs(xb), axis=-1, keepdims=True), 1e-4) / E4M3_MAX)
    q = e4m3_round(jnp.clip(xb / s, -E4M3_MAX, E4M3_MAX)) * s
    return q.reshape(x.shape).astype(x.dtype)


def fp4_sim(x: jax.Array, block: int = 32) -> jax.Array:
    """ARCHITECTURE.md §2.3 FP4_SIM: per block, ``s = pow2ceil(max(amax, 6*2^-126) / 6)``, E2M1 round-to-
    nearest-even of ``x / s``; returns x's dtype."""
    xb = _blocks(x.astype(jnp.float32), block)
    s = pow2ceil(jnp.maximum(jnp.max(jnp.abs(xb), axis=-1, keepdims=True), 6 * 2.0**-126) / E2M1_MAX)
    q = e2m1_round(jnp.clip(xb / s, -E2M1_MAX, E2M1_MAX)) * s
    return q.reshape(x.shape).astype(x.dtype)


def hadamard_matrix(n: int) -> np.ndarray:
    """Sylvester ("natural order") Hadamard matrix ``H[i, j] = (-1)^popcount(i & j)``, unnormalised."""
    if n <= 0 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    i = np.arange(n)
    bits = np.bitwise_and(i[:, None], i[None, :])
    parity = np.zeros_like(bits)
    while bits.any():
        parity ^= bits & 1
        bits >>= 1
    return (1 - 2 * parity).astype(np.float32)


def hadamard(x: jax.Array) -> jax.Array:
    """ARCHITECTURE.md §2.3 HADAMARD: ``x @ H / sqrt(n)`` over the last axis (H is symmetric), fp32 math,
    returns x's dtype."""
    n = x.shape[-1]
    h = jnp.asarray(hadamard_matrix(n) / np.sqrt(n))
    y = jnp.einsum("...i,ij->...j", x.astype(jnp.float32), h, precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)


# ---------------------------------------------------------------------------------------------------------
# Weight quantisers


def _e8m0_from_pow2(s: jax.Array) -> jax.Array:
    """fp32 powers of two (normal, or 0 for "2^-127") -> float8_e8m0fnu bytes."""
    _, e = jnp.frexp(s)
    byte = jnp.where(s > 0, e - 1 + 127, 0).astype(jnp.uint8)
    return jax.lax.bitcast_convert_type(byte, jnp.float8_e8m0fnu)


def quantize_fp8_block(w: jax.Array) -> Fp8Block:
    """FP8 block quantiser of the native checkpoint: per 128x128 block a power-of-two scale
    ``s = pow2ceil(amax / 448)`` (1 for an all-zero block), e4m3 round-to-nearest-even of ``w / s``."""
    *lead, out, inn = w.shape
    po, pi = -out % FP8_BLOCK, -inn % FP8_BLOCK
    wp = jnp.pad(w.astype(jnp.float32), [(0, 0)] * len(lead) + [(0, po), (0, pi)])
    blocks = wp.reshape(*lead, (out + po) // FP8_BLOCK, FP8_BLOCK, (inn + pi) // FP8_BLOCK, FP8_BLOCK)
    amax = jnp.max(jnp.abs(blocks), axis=(-3, -1))
    s = jnp.where(amax > 0, pow2ceil(amax / E4M3_MAX), 1.0)
    s_full = _expand_blocks(_expand_blocks(s, -2, FP8_BLOCK, out), -1, FP8_BLOCK, inn)
    q = jnp.clip(w.astype(jnp.float32) / s_full, -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)
    return Fp8Block(weight=q, scale=_e8m0_from_pow2(s))


def quantize_nvfp4(w, weight_scale_2=None, input_scale=None) -> Nvfp4:
    """ModelOpt's NVFP4 weight quantiser (``NVFP4QTensor.quantize``, CHECKPOINT.md §4.2), bit for bit, on
    ``w [..., out, in]`` with one global scale per ``[out, in]`` matrix:

    * ``weight_scale_2 = amax(w) / (6 * 448)`` -> ``[...]``; pass it to share one between w1 and w3 (from
      their joint amax, as ModelOpt's fused calibration does, see :func:`nvfp4_global_scale`);
    * per block of 16 inputs ``s = amax_block / (6 * weight_scale_2)``; ``s = 1`` where it is 0; clamped to
      ``[2^-9, 448]`` and rounded to e4m3 -> ``weight_scale [..., out, in/16]``;
    * codes: E2M1 round-to-nearest-even of ``w / (weight_scale * weight_scale_2)``, saturating at 6, sign bit
      ``w < 0``, packed low nibble first -> ``weight [..., out, in/2]``.

    The arithmetic runs on the host in numpy fp32: XLA's CPU backend flushes fp32 subnormals to zero while
    ModelOpt's torch arithmetic keeps them, which changes the block scale of blocks far below the matrix
    maximum. Not traceable under ``jit``. One deliberate departure: an all-zero matrix gets
    ``weight_scale_2 = 1`` instead of ModelOpt's 0 (whose NaN block scales and code 7 everywhere no loader
    accepts), so it encodes as exact zeros. ``input_scale`` (activation amax / 2688, from calibration)
    defaults to 1."""
    w = np.asarray(w, np.float32)
    g = nvfp4_global_scale(w) if weight_scale_2 is None else np.asarray(weight_scale_2, np.float32)
    g = np.broadcast_to(g, w.shape[:-2]).astype(np.float32)
    gb = g[..., None, None]
    wb = np.asarray(_blocks(w, NVFP4_BLOCK))  # [..., out, in/16, 16]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        s = np.max(np.abs(wb), axis=-1) / (np.float32(E2M1_MAX) * gb)
        s[s == 0] = 1.0
        bs = np.clip(s, np.float32(2.0**-9), np.float32(E4M3_MAX)).astype(ml_dtypes.float8_e4m3fn)
        q = wb / (bs.astype(np.float32) * gb)[..., None]
    codes = _e2m1_codes_np(q.reshape(w.shape))
    packed = (codes[..., 1::2] << 4) | codes[..., 0::2]
    if input_scale is None:
        input_scale = np.ones(g.shape, np.float32)
    input_scale = np.broadcast_to(np.asarray(input_scale, np.float32), g.shape)
    return Nvfp4(jnp.asarray(packed), jnp.asarray(bs), jnp.asarray(g), jnp.asarray(input_scale))


def nvfp4_global_scale(*ws) -> np.ndarray:
    """``weight_scale_2 = amax / (6 * 448)`` per ``[out, in]`` matrix, the amax taken jointly over all ``ws``
    (``[..., out, in]`` each; w1 and w3 of an expert share it, CHECKPOINT.md §5.2); 1 for all-zero
    matrices."""
    amax = np.max([np.max(np.abs(np.asarray(w, np.float32)), axis=(-2, -1)) for w in ws], axis=0)
    with np.errstate(divide="ignore"):
        return np.where(amax > 0, amax / np.float32(E2M1_MAX * E4M3_MAX), 1.0).astype(np.float32)


# ModelOpt's E2M1 rounding (``NVFP4QTensor._cast_fp4``): bucket |x| by these bounds (left-closed search), then
# step up at the odd bounds 0.75, 1.75, 3.5 so that exact ties go to the even code; NaN lands on 6.
_E2M1_BOUNDS = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)


def _e2m1_codes_np(x: np.ndarray) -> np.ndarray:
    a = np.abs(x)
    code = np.searchsorted(_E2M1_BOUNDS, a, side="left").astype(np.uint8)
    code += ((a == 0.75) | (a == 1.75) | (a == 3.5)).astype(np.uint8)
    return code | ((x < 0).astype(np.uint8) << 3)


def quantize_mxfp4(w: jax.Array) -> Mxfp4:
    """MXFP4 quantiser: per block of 32 a power-of-two scale ``pow2ceil(amax / 6)`` (byte 0, i.e. 2^-127,
    for an all-zero block), E2M1 round-to-nearest-even codes."""
    wb = _blocks(w.astype(jnp.float32), MXFP4_BLOCK)
    amax = jnp.max(jnp.abs(wb), axis=-1)
    s = jnp.where(amax > 0, pow2ceil(amax / E2M1_MAX), 0.0)
    q = jnp.where(s[..., None] > 0, wb / jnp.where(s > 0, s, 1.0)[..., None], 0.0)
    codes = e2m1_codes(jnp.clip(q, -E2M1_MAX, E2M1_MAX)).reshape(w.shape)
    return Mxfp4(pack_nibbles(codes), _e8m0_from_pow2(s))
