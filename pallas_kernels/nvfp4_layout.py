"""NVFP4 weights in the layout the Pallas-Triton kernels read, and the exact in-kernel E2M1 decoders.

Checkpoint layout (CHECKPOINT.md §2.1, §4.1): ``weight [N, K/2]`` uint8 with code ``2j`` in the low nibble
and ``2j+1`` in the high nibble, ``weight_scale [N, K/16]`` e4m3, fp32 ``weight_scale_2``.

Kernel layout (:class:`Nvfp4Packed`), made once at load time and exactly reversible (:func:`unpack_nvfp4`):

* N is padded to a multiple of ``pad_n`` and K to a multiple of ``pad_k`` with zero codes and zero scales;
* the codes are re-paired by a *half split*: with ``H = Kp/2``, byte ``[n, j]`` holds code ``[n, j]`` (the
  "lo" code) and code ``[n, H + j]`` (the "hi" code). A kernel step that reads packed columns ``[j0, j0 + b)``
  therefore decodes two contiguous K ranges, ``[j0, j0 + b)`` and ``[H + j0, H + j0 + b)``, each multiplied
  against one contiguous slice of ``x``: no interleave, no shuffle of activations, and any K tile size works
  with the same bytes;
* inside each byte the 8 code bits are permuted (:data:`LO_BITS`, :data:`HI_BITS`) so that the decoder can
  move them into bf16 positions with byte permutes and one mask (see :func:`decode_asm`): the lo code's sign,
  E1, E0, M bits sit at byte bits 7, 0, 6, 5 and the hi code's at 4, 3, 2, 1;
* scales stay row-major ``[Np, Kp/16]`` e4m3 (a 16-block never straddles the halves since ``H % 16 == 0``).

Decoding (KERNELS.md §4.2): every E2M1 x e4m3 product is exact in bf16. The decoders return the exact bf16
tile ``E2M1(code) * weight_scale * 2^-7`` (:data:`DECODE_LOG2`; why the power of two, see
:func:`decode_asm`), the kernels feed it to the bf16 tensor cores with fp32 accumulation, and multiply the
accumulator by ``2^7 * weight_scale_2`` in the epilogue: a power-of-two rescaling of every product and partial
sum, so the result is the one of the unscaled weights (barring fp32 underflow below ``2^-119``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax import quant

PAD_N = 128
PAD_K = 256

# Byte bit of each code bit (sign, E1, E0, M = code bits 3, 2, 1, 0) for the lo and the hi code of a byte.
LO_BITS = (7, 0, 6, 5)
HI_BITS = (4, 3, 2, 1)
DECODE_LOG2 = -7
"""Decoded tiles are ``W * 2^DECODE_LOG2``; kernels multiply ``2^-DECODE_LOG2`` into their epilogue scale."""
UNDO_DECODE_SCALE = 2.0 ** -DECODE_LOG2


@dataclasses.dataclass(frozen=True)
class Nvfp4Packed:
    """NVFP4 weight ``[..., n, k]`` in kernel layout. ``qweight [..., Np, Kp/2]`` uint8 (half-split, bit-permuted
    codes), ``scale [..., Np, Kp/16]`` float8_e4m3fn, ``weight_scale_2 [...]`` and ``input_scale [...]`` fp32;
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


def _place(code: jax.Array, bits: tuple[int, ...]) -> jax.Array:
    """Code bits 3, 2, 1, 0 -> byte bits ``bits``."""
    return sum(((code >> (3 - i)) & 1) << b for i, b in enumerate(bits))


def _take(byte: jax.Array, bits: tuple[int, ...]) -> jax.Array:
    """Inverse of :func:`_place`: the code whose bits 3, 2, 1, 0 sit at byte bits ``bits``."""
    return sum(((byte >> b) & 1) << (3 - i) for i, b in enumerate(bits))


