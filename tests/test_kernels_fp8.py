"""FP8 block-scaled kernel and XLA formulation (pallas_kernels.fp8_matmul) against the reference."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_utils import F32_TOL, bf16, fp8, rel, rng

from pallas_kernels import fp8_matmul as F

CASES = [
    (1, 200, 300, F.Fp8Config(bm=16, bn=64)),
    (19, 128, 256, F.Fp8Config(bm=16, bn=128, split_k=2, swap_ab=False)),
    (40, 72, 140, F.Fp8Config(bm=32, bn=32)),
]


@pytest.mark.parametrize("m,n,k,cfg", CASES)
def test_kernel_equals_reference_interpret(m, n, k, cfg):
    r = rng()
    w, x = fp8(r, n, k), bf16(r, m, k)
    y = F.fp8_matmul(x, w, jnp.float32, config=cfg, interpret=True)
    assert y.shape == (m, n)
    assert rel(y, F.fp8_matmul_reference(x, w, jnp.float32)) < F32_TOL


@pytest.mark.parametrize("m,n,k", [(1, 200, 300), (70, 256, 128)])
def test_xla_formulations_equal_reference(m, n, k):
    r = rng()
    w, x = fp8(r, n, k), bf16(r, m, k)
    ref = F.fp8_matmul_reference(x, w, jnp.float32)
    assert rel(F.fp8_matmul_xla(x, w, jnp.float32), ref) < F32_TOL
    assert rel(F.fp8_matmul_dequant_dot(x, w, jnp.float32), ref) < F32_TOL


E4M3 = np.arange(256, dtype=np.uint8).view(jnp.float8_e4m3fn).astype(np.float64)


def test_e4m3_ptx_model_places_every_byte_exactly_in_every_lane():
    """The bit-level model of the e4m3 -> bf16 PTX: every non-NaN byte in every lane reads as e4m3 x 2^-120
    (signs and subnormals included), and 2^120 x that is exact in bf16."""
    for b in range(256):
        word = b | ((b * 7 + 3) & 255) << 8 | ((b * 13 + 5) & 255) << 16 | (255 - b) << 24
        bits = F.emulate_e4m3_ptx(word)
        for lane in range(4):
            want = E4M3[(word >> (8 * lane)) & 255]
            if np.isnan(want):
                continue
            got = np.array([bits[lane]], np.uint16).view(jnp.bfloat16).astype(np.float64)[0] * 2.0**120
            assert got == want and np.signbit(got) == np.signbit(want)
    finite = E4M3[np.isfinite(E4M3)]
    assert (finite.astype(jnp.bfloat16).astype(np.float64) == finite).all()


@pytest.mark.gpu
def test_gpu_e4m3_ptx_is_exact_for_every_byte():
    from jax.experimental import pallas as pl

    q = jnp.asarray(np.tile(np.arange(256, dtype=np.uint8), (16, 1)))

    def kernel(q_ref, o_ref):
        o_ref[...] = F.decode_e4m3_asm(q_ref[...])

    got = np.asarray(pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((16, 256), jnp.bfloat16))(q)
                     .astype(jnp.float32))
    ok = np.isfinite(E4M3)
    np.testing.assert_array_equal(got[:, ok], np.broadcast_to(E4M3[ok], (16, ok.sum())))
    np.testing.assert_array_equal(np.signbit(got[:, ok]), np.signbit(np.broadcast_to(E4M3[ok], (16, ok.sum()))))


@pytest.mark.gpu
@pytest.mark.parametrize("decode", ["convert", "asm"])
def test_gpu_fp8_ragged_cases_equal_reference(decode):
    r = rng()
    for m, n, k, cfg in CASES:
        w, x = fp8(r, n, k), bf16(r, m, k)
        y = F.fp8_matmul(x, w, jnp.float32, config=dataclasses.replace(cfg, decode=decode))
        assert rel(y, F.fp8_matmul_reference(x, w, jnp.float32)) < F32_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 300, 1100])
def test_gpu_fp8_equals_reference(m):
    r = rng()
    w, x = fp8(r, 1000, 2100), bf16(r, m, 2100)
    ref = F.fp8_matmul_reference(x, w, jnp.float32)
    assert rel(F.fp8_matmul(x, w, jnp.float32), ref) < F32_TOL


def _interpret_mgpu_or_skip():
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if not hasattr(plgpu, "InterpretGPUParams"):
        pytest.skip("this jax has no Mosaic GPU interpreter")


@pytest.mark.parametrize("m,n,k,split", [(1, 128, 512, 1), (3, 256, 1024, 2), (9, 192, 256, 1),
                                         (2, 128, 2048, 2)])
def test_mgpu_kernel_equals_reference_interpret(m, n, k, split):
    """The Mosaic GPU kernel in its GPU interpreter (weight tile through SMEM there; K = 2048 takes the UE8M0
    bytes into the kernel, the others fp32 scales), rows of magnitudes 10^-20 to 10^30, against the
    reference row by row."""
    _interpret_mgpu_or_skip()
    r = rng()
    w = fp8(r, n, k)
    mag = np.array([1.0, 3e4, 1e-20, 1e30, 2.0**-100, 7.0, 1e-3, 5e10, 0.5])[:m, None]
    x = jnp.asarray(r.standard_normal((m, k)) * mag, jnp.bfloat16)
    ref = F.fp8_matmul_reference(x, w, jnp.float32)
    y = F.fp8_matmul(x, w, jnp.float32, config=F.Fp8Config(method="mgpu", split_k=split), interpret=True)
    assert y.shape == (m, n)
    for row in range(m):  # per row: the magnitudes differ by 10^50
        assert rel(y[row], ref[row]) < F32_TOL, row


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 16, 64])
def test_gpu_mgpu_kernel_equals_reference(m):
    from pallas_kernels import fp8_matmul_mgpu as G

    if not G.available():
        pytest.skip("the Mosaic GPU FP8 kernel needs a Hopper GPU")
    r = rng()
    for n, k in [(8192, 8192), (4096, 8192), (32768, 1024), (192, 384)]:
        w = fp8(r, n, k)
        x = jnp.asarray(r.standard_normal((m, k)) * np.exp2(r.integers(-20, 20, (m, 1))), jnp.bfloat16)
        ref = F.fp8_matmul_reference(x, w, jnp.float32)
        for split in {1, G.default_split(n, k)}:
            y = G.fp8_matmul_mgpu(x, w, jnp.float32, split=split)
            for row in range(m):
                assert rel(y[row], ref[row]) < F32_TOL, (n, k, split, row)


@pytest.mark.parametrize("m,n,k,split", [(1, 8192, 8192, 2), (4, 4096, 8192, 4), (16, 32768, 1024, 1),
                                         (64, 1024, 4096, 16)])
def test_mgpu_kernel_lowers_for_hopper_on_cpu(m, n, k, split):
    """Mosaic GPU lowers the kernel (layout inference included) for a CUDA device without one, at the model's
    shapes, both scale routes (UE8M0 bytes in the kernel for K >= 2048, fp32 otherwise)."""
    _interpret_mgpu_or_skip()
    from pallas_kernels.fp8_matmul_mgpu import fp8_matmul_mgpu

    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((n, k), jnp.float8_e4m3fn)
    s = jax.ShapeDtypeStruct((-(-n // 128), k // 128), jnp.float8_e8m0fnu)

    def f(x, w, s):
        from dsv4_jax import quant

        return fp8_matmul_mgpu(x, quant.Fp8Block(weight=w, scale=s), jnp.bfloat16, split=split)

    try:
        text = jax.jit(f).trace(x, w, s).lower(lowering_platforms=("cuda",)).as_text()
    except (TypeError, AttributeError) as e:  # a jax without cross-platform lowering
        pytest.skip(f"cannot lower for cuda here: {e}")
    assert "mosaic_gpu" in text
