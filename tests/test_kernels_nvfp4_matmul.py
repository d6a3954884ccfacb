"""Dense NVFP4 x bf16 kernel (pallas_kernels.nvfp4_matmul) against its reference, and the W4A4 option
(pallas_kernels.nvfp4_act). Interpret mode on CPU; the same checks natively under ``-m gpu``."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from kernel_utils import BF16_TOL, F32_TOL, bf16, nvfp4, rel, rng

from dsv4_jax import quant
from pallas_kernels import nvfp4_act as A
from pallas_kernels import nvfp4_layout as L
from pallas_kernels import nvfp4_matmul as NM

C = NM.MatmulConfig

# (M, N, K, config): M, N, K not multiples of the tiles; both operand orders; split-K; every method.
CASES = [
    (1, 40, 96, C(bm=16, bn=32, bk=64, decode="int")),
    (19, 130, 272, C(bm=16, bn=64, bk=128, split_k=2, swap_ab=False, decode="int")),
    (33, 64, 512, C(bm=32, bn=64, bk=256, split_k=2, decode="int")),
    (5, 72, 160, C(method="dequant_dot", decode="int")),
    (1, 40, 96, C(method="fma", bn=32, bk=64, decode="int")),
    (3, 130, 272, C(method="fma", bn=64, bk=128, split_k=2, decode="int")),
    (8, 64, 512, C(method="fma", bn=64, bk=256, split_k=2, decode="int")),
]


@pytest.mark.parametrize("m,n,k,cfg", CASES)
def test_kernel_equals_reference_interpret(m, n, k, cfg):
    r = rng()
    w = nvfp4(r, n, k)
    x = bf16(r, m, k)
    y = NM.nvfp4_matmul(x, L.pack_nvfp4(w), jnp.float32, config=cfg, interpret=True)
    assert y.shape == (m, n) and y.dtype == jnp.float32
    assert rel(y, NM.nvfp4_matmul_reference(x, w, jnp.float32)) < F32_TOL


def test_reference_is_quant_linear():
    r = rng()
    w, x = nvfp4(r, 24, 64), bf16(r, 3, 64)
    np.testing.assert_array_equal(np.asarray(NM.nvfp4_matmul_reference(x, w, jnp.float32)),
                                  np.asarray(quant.linear(x, w, jnp.bfloat16, jnp.float32)))


def test_bf16_output_leading_dims_and_default_config_interpret():
    r = rng()
    w = nvfp4(r, 48, 64)
    x = bf16(r, 2, 3, 64)
    y = NM.nvfp4_matmul(x, L.pack_nvfp4(w), jnp.bfloat16, interpret=True)
    assert y.shape == (2, 3, 48) and y.dtype == jnp.bfloat16
    assert rel(y, NM.nvfp4_matmul_reference(x.reshape(6, 64), w, jnp.float32).reshape(2, 3, 48)) < BF16_TOL


def test_dequantize_kernel_is_exact_interpret():
    w = nvfp4(rng(), 70, 144)
    d = NM.nvfp4_dequantize(L.pack_nvfp4(w), decode="int", interpret=True)
    np.testing.assert_array_equal(np.asarray(d.astype(jnp.float32)),
                                  np.asarray(quant.dequantize(w, jnp.bfloat16).astype(jnp.float32)))


def test_shape_errors():
    p = L.pack_nvfp4(nvfp4(rng(), 16, 32))
    with pytest.raises(ValueError, match="inputs"):
        NM.nvfp4_matmul(jnp.zeros((2, 48), jnp.bfloat16), p, interpret=True)
    with pytest.raises(ValueError, match="does not tile"):
        NM.nvfp4_matmul(jnp.zeros((2, 32), jnp.bfloat16), p, config=C(bn=256), interpret=True)
    with pytest.raises(ValueError, match="at most"):
        NM.nvfp4_matmul(jnp.ones((NM.FMA_MAX_M + 1, 32), jnp.bfloat16), p, config=C(method="fma", bn=64, bk=64),
                        interpret=True)


def test_activation_quantiser_is_nvfp4_with_the_input_scale():
    """Each 16-block: values are E2M1 x an e4m3 scale; that scale is e4m3(amax / (6 * input_scale)), up to
    the fp32 rounding of the quotient (a quotient on an e4m3 rounding tie may go either way)."""
    r = rng()
    g = jnp.float32(0.02)
    x = bf16(r, 4, 64, scale=3.0)
    xq = np.asarray(A.quantize_activations(x, g).astype(jnp.float32)).reshape(4, 4, 16)
    amax = np.abs(np.asarray(x, np.float32)).reshape(4, 4, 16).max(-1)
    q = amax / (6 * 0.02)
    scales = [np.asarray(quant.e4m3_round(jnp.asarray(q * f, jnp.float32))) for f in (1 - 2**-20, 1, 1 + 2**-20)]
    fits = [np.isin(np.abs(xq / s[..., None]), quant.E2M1_VALUES[:8]).all(-1) for s in scales]
    assert np.logical_or.reduce(fits).all()
    err = np.abs(xq * 0.02 - np.asarray(x, np.float32).reshape(4, 4, 16)).max(-1)
    assert (err <= np.maximum.reduce(scales) * 0.02 * (1 + 1e-5)).all()  # half the top spacing, 1 x s


def test_w4a4_kernel_equals_reference_interpret():
    r = rng()
    w = nvfp4(r, 48, 96, input_scale=0.01)
    x = bf16(r, 5, 96)
    y = A.w4a4_matmul(x, L.pack_nvfp4(w), jnp.float32, config=C(bk=64, bn=64, decode="int"), interpret=True)
    assert rel(y, A.w4a4_matmul_reference(x, w, jnp.float32)) < F32_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 64, 300, 1100])
@pytest.mark.parametrize("decode", ["asm", "int"])
def test_gpu_kernel_equals_reference(m, decode):
    r = rng()
    n, k = 1000, 2064
    w = nvfp4(r, n, k)
    x = bf16(r, m, k)
    p = L.pack_nvfp4(w)
    cfg = NM.default_config(m, p.np_, p.kp, mgpu=False)  # the Triton kernels (Mosaic GPU: test_kernels_nvfp4_mgpu)
    y = NM.nvfp4_matmul(x, p, jnp.float32, config=dataclasses.replace(cfg, decode=decode))
    assert rel(y, NM.nvfp4_matmul_reference(x, w, jnp.float32)) < F32_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("decode", ["asm", "int"])
def test_gpu_ragged_cases_equal_reference(decode):
    r = rng()
    for m, n, k, cfg in CASES:
        w, x = nvfp4(r, n, k), bf16(r, m, k)
        y = NM.nvfp4_matmul(x, L.pack_nvfp4(w), jnp.float32, config=dataclasses.replace(cfg, decode=decode))
        assert rel(y, NM.nvfp4_matmul_reference(x, w, jnp.float32)) < F32_TOL


@pytest.mark.gpu
def test_gpu_w4a4_equals_reference():
    r = rng()
    w = nvfp4(r, 256, 512, input_scale=0.01)
    x = bf16(r, 7, 512)
    assert rel(A.w4a4_matmul(x, L.pack_nvfp4(w), jnp.float32), A.w4a4_matmul_reference(x, w, jnp.float32)) < F32_TOL
