"""FP8 block-scaled kernel and XLA formulation (pallas_kernels.fp8_matmul) against the reference."""

import jax.numpy as jnp
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


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 300, 1100])
def test_gpu_fp8_equals_reference(m):
    r = rng()
    w, x = fp8(r, 1000, 2100), bf16(r, m, 2100)
    ref = F.fp8_matmul_reference(x, w, jnp.float32)
    assert rel(F.fp8_matmul(x, w, jnp.float32), ref) < F32_TOL
    for mm, n, k, cfg in CASES:
        w2, x2 = fp8(r, n, k), bf16(r, mm, k)
        assert rel(F.fp8_matmul(x2, w2, jnp.float32, config=cfg), F.fp8_matmul_reference(x2, w2, jnp.float32)) < F32_TOL
