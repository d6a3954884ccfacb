"""The mHC Sinkhorn kernel (pallas_kernels.sinkhorn) against the §4.2 formula in float64 (spec_reference) and
the model's reference, in Pallas' interpreter, lowered for sm_90, and on the GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import spec_reference
from kernel_utils import rng

from dsv4_jax import hc, kernels
from pallas_kernels import lowering
from pallas_kernels import sinkhorn as S


def logits(r, *shape, scale):
    return jnp.asarray(r.standard_normal(shape) * scale, jnp.float32)


# (shape of m0, iters, eps, block_rows): ragged row counts against the blocks, leading axes, every supported
# side (hc_mult), one round only, large logits (a row softmax near one-hot).
CASES = [
    ((37, 4, 4), 20, 1e-6, 16),
    ((2, 5, 4, 4), 20, 1e-6, 64),
    ((1, 4, 4), 20, 1e-6, 64),
    ((130, 2, 2), 7, 1e-3, 32),
    ((9, 8, 8), 20, 1e-6, 8),
    ((3, 1, 1), 4, 1e-6, 64),
    ((16, 4, 4), 1, 1e-6, 16),
    ((50, 16, 16), 3, 1e-6, 64),
]


@pytest.mark.parametrize("shape, iters, eps, block_rows", CASES)
@pytest.mark.parametrize("scale", [1.0, 8.0])
def test_kernel_equals_the_formula_interpret(shape, iters, eps, block_rows, scale):
    m0 = logits(rng(), *shape, scale=scale)
    got = S.sinkhorn(m0, iters, eps, block_rows=block_rows, interpret=True)
    assert got.shape == shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), spec_reference.sinkhorn(m0, iters, eps), rtol=2e-5, atol=2e-7)
    np.testing.assert_allclose(np.asarray(got), np.asarray(S.sinkhorn_reference(m0, iters, eps)),
                               rtol=1e-5, atol=1e-7)


def test_kernel_rows_do_not_depend_on_their_neighbours():
    """A token's matrix comes out the same whether it is computed alone or among others (decode = prefill)."""
    m0 = logits(rng(), 100, 4, 4, scale=3.0)
    together = np.asarray(S.sinkhorn(m0, 20, 1e-6, interpret=True))
    for i in (0, 63, 64, 99):
        alone = np.asarray(S.sinkhorn(m0[i : i + 1], 20, 1e-6, interpret=True))
        np.testing.assert_array_equal(alone[0], together[i])


@pytest.mark.parametrize("shape, block_rows", [((5, 3, 3), 64), ((5, 4, 2), 64), ((5, 32, 32), 64),
                                               ((5, 4, 4), 48)])
def test_kernel_refuses_what_it_cannot_take(shape, block_rows):
    with pytest.raises(ValueError, match="Sinkhorn kernel|block_rows"):
        S.sinkhorn(jnp.ones(shape, jnp.float32), 20, 1e-6, block_rows=block_rows, interpret=True)


def test_dispatch_takes_the_kernel_for_powers_of_two_and_the_formula_otherwise(monkeypatch):
    calls = []
    real = S.sinkhorn
    monkeypatch.setattr(S, "sinkhorn", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    r = rng()
    for n in (4, 3):
        m0 = logits(r, 6, n, n, scale=2.0)
        got = kernels.sinkhorn(m0, 20, 1e-6, interpret=True)
        want = spec_reference.sinkhorn(m0, 20, 1e-6)
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-7)
    assert calls == [(6, 4, 4)]
    # without a GPU (and not interpreted) the formula
    kernels.sinkhorn(logits(r, 6, 4, 4, scale=2.0), 20, 1e-6)
    assert calls == [(6, 4, 4)]


def test_hc_pre_with_the_kernel_equals_hc_pre_with_the_formula(monkeypatch):
    import dsv4_jax as d

    c = d.tiny()
    r = rng()
    n, dim = c.hc_mult, c.hidden_size
    h = jnp.asarray(r.standard_normal((2, 3, n, dim)), jnp.bfloat16)
    fn = logits(r, c.mix_hc, n * dim, scale=(n * dim) ** -0.5)
    scale = jnp.asarray(r.uniform(0.5, 1.5, 3), jnp.float32)
    base = logits(r, c.mix_hc, scale=1.0)
    want = hc.hc_pre(h, fn, scale, base, c)
    monkeypatch.setattr(kernels, "INTERPRET", True)
    got = hc.hc_pre(h, fn, scale, base, c)
    np.testing.assert_array_equal(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32))
    np.testing.assert_allclose(np.asarray(got[2]), np.asarray(want[2]), rtol=1e-5, atol=1e-7)


def test_kernel_lowers_for_sm90():
    launches = []
    try:
        with lowering.sm90(launches):
            m0 = jax.ShapeDtypeStruct((1040, 4, 4), jnp.float32)
            lowering.export_for_cuda(lambda m: S.sinkhorn(m, 20, 1e-6), m0)
    except lowering.LoweringUnavailable as e:
        pytest.skip(str(e))
    assert len(launches) == 1 and "tt.reduce" in launches[0].module


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 16, 1000, 8192])
def test_gpu_kernel_equals_the_formula(rows):
    r = rng()
    for n in (2, 4, 8):
        m0 = logits(r, rows, n, n, scale=4.0)
        got = np.asarray(S.sinkhorn(m0, 20, 1e-6))
        np.testing.assert_allclose(got, spec_reference.sinkhorn(m0, 20, 1e-6), rtol=2e-5, atol=2e-7)
        np.testing.assert_allclose(got, np.asarray(S.sinkhorn_reference(m0, 20, 1e-6)), rtol=2e-5, atol=2e-7)
