"""NVFP4 kernel layout (pallas_kernels.nvfp4_layout): exact reversible repacking and exhaustive decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_utils import nvfp4, rng

from dsv4_jax import quant
from pallas_kernels import nvfp4_layout as L

ALL_E4M3 = np.arange(256, dtype=np.uint8).view(jnp.float8_e4m3fn)
FINITE_E4M3 = ALL_E4M3[np.isfinite(ALL_E4M3.astype(np.float32))]


def test_e2m1_to_bf16_matches_the_code_table_bit_for_bit():
    v = np.asarray(L.e2m1_to_bf16(jnp.arange(16, dtype=jnp.uint8)).astype(jnp.float32))
    np.testing.assert_array_equal(v, quant.E2M1_VALUES)
    np.testing.assert_array_equal(np.signbit(v), np.signbit(quant.E2M1_VALUES))


def _codes(byte):
    lo, hi = L.split_codes(jnp.asarray(byte, jnp.uint8))
    return np.asarray(lo).astype(int), np.asarray(hi).astype(int)


def test_byte_layout_is_a_bit_permutation_and_split_codes_inverts_it():
    assert sorted(L.LO_BITS + L.HI_BITS) == list(range(8))
    lo, hi = _codes(np.arange(256))
    assert sorted((lo * 16 + hi).tolist()) == list(range(256))  # every (lo, hi) pair from exactly one byte
    assert (hi == np.arange(256) >> 1 & 15).all()  # hi code: byte bits 4..1


def test_decode_int_is_exact_for_every_code_and_every_finite_scale():
    """All 256 bytes (two codes each) times all 254 finite e4m3 scales, against fp32 math."""
    q = jnp.asarray(np.tile(np.arange(256, dtype=np.uint8), (FINITE_E4M3.size, 1)))  # [254, 256]
    s = FINITE_E4M3.astype(np.float32)
    s_blocks = jnp.asarray(np.repeat(FINITE_E4M3[:, None], 16, axis=1))
    lo, hi = L.decode_int(q, s_blocks, s_blocks)
    lo_c, hi_c = _codes(np.arange(256))
    unit = 2.0**L.DECODE_LOG2
    np.testing.assert_array_equal(np.asarray(lo.astype(jnp.float32)), quant.E2M1_VALUES[lo_c] * s[:, None] * unit)
    np.testing.assert_array_equal(np.asarray(hi.astype(jnp.float32)), quant.E2M1_VALUES[hi_c] * s[:, None] * unit)


def test_ptx_decoder_model_places_every_code_exactly_in_every_lane():
    """The bit-level model of the inline-PTX decoder (prmt, shifts, mask) over all bytes x positions: each
    result reads as E2M1 x 2^-126 (bf16 subnormal for code 0.5), signs included."""
    for b in range(256):
        word = b | ((b * 7 + 3) & 255) << 8 | ((b * 13 + 5) & 255) << 16 | (255 - b) << 24
        lo, hi = L.emulate_decode_ptx(word)
        for lane in range(4):
            lo_c, hi_c = _codes((word >> (8 * lane)) & 255)
            for bits, code in ((lo[lane], lo_c), (hi[lane], hi_c)):
                v = np.array([bits], np.uint16).view(jnp.bfloat16).astype(np.float64)[0] * 2.0**126
                assert v == quant.E2M1_VALUES[code] and np.signbit(v) == np.signbit(quant.E2M1_VALUES[code])


def test_ptx_scale_step_is_exact_for_every_code_and_every_finite_scale():
    """The `fma.rn.bf16x2` step: bf16(E2M1 x 2^-126) x bf16(s x 2^119) for all 16 codes x all finite e4m3
    scales is representable in bf16 (so round-to-nearest returns it) and equals E2M1 x s x 2^DECODE_LOG2."""
    v = quant.E2M1_VALUES.astype(np.float64) * 2.0**-126
    assert (v.astype(jnp.bfloat16).astype(np.float64) == v).all()  # incl. the subnormal 2^-127
    s = FINITE_E4M3.astype(np.float64) * 2.0**L.ASM_SCALE_LOG2
    assert (s.astype(jnp.bfloat16).astype(np.float64) == s).all()
    prod = v[:, None] * s[None, :]  # exact in float64
    assert (prod.astype(jnp.bfloat16).astype(np.float64) == prod).all()
    want = quant.E2M1_VALUES.astype(np.float64)[:, None] * FINITE_E4M3.astype(np.float64)[None, :]
    np.testing.assert_array_equal(prod, want * 2.0**L.DECODE_LOG2)


@pytest.mark.parametrize("shape", [(40, 96), (3, 130, 272), (128, 256)])
def test_pack_unpack_round_trip_is_bit_exact(shape):
    w = nvfp4(rng(), *shape)
    p = L.pack_nvfp4(w)
    assert p.shape == tuple(shape)
    assert p.np_ % L.PAD_N == 0 and p.kp % L.PAD_K == 0
    back = L.unpack_nvfp4(p)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(w)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8) if a.dtype.itemsize == 1 else np.asarray(a),
                                      np.asarray(b).view(np.uint8) if b.dtype.itemsize == 1 else np.asarray(b))


def test_half_split_places_code_j_and_code_half_plus_j_in_one_byte():
    w = nvfp4(rng(), 8, 512)
    p = L.pack_nvfp4(w)
    codes = np.asarray(quant.unpack_nibbles(w.weight))
    lo, hi = _codes(np.asarray(p.qweight)[:8])
    np.testing.assert_array_equal(lo, codes[:, :256])
    np.testing.assert_array_equal(hi, codes[:, 256:])


def test_padding_is_zero_and_dequantize_packed_matches_quant():
    w = nvfp4(rng(), 2, 40, 48)
    p = L.pack_nvfp4(w)
    assert not np.asarray(p.qweight)[:, 40:].any()
    assert not np.asarray(p.scale.astype(jnp.float32))[:, :, 3:].any()
    np.testing.assert_array_equal(np.asarray(L.dequantize_packed(p, jnp.float32)),
                                  np.asarray(quant.dequantize(w, jnp.bfloat16).astype(jnp.float32)))


def test_pack_rejects_inputs_not_multiple_of_16():
    w = quant.Nvfp4(jnp.zeros((4, 4), jnp.uint8), jnp.zeros((4, 1), jnp.float8_e4m3fn), jnp.float32(1),
                    jnp.float32(1))
    with pytest.raises(ValueError, match="multiple of 16"):
        L.pack_nvfp4(w)


@pytest.mark.gpu
def test_gpu_ptx_decoder_is_exact_for_every_byte_and_scale():
    """On the GPU: the inline-PTX decoder inside a Pallas-Triton kernel, all bytes x all finite scales."""
    from jax.experimental import pallas as pl

    n = 256
    q = jnp.asarray(np.tile(np.arange(256, dtype=np.uint8), (n, 1)))
    s8 = np.resize(FINITE_E4M3, n)
    s16 = jnp.asarray(np.repeat(s8[:, None], 16, axis=1))

    def kernel(q_ref, s_ref, lo_ref, hi_ref):
        lo, hi = L.decode_asm(q_ref[...], s_ref[...], s_ref[...])
        lo_ref[...] = lo
        hi_ref[...] = hi

    out = jax.ShapeDtypeStruct((n, 256), jnp.bfloat16)
    lo, hi = pl.pallas_call(kernel, out_shape=(out, out))(q, s16)
    lo_c, hi_c = _codes(np.arange(256))
    s = s8.astype(np.float32)[:, None] * 2.0**L.DECODE_LOG2
    for got, c in ((lo, lo_c), (hi, hi_c)):
        got = np.asarray(got.astype(jnp.float32))
        np.testing.assert_array_equal(got, quant.E2M1_VALUES[c] * s)
        np.testing.assert_array_equal(np.signbit(got), np.signbit(quant.E2M1_VALUES[c] * s))
