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


def test_decode_int_is_exact_for_every_code_and_every_finite_scale():
    """All 256 bytes (two codes each) times all 254 finite e4m3 scales, against fp32 math."""
    q = jnp.asarray(np.tile(np.arange(256, dtype=np.uint8), (FINITE_E4M3.size, 1)))  # [254, 256]
    s = jnp.asarray(FINITE_E4M3.astype(np.float32))
    s_blocks = jnp.broadcast_to(s[:, None], (s.size, 16)).astype(jnp.bfloat16)
    lo, hi = L.decode_int(q, s_blocks, s_blocks)
    byte = np.arange(256)
    want_lo = quant.E2M1_VALUES[byte & 15][None, :] * np.asarray(s)[:, None]
    want_hi = quant.E2M1_VALUES[byte >> 4][None, :] * np.asarray(s)[:, None]
    np.testing.assert_array_equal(np.asarray(lo.astype(jnp.float32)), want_lo)
    np.testing.assert_array_equal(np.asarray(hi.astype(jnp.float32)), want_hi)


def test_ptx_decoder_model_is_exact_for_every_byte_in_every_lane():
    """The bit-level model of the inline-PTX decoder (prmt tables, sign moves) over all bytes x positions."""
    for b in range(256):
        word = b | ((b * 7 + 3) & 255) << 8 | ((b * 13 + 5) & 255) << 16 | (255 - b) << 24
        lo, hi = L.emulate_decode_ptx(word)
        for lane in range(4):
            byte = (word >> (8 * lane)) & 255
            for bits, code in ((lo[lane], byte & 15), (hi[lane], byte >> 4)):
                v = np.array([bits], np.uint16).view(jnp.bfloat16).astype(np.float32)[0]
                assert v == quant.E2M1_VALUES[code] and np.signbit(v) == np.signbit(quant.E2M1_VALUES[code])


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
    q = np.asarray(p.qweight)[:8]
    np.testing.assert_array_equal(q & 15, codes[:, :256])
    np.testing.assert_array_equal(q >> 4, codes[:, 256:])


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
    s = np.resize(FINITE_E4M3.astype(np.float32), n)
    s16 = jnp.asarray(np.repeat(s[:, None], 16, axis=1)).astype(jnp.bfloat16)

    def kernel(q_ref, s_ref, lo_ref, hi_ref):
        lo, hi = L.decode_asm(q_ref[...], s_ref[...], s_ref[...])
        lo_ref[...] = lo
        hi_ref[...] = hi

    out = jax.ShapeDtypeStruct((n, 256), jnp.bfloat16)
    lo, hi = pl.pallas_call(kernel, out_shape=(out, out))(q, s16)
    byte = np.arange(256)
    np.testing.assert_array_equal(np.asarray(lo.astype(jnp.float32)), quant.E2M1_VALUES[byte & 15] * s[:, None])
    np.testing.assert_array_equal(np.asarray(hi.astype(jnp.float32)), quant.E2M1_VALUES[byte >> 4] * s[:, None])