def split_codes(q: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Kernel-layout bytes -> (lo codes, hi codes), uint8 values 0..15."""
    q = q.astype(jnp.uint8)
    return _take(q, LO_BITS).astype(jnp.uint8), _take(q, HI_BITS).astype(jnp.uint8)


def pack_nvfp4(w: quant.Nvfp4, pad_n: int = PAD_N, pad_k: int = PAD_K) -> Nvfp4Packed:
    """Checkpoint NVFP4 ``[..., N, K/2]`` -> kernel layout (exact; see the module docstring)."""
    if pad_k % 32:
        raise ValueError(f"pad_k must be a multiple of 32 (a scale block per half), got {pad_k}")
    n, k = w.shape[-2:]
    if k % quant.NVFP4_BLOCK:
        raise ValueError(f"NVFP4 input dimension {k} is not a multiple of 16")
    npad, kpad = _round_up(n, pad_n), _round_up(k, pad_k)
    lead = [(0, 0)] * (w.weight.ndim - 2)
    codes = jnp.pad(quant.unpack_nibbles(w.weight), lead + [(0, npad - n), (0, kpad - k)]).astype(jnp.uint8)
    half = kpad // 2
    q = _place(codes[..., :half], LO_BITS) | _place(codes[..., half:], HI_BITS)
    s = jnp.pad(w.weight_scale, lead + [(0, npad - n), (0, (kpad - k) // quant.NVFP4_BLOCK)])
    return Nvfp4Packed(q.astype(jnp.uint8), s, jnp.asarray(w.weight_scale_2, jnp.float32),
                       jnp.asarray(w.input_scale, jnp.float32), int(n), int(k))


def unpack_nvfp4(p: Nvfp4Packed) -> quant.Nvfp4:
    """Inverse of :func:`pack_nvfp4`: the checkpoint bytes, bit for bit."""
    codes = jnp.concatenate(split_codes(p.qweight), axis=-1)[..., :p.n, :p.k]
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
# In-kernel decoders: uint8 tile of kernel-layout bytes + its two e4m3 scale tiles -> two exact bf16 tiles
# ``E2M1 * scale * 2^DECODE_LOG2`` (lo codes, hi codes).

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


def _scales(s: jax.Array, log2: int) -> jax.Array:
    """e4m3 scale tile -> bf16 ``s * 2^log2`` (exact: 4 significant bits, in range for ``log2 <= 119``)."""
    return (s.astype(jnp.float32) * 2.0**log2).astype(jnp.bfloat16)


def decode_int(q: jax.Array, s_lo: jax.Array, s_hi: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Portable decoder (Triton and interpret mode). ``q [R, C]`` uint8, ``s_lo, s_hi [R, C/16]`` e4m3 ->
    ``(lo, hi)`` bf16 ``[R, C]``: lo codes times ``s_lo``, hi codes times ``s_hi``, times ``2^DECODE_LOG2``
    (exact products of normal numbers)."""
    r, c = q.shape
    lo_codes, hi_codes = split_codes(q.reshape(r, c // 16, 16))
    lo = e2m1_to_bf16(lo_codes) * _scales(s_lo, DECODE_LOG2)[:, :, None]
    hi = e2m1_to_bf16(hi_codes) * _scales(s_hi, DECODE_LOG2)[:, :, None]
    return lo.reshape(r, c), hi.reshape(r, c)


# Bit placement (KERNELS.md §4.2): an E2M1 code (s, E1, E0, M) written into bf16 bits 15, 8, 7, 6 (all others
# zero) reads as exactly E2M1 x 2^-126: E > 0 gives 2^(E-127) (1 + M/2), E = 0 the bf16 subnormal M x 2^-127,
# the same structure as E2M1's. One `fma.rn.bf16x2` with the block scale times 2^119 (exact in bf16: s <= 448
# has 4 significant bits and 448 x 2^119 < 2^128; 2^126 would overflow) then gives E2M1 x s x 2^-7 exactly
# (a normal number of <= 6 significant bits); the epilogue undoes the 2^-7.
# Per 4 bytes (one instance, pack=4): $2 the bytes, $3/$4 the scales of elements 0-1/2-3, $0/$1 the results.
# lo codes (byte bits 7, 0, 6, 5): `prmt` puts byte i at bf16 high byte (sign at 15, E1 at 8) and byte i << 1
# at the low byte (E0 at 7, M at 6); one mask clears the rest: 5 integer instructions for 4 weights.


def ptx_decode_lo(word: str, s0: str, s1: str, out0: str, out1: str) -> str:
    """PTX of the lo-code decode of one 32-bit ``word`` (operand names given): ``out0`` / ``out1`` the bf16x2 of
    bytes 0-1 / 2-3 times the bf16x2 scales ``s0`` / ``s1``."""
    return f"""{{
.reg .b32 b, t0, t1, negz;
mov.b32 negz, 0x80008000;
shl.b32 b, {word}, 1;
prmt.b32 t0, b, {word}, 0x5140;
prmt.b32 t1, b, {word}, 0x7362;
and.b32 t0, t0, 0x81C081C0;
and.b32 t1, t1, 0x81C081C0;
fma.rn.bf16x2 {out0}, t0, {s0}, negz;
fma.rn.bf16x2 {out1}, t1, {s1}, negz;
}}"""


_PTX_LO = ptx_decode_lo("$2", "$3", "$4", "$0", "$1")


# hi codes (byte bits 4, 3, 2, 1): after `<< 3` the sign is each byte's msb; `prmt` puts the byte in the low
# byte and its replicated sign in the high byte of each bf16, `<< 2` moves E1, E0, M to bits 8-6: 7 instructions.


def ptx_decode_hi(word: str, s0: str, s1: str, out0: str, out1: str) -> str:
    """The hi-code counterpart of :func:`ptx_decode_lo`."""
    return f"""{{
.reg .b32 c, t0, t1, zero, negz;
mov.b32 zero, 0;
mov.b32 negz, 0x80008000;
shl.b32 c, {word}, 3;
prmt.b32 t0, c, zero, 0x9180;
prmt.b32 t1, c, zero, 0xB3A2;
shl.b32 t0, t0, 2;
shl.b32 t1, t1, 2;
and.b32 t0, t0, 0x81C081C0;
and.b32 t1, t1, 0x81C081C0;
fma.rn.bf16x2 {out0}, t0, {s0}, negz;
fma.rn.bf16x2 {out1}, t1, {s1}, negz;
}}"""


_PTX_HI = ptx_decode_hi("$2", "$3", "$4", "$0", "$1")

# (Two single-result instances: jax 0.11.2's Triton lowering mishandles multi-result inline asm. The per-byte
# placement keeps each element's result a function of its own byte, whatever elements Triton packs together.)
ASM_SCALE_LOG2 = 119


def decode_asm(q: jax.Array, s_lo: jax.Array, s_hi: jax.Array) -> tuple[jax.Array, jax.Array]:
    """:func:`decode_int` in inline PTX, 1.5 integer instructions + one half `fma` per weight (GPU only)."""
    from jax.experimental.pallas import triton as plt

    r, c = q.shape
    q3 = q.reshape(r, c // 16, 16)
    shape = (r, c // 16, 16)
    out = [jax.ShapeDtypeStruct(shape, jnp.bfloat16)]
    res = []
    for ptx, s in ((_PTX_LO, s_lo), (_PTX_HI, s_hi)):
        scale = jnp.broadcast_to(_scales(s, ASM_SCALE_LOG2)[:, :, None], shape)
        [v] = plt.elementwise_inline_asm(ptx, args=[q3, scale], constraints="=r,=r,r,r,r", pack=4,
                                         result_shape_dtypes=out)
        res.append(v.reshape(r, c))
    return res[0], res[1]


def _prmt(a: int, b: int, c: int) -> int:
    """PTX ``prmt.b32`` (default mode): byte i of the result is byte ``c[4i+2:4i]`` of ``{b, a}``, or its
    replicated sign when ``c[4i+3]`` is set."""
    src = (b << 32) | a
    out = 0
    for i in range(4):
        sel = (c >> (4 * i)) & 0xF
        byte = (src >> (8 * (sel & 7))) & 0xFF
        if sel & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def decode_tile(q_ref, s_ref, lead: tuple, rows, j0, bkh: int, half: int, decode):
    """In a kernel: the weight tile of packed columns ``[j0, j0 + bkh)`` of ``rows`` (a ``pl.ds``) of
    ``q_ref[*lead]`` and its scales, decoded by ``decode`` into the ``(lo, hi)`` bf16 tiles (K ranges
    ``[j0, j0 + bkh)`` and ``[half + j0, half + j0 + bkh)``, see the module docstring)."""
    from jax.experimental import pallas as pl

    q = q_ref[(*lead, rows, pl.ds(j0, bkh))]
    s_lo = s_ref[(*lead, rows, pl.ds(j0 // 16, bkh // 16))]
    s_hi = s_ref[(*lead, rows, pl.ds((half + j0) // 16, bkh // 16))]
    return decode(q, s_lo, s_hi)


def emulate_decode_ptx(word: int) -> tuple[list[int], list[int]]:
    """Bit-level model of ``_PTX_LO`` / ``_PTX_HI`` before the scale ``fma`` (for CPU tests): one little-endian
    32-bit word of 4 bytes -> bf16 bit patterns (``E2M1 x 2^-126``) of the 4 lo and the 4 hi codes."""
    m32, mask = 0xFFFFFFFF, 0x81C081C0
    b = (word << 1) & m32
    lo = [_prmt(b, word, 0x5140) & mask, _prmt(b, word, 0x7362) & mask]
    c = (word << 3) & m32
    hi = [((_prmt(c, 0, sel) << 2) & m32) & mask for sel in (0x9180, 0xB3A2)]
    return ([r >> s & 0xFFFF for r in lo for s in (0, 16)], [r >> s & 0xFFFF for r in hi for s in (0, 16)])
