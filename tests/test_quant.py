"""Number formats against their definitions (exhaustively), and the activation simulations against the
spec's rounding rules (ARCHITECTURE.md §2.3, CHECKPOINT.md §2)."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dsv4_jax import quant


def e2m1_def(c: int) -> float:
    """E2M1 from its bit fields: sign bit 3, exponent bits 2-1 (bias 1), mantissa bit 0."""
    s, e, m = c >> 3, (c >> 1) & 3, c & 1
    mag = (m / 2) if e == 0 else (1 + m / 2) * 2.0 ** (e - 1)
    return -mag if s else mag


def e4m3_def(b: int) -> float:
    """float8_e4m3fn from its bit fields: bias 7, subnormals, S.1111.111 = NaN, no infinities."""
    s, e, m = b >> 7, (b >> 3) & 15, b & 7
    if e == 15 and m == 7:
        return float("nan")
    mag = (m / 8) * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
    return -mag if s else mag


E4M3 = np.array([e4m3_def(b) for b in range(256)])
E2M1 = np.array([e2m1_def(c) for c in range(16)])
FINITE_E4M3 = [b for b in range(256) if np.isfinite(E4M3[b])]


def as_e4m3(bytes_) -> jax.Array:
    return jax.lax.bitcast_convert_type(jnp.asarray(bytes_, jnp.uint8), jnp.float8_e4m3fn)


def as_e8m0(bytes_) -> jax.Array:
    return jax.lax.bitcast_convert_type(jnp.asarray(bytes_, jnp.uint8), jnp.float8_e8m0fnu)


def test_e2m1_table_is_the_bit_definition():
    np.testing.assert_array_equal(quant.E2M1_VALUES, E2M1)
    np.testing.assert_array_equal(np.asarray(quant.e2m1_decode(jnp.arange(16))), E2M1)
    assert np.signbit(quant.E2M1_VALUES[8])  # code 8 is -0


def test_e8m0_all_bytes():
    got = np.asarray(quant.e8m0_to_f32(as_e8m0(np.arange(256))), np.float64)
    want = 2.0 ** (np.arange(256) - 127.0)
    np.testing.assert_array_equal(got[1:255], want[1:255])
    assert got[0] in (2.0**-127, 0.0)  # 2^-127 is an fp32 subnormal; the CPU may flush it
    assert np.isnan(got[255])


def test_nibble_packing_low_nibble_first():
    packed = jnp.asarray([0x21, 0xF0], jnp.uint8)
    np.testing.assert_array_equal(np.asarray(quant.unpack_nibbles(packed)), [1, 2, 0, 15])
    codes = jnp.asarray(np.random.default_rng(0).integers(0, 16, (5, 64)), jnp.uint8)
    np.testing.assert_array_equal(np.asarray(quant.unpack_nibbles(quant.pack_nibbles(codes))), np.asarray(codes))


def test_fp8_block_every_code_times_every_scale():
    """Each of the 256 e4m3 bytes x each of the 254 normal UE8M0 scales, block by block."""
    scales = np.arange(1, 255)
    w = np.tile(np.arange(256, dtype=np.uint8), (len(scales) * 128, 1))  # [254*128, 256]
    s = np.repeat(scales[:, None], 2, axis=1)  # one scale per 128x128 block
    got = np.asarray(quant.dequantize(quant.Fp8Block(as_e4m3(w), as_e8m0(s)), jnp.float32), np.float64)
    want = E4M3[None, :] * (2.0 ** (scales - 127.0))[:, None]
    with np.errstate(over="ignore"):
        want = np.repeat(want, 128, axis=0).astype(np.float32)  # one fp32 rounding (subnormal/overflow)
    fin = np.isfinite(want) & np.isfinite(np.repeat(E4M3[None, :], len(scales) * 128, 0))
    normal = fin & (np.abs(want) >= np.finfo(np.float32).tiny)
    np.testing.assert_array_equal(got[normal], want[normal])
    assert np.isnan(got[:, [0x7F, 0xFF]]).all()


def test_fp8_block_scales_tile_the_matrix():
    """Ragged shapes: scale [ceil(out/128), ceil(in/128)] covers rows i//128 and columns j//128."""
    rng = np.random.default_rng(1)
    out, inn = 200, 300
    w = rng.choice(FINITE_E4M3, (out, inn)).astype(np.uint8)
    s = rng.integers(120, 135, (2, 3)).astype(np.uint8)
    got = np.asarray(quant.dequantize(quant.Fp8Block(as_e4m3(w), as_e8m0(s)), jnp.float32))
    i, j = np.meshgrid(np.arange(out), np.arange(inn), indexing="ij")
    want = E4M3[w] * 2.0 ** (s[i // 128, j // 128] - 127.0)
    np.testing.assert_array_equal(got, want.astype(np.float32))


def test_nvfp4_every_code_times_every_e4m3_scale():
    """All 16 codes x all finite e4m3 block scales x a random fp32 global scale, exact in fp32 (one rounding),
    and the bf16 dequantisation (without the global scale) is exact (KERNELS.md §4.2)."""
    n = len(FINITE_E4M3)
    codes = np.tile(np.arange(16, dtype=np.uint8), (n, 4))  # [n, 64]: 4 blocks of 16
    bs = np.tile(np.array(FINITE_E4M3, np.uint8)[:, None], (1, 4))
    g = np.float32(0.0123456)
    w = quant.Nvfp4(quant.pack_nibbles(jnp.asarray(codes)), as_e4m3(bs), jnp.asarray(g), jnp.float32(1))
    got = np.asarray(quant.dequantize(w, jnp.float32))
    exact = E2M1[codes] * np.repeat(E4M3[bs], 16, axis=1)
    np.testing.assert_array_equal(got, (exact * np.float64(g)).astype(np.float32))
    got_bf16 = np.asarray(quant.dequantize(w, jnp.bfloat16).astype(jnp.float32), np.float64)
    np.testing.assert_array_equal(got_bf16, exact)


def test_mxfp4_every_code_times_every_scale():
    scales = np.arange(1, 255)
    codes = np.tile(np.arange(16, dtype=np.uint8), (len(scales), 2))  # [254, 32]
    w = quant.Mxfp4(quant.pack_nibbles(jnp.asarray(codes)), as_e8m0(scales[:, None]))
    got = np.asarray(quant.dequantize(w, jnp.float32), np.float64)
    with np.errstate(over="ignore"):
        want = (E2M1[codes] * 2.0 ** (scales[:, None] - 127.0)).astype(np.float32)
    normal = np.abs(want) >= np.finfo(np.float32).tiny
    np.testing.assert_array_equal(got[normal], want[normal])
    got_bf16 = np.asarray(quant.dequantize(w, jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_array_equal(got_bf16[normal], want[normal])


def test_linear_applies_the_nvfp4_global_scale_in_every_dtype():
    rng = np.random.default_rng(2)
    w = quant.quantize_nvfp4(jnp.asarray(rng.normal(size=(3, 48, 64)), jnp.float32))
    x = jnp.asarray(rng.normal(size=(5, 64)), jnp.float32)
    full = np.asarray(quant.dequantize_full(w))
    for e in range(3):
        we = jax.tree.map(lambda a, e=e: a[e], w)
        want = np.asarray(x) @ full[e].T
        np.testing.assert_allclose(np.asarray(quant.linear(x, we, jnp.float32)), want, rtol=1e-5, atol=1e-5)
        got = np.asarray(quant.linear(x, we, jnp.bfloat16, jnp.float32))
        np.testing.assert_allclose(got, want, rtol=0.05, atol=0.05 * np.abs(want).max())


def test_pow2ceil_is_exact():
    x = np.array([1.0, 1.0000001, 0.75, 0.5, 2.0**-20, 3.0, 448.0, 2.0**-126, 1e-4 / 448], np.float32)
    want = np.array([2.0 ** np.ceil(np.log2(np.float64(v))) for v in x], np.float32)
    np.testing.assert_array_equal(np.asarray(quant.pow2ceil(jnp.asarray(x))), want)


def fp8_sim_ref(x: np.ndarray, block: int) -> np.ndarray:
    """ARCHITECTURE.md §2.3 in float64 numpy with ml_dtypes' e4m3 cast (round to nearest even)."""
    xb = x.astype(np.float64).reshape(-1, block)
    a = np.maximum(np.abs(xb).max(-1, keepdims=True), 1e-4)
    s = 2.0 ** np.ceil(np.log2(a / 448))
    q = np.clip(xb / s, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * s
    return q.reshape(x.shape)


def fp4_sim_ref(x: np.ndarray, block: int) -> np.ndarray:
    """ARCHITECTURE.md §2.3 FP4_SIM: nearest E2M1 value, exact midpoints to the even code."""
    xb = x.astype(np.float64).reshape(-1, block)
    a = np.maximum(np.abs(xb).max(-1, keepdims=True), 6 * 2.0**-126)
    s = 2.0 ** np.ceil(np.log2(a / 6))
    v = np.clip(xb / s, -6, 6)
    grid = E2M1[:8]  # 0, .5, 1, 1.5, 2, 3, 4, 6 (codes 0..7)
    dist = np.abs(np.abs(v)[..., None] - grid)
    best = dist.min(-1, keepdims=True)
    cand = np.where(dist == best, np.arange(8), 99)
    even = np.where(cand % 2 == 0, cand, 99).min(-1)  # a tie is always between an even and an odd code
    code = np.where((dist == best).sum(-1) > 1, even, cand.min(-1))
    return (np.sign(v) * grid[code] * s).reshape(x.shape)


def test_fp8_sim_midpoints_and_random():
    # s = 1 because the block's max is 448; the other entries sit on e4m3 midpoints.
    mids = [448, 1 + 1 / 16, 1 + 3 / 16, -(2 + 1 / 8), 2 + 3 / 8, 0.001953125 * 1.5, 2.0**-10, 300, 13.5]
    x = np.zeros(64, np.float32)
    x[: len(mids)] = mids
    x[len(mids):] = np.random.default_rng(3).uniform(-400, 400, 64 - len(mids))
    got = np.asarray(quant.fp8_sim(jnp.asarray(x), 64))
    np.testing.assert_array_equal(got, fp8_sim_ref(x, 64).astype(np.float32))
    assert got[1] == 1.0 and got[2] == 1.25 and got[3] == -2.0 and got[4] == 2.5
    r = np.random.default_rng(4).standard_normal((16, 256)).astype(np.float32) * np.float32(10) ** \
        np.random.default_rng(5).integers(-6, 4, (16, 1))
    np.testing.assert_array_equal(np.asarray(quant.fp8_sim(jnp.asarray(r), 64)), fp8_sim_ref(r, 64).astype(np.float32))


def test_fp4_sim_midpoints_and_random():
    x = np.array([6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5, 0.3] * 2,
                 np.float32)
    got = np.asarray(quant.fp4_sim(jnp.asarray(x), 32))
    np.testing.assert_array_equal(got[:16], [6, 0, 1, 1, 2, 2, 4, 4, 0, -1, -1, -2, -2, -4, -4, 0.5])
    # The block maximum sets the scale: amax 7 -> s = pow2ceil(7/6) = 2.
    y = np.array([7, 0.5, 1.5, 5.1] + [0] * 28, np.float32)
    np.testing.assert_array_equal(np.asarray(quant.fp4_sim(jnp.asarray(y), 32))[:4], [8, 0, 2, 6])
    r = np.random.default_rng(6).standard_normal((64, 128)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(quant.fp4_sim(jnp.asarray(r), 32)), fp4_sim_ref(r, 32).astype(np.float32))


def test_e2m1_codes_round_to_nearest_even():
    x = np.random.default_rng(7).uniform(-8, 8, 4096).astype(np.float32)
    x[:16] = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -0.0, 0, 6.5, -100, 0.2, 0.8, 1.3, 1.7, 2.6]
    got = np.asarray(quant.e2m1_round(jnp.asarray(x)))
    grid = E2M1[:8]
    v = np.clip(np.abs(x.astype(np.float64)), 0, 6)
    dist = np.abs(v[:, None] - grid)
    best = dist.min(-1, keepdims=True)
    tie = (dist == best).sum(-1) > 1
    code = np.where(tie, np.where((dist == best) & (np.arange(8) % 2 == 0), np.arange(8), 99).min(-1),
                    dist.argmin(-1))
    want = np.sign(x) * grid[code]
    np.testing.assert_array_equal(got, want.astype(np.float32))
    assert np.asarray(quant.e2m1_codes(jnp.asarray([-0.0])))[0] == 0  # -0 encodes as +0


def sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


@pytest.mark.parametrize("n", [32, 64, 128])
def test_hadamard(n):
    h = quant.hadamard_matrix(n)
    np.testing.assert_array_equal(h, sylvester(n))  # natural order = the recursive construction
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n))
    x = np.random.default_rng(8).standard_normal((3, n)).astype(np.float32)
    y = np.asarray(quant.hadamard(jnp.asarray(x)))
    np.testing.assert_allclose(y, x @ sylvester(n) / np.sqrt(n), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(quant.hadamard(jnp.asarray(y))), x, rtol=1e-5, atol=1e-5)


def test_fp8_block_quantiser():
    """Per 128x128 block: power-of-two scale pow2ceil(amax/448), e4m3 round to nearest even; idempotent."""
    rng = np.random.default_rng(9)
    w = (rng.standard_normal((200, 300)) * np.exp(rng.uniform(-5, 5, (200, 1)))).astype(np.float32)
    w[:128, :128] = 0  # an all-zero block
    q = quant.quantize_fp8_block(jnp.asarray(w))
    assert q.weight.dtype == jnp.float8_e4m3fn and q.scale.shape == (2, 3)
    got = np.asarray(quant.dequantize(q, jnp.float32))
    want = np.zeros_like(w, np.float64)
    for bi in range(2):
        for bj in range(3):
            blk = w[bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128].astype(np.float64)
            a = np.abs(blk).max()
            s = 2.0 ** np.ceil(np.log2(a / 448)) if a > 0 else 1.0
            want[bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128] = (
                (blk / s).astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * s)
    np.testing.assert_array_equal(got, want.astype(np.float32))
    again = quant.quantize_fp8_block(jnp.asarray(got))
    np.testing.assert_array_equal(np.asarray(quant.dequantize(again, jnp.float32)), got)


def test_mxfp4_quantiser_roundtrip():
    rng = np.random.default_rng(10)
    w = quant.Mxfp4(jnp.asarray(rng.integers(0, 256, (6, 32)), jnp.uint8),
                    as_e8m0(rng.integers(110, 140, (6, 2))))
    v = quant.dequantize(w, jnp.float32)
    again = quant.quantize_mxfp4(v)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(again, jnp.float32)), np.asarray(v))
