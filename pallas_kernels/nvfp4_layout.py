"""NVFP4 weights in the layout the Pallas-Triton kernels read, and the exact in-kernel E2M1 decoders.

Checkpoint layout (CHECKPOINT.md §2.1, §4.1): ``weight [N, K/2]`` uint8 with code ``2j`` in the low nibble
and ``2j+1`` in the high nibble, ``weight_scale [N, K/16]`` e4m3, fp32 ``weight_scale_2``.

Kernel layout (:class:`Nvfp4Packed`), made once at load time and exactly reversible (:func:`unpack_nvfp4`):

* N is padded to a multiple of ``pad_n`` and K to a multiple of ``pad_k`` with zero codes and zero scales;
* the nibbles are re-paired by a *half split*: with ``H = Kp/2``, byte ``[n, j]`` holds code ``[n, j]`` in its
  low nibble and code ``[n, H + j]`` in its high nibble. A kernel step that reads packed columns
  ``[j0, j0 + b)`` therefore decodes two contiguous K ranges, ``[j0, j0 + b)`` from the low nibbles and
  ``[H + j0, H + j0 + b)`` from the high ones, each multiplied against one contiguous slice of ``x``: no
  interleave, no shuffle of activations, and any K tile size works with the same bytes;
* scales stay row-major ``[Np, Kp/16]`` e4m3 (a 16-block never straddles the halves since ``H % 16 == 0``).

Decoding (KERNELS.md §4.2): every E2M1 x e4m3 product is exact in bf16, so a weight tile is decoded to
``E2M1(code) * weight_scale`` in bf16 without rounding, fed to the bf16 tensor cores with fp32 accumulation,
and the fp32 ``weight_scale_2`` multiplies the accumulator in the epilogue.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax import quant

PAD_N = 128
PAD_K = 256


@dataclasses.dataclass(frozen=True)
class Nvfp4Packed:
    """NVFP4 weight ``[..., n, k]`` in kernel layout. ``qweight [..., Np, Kp/2]`` uint8 (half-split nibbles),
    ``scale [..., Np, Kp/16]`` float8_e4m3fn, ``weight_scale_2 [...]`` and ``input_scale [...]`` fp32;
    ``n`` and ``k`` (static) are the logical sizes."""

    qweight: jax.Array
    scale: jax.Array
    weight_scale_2: jax.Array
    input_scale: jax.Array
    n: int
    k: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.qweight.shape[:-2], self.n, self.k)

    @property
    def kp(self) -> int:
        return 2 * self.qweight.shape[-1]

    @property
    def np_(self) -> int:
        return self.qweight.shape[-2]


jax.tree_util.register_dataclass(
    Nvfp4Packed, data_fields=["qweight", "scale", "weight_scale_2", "input_scale"], meta_fields=["n", "k"])


def _round_up(a: int, b: int) -> int:
    return -(-a // b) * b


def pack_nvfp4(w: quant.Nvfp4, pad_n: int = PAD_N, pad_k: int = PAD_K) -> Nvfp4Packed:
    """Checkpoint NVFP4 ``[..., N, K/2]`` -> kernel layout (exact; see the module docstring)."""
    if pad_k % 32:
        raise ValueError(f"pad_k must be a multiple of 32 (a scale block per half), got {pad_k}")
    n, k = w.shape[-2:]
    if k % quant.NVFP4_BLOCK:
        raise ValueError(f"NVFP4 input dimension {k} is not a multiple of 16")
    npad, kpad = _round_up(n, pad_n), _round_up(k, pad_k)
    lead = [(0, 0)] * (w.weight.ndim - 2)
    codes = jnp.pad(quant.unpack_nibbles(w.weight), lead + [(0, npad - n), (0, kpad - k)])
    half = kpad // 2
    q = codes[..., :half] | (codes[..., half:] << 4)
    s = jnp.pad(w.weight_scale, lead + [(0, npad - n), (0, (kpad - k) // quant.NVFP4_BLOCK)])
    return Nvfp4Packed(q.astype(jnp.uint8), s, jnp.asarray(w.weight_scale_2, jnp.float32),
                       jnp.asarray(w.input_scale, jnp.float32), int(n), int(k))


def unpack_nvfp4(p: Nvfp4Packed) -> quant.Nvfp4:
    """Inverse of :func:`pack_nvfp4`: the checkpoint bytes, bit for bit."""
    codes = jnp.concatenate([p.qweight & 0x0F, p.qweight >> 4], axis=-1)[..., :p.n, :p.k]
    s = p.scale[..., :p.n, :p.k // quant.NVFP4_BLOCK]
    return quant.Nvfp4(quant.pack_nibbles(codes), s, p.weight_scale_2, p.input_scale)


def dequantize_packed(p: Nvfp4Packed, dtype=jnp.bfloat16) -> jax.Array:
    """Reference: ``E2M1 x weight_scale`` as ``[..., n, k]`` in ``dtype`` (global scale excluded, as in
    ``quant.dequantize`` for low precision)."""
    w = unpack_nvfp4(p)
    v = quant.e2m1_decode(quant.unpack_nibbles(w.weight))
    s = jnp.repeat(w.weight_scale.astype(jnp.float32), quant.NVFP4_BLOCK, axis=-1)
    return (v * s).astype(dtype)


# ---------------------------------------------------------------------------------------------------------
# In-kernel decoders: uint8 tile of half-split bytes + bf16 scales -> two exact bf16 tiles.

# bf16 bit patterns of the E2M1 magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 (CHECKPOINT.md §2.1).
E2M1_BF16_BITS = np.array([0x0000, 0x3F00, 0x3F80, 0x3FC0, 0x4000, 0x4040, 0x4080, 0x40C0], np.uint16)


def e2m1_to_bf16(codes: jax.Array) -> jax.Array:
    """Codes (uint8, 0..15) -> exact bf16 values with integer operations only (no table, no float convert).

    Magnitudes 2..7 are ``(i << 6) + 0x3F00`` (exponent and top mantissa bit in place); 1 is 0.5 and 0 is 0;
    the sign bit moves from bit 3 to bit 15."""
    n = codes.astype(jnp.uint16)
    i = n & 7
    mag = jnp.where(i >= 2, (i << 6) + 0x3F00, jnp.where(i == 1, 0x3F00, 0)).astype(jnp.uint16)
    return jax.lax.bitcast_convert_type(mag | ((n & 8) << 12), jnp.bfloat16)


def decode_int(q: jax.Array, s_lo: jax.Array, s_hi: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Portable decoder (Triton and interpret mode). ``q [R, C]`` uint8, ``s_lo, s_hi [R, C/16]`` bf16 ->
    ``(lo, hi)`` bf16 ``[R, C]``: low nibbles times ``s_lo``, high nibbles times ``s_hi`` (exact products)."""
    r, c = q.shape
    q3 = q.reshape(r, c // 16, 16)
    lo = e2m1_to_bf16(q3 & 0x0F) * s_lo[:, :, None]
    hi = e2m1_to_bf16(q3 >> 4) * s_hi[:, :, None]
    return lo.reshape(r, c), hi.reshape(r, c)


# PTX for 4 bytes (8 codes) per instance: `prmt` looks the high and low bytes of the bf16 magnitude up in two
# 8-entry byte tables (selector = the 3 magnitude bits of each nibble), a second `prmt` interleaves them into
# bf16x2 pairs, a sign-replicating `prmt` + and/or moves each nibble's sign to bit 15/31, and one
# `fma.rn.bf16x2` applies the block scales (exact: the product is representable). One instance returns the
# low nibbles ($0: bytes 0-1, $1: bytes 2-3), the other the high ones; $2: the 4 bytes; $3, $4: the scales.
# (Two single-result instances: jax 0.11.2's Triton lowering mishandles multi-result inline asm.)
_PTX_TEMPLATE = """
{
.reg .b32 lh0, lh1, ll0, ll1, zero, negz, m, m2, w, hb, lb, hb2, lb2, v, sg;
mov.b32 lh0, 0x3F3F3F00;
mov.b32 lh1, 0x40404040;
mov.b32 ll0, 0xC0800000;
mov.b32 ll1, 0xC0804000;
mov.b32 zero, 0;
mov.b32 negz, 0x80008000;
and.b32 m, $2, 0x77777777;
shr.u32 m2, m, 16;
SIGN_SOURCE
prmt.b32 hb, lh0, lh1, m;
prmt.b32 lb, ll0, ll1, m;
prmt.b32 hb2, lh0, lh1, m2;
prmt.b32 lb2, ll0, ll1, m2;
prmt.b32 v, lb, hb, SELECT;
prmt.b32 sg, w, zero, 0x9484;
and.b32 sg, sg, 0x80008000;
or.b32 v, v, sg;
fma.rn.bf16x2 $0, v, $3, negz;
prmt.b32 v, lb2, hb2, SELECT;
prmt.b32 sg, w, zero, 0xB4A4;
and.b32 sg, sg, 0x80008000;
or.b32 v, v, sg;
fma.rn.bf16x2 $1, v, $4, negz;
}
"""
_PTX_LO = _PTX_TEMPLATE.replace("SIGN_SOURCE", "shl.b32 w, $2, 4;").replace("SELECT", "0x6240")
_PTX_HI = _PTX_TEMPLATE.replace("SIGN_SOURCE", "mov.b32 w, $2;").replace("SELECT", "0x7351")


def decode_asm(q: jax.Array, s_lo: jax.Array, s_hi: jax.Array) -> tuple[jax.Array, jax.Array]:
    """:func:`decode_int` in inline PTX, about 4 instructions per weight (GPU only; not interpretable)."""
    from jax.experimental.pallas import triton as plt

    r, c = q.shape
    q3 = q.reshape(r, c // 16, 16)
    shape = (r, c // 16, 16)
    out = [jax.ShapeDtypeStruct(shape, jnp.bfloat16)]
    res = []
    for ptx, s in ((_PTX_LO, s_lo), (_PTX_HI, s_hi)):
        scale = jnp.broadcast_to(s[:, :, None], shape)
        [v] = plt.elementwise_inline_asm(ptx, args=[q3, scale], constraints="=r,=r,r,r,r", pack=4,
                                         result_shape_dtypes=out)
        res.append(v.reshape(r, c))
    return res[0], res[1]


def emulate_decode_ptx(word: int) -> tuple[list[int], list[int]]:
    """Bit-level model of ``_PTX_LO`` / ``_PTX_HI`` without the scale multiply (for CPU tests): one little-endian
    32-bit word of 4 bytes -> bf16 bit patterns of the 4 low-nibble and 4 high-nibble codes."""

    def prmt(a: int, b: int, c: int) -> int:
        src = (b << 32) | a
        out = 0
        for i in range(4):
            sel = (c >> (4 * i)) & 0xF
            byte = (src >> (8 * (sel & 7))) & 0xFF
            if sel & 8:
                byte = 0xFF if byte & 0x80 else 0
            out |= byte << (8 * i)
        return out

    m = word & 0x77777777
    m2 = m >> 16
    w4 = (word << 4) & 0xFFFFFFFF
    hb, lb = prmt(0x3F3F3F00, 0x40404040, m), prmt(0xC0800000, 0xC0804000, m)
    hb2, lb2 = prmt(0x3F3F3F00, 0x40404040, m2), prmt(0xC0800000, 0xC0804000, m2)
    regs = []
    for base, sgn_src, sel in ((prmt(lb, hb, 0x6240), w4, 0x9484), (prmt(lb2, hb2, 0x6240), w4, 0xB4A4),
                               (prmt(lb, hb, 0x7351), word, 0x9484), (prmt(lb2, hb2, 0x7351), word, 0xB4A4)):
        regs.append(base | (prmt(sgn_src, 0, sel) & 0x80008000))
    halves = [[r & 0xFFFF, r >> 16] for r in regs]
    return halves[0] + halves[1], halves[2] + halves[3]
