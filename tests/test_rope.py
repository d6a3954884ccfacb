"""RoPE and YaRN (ARCHITECTURE.md §2.2)."""

import jax.numpy as jnp
import numpy as np

import dsv4_jax as d
from dsv4_jax.rope import apply_rope, rope_frequencies

# The compressed-layer frequencies listed in ARCHITECTURE.md §2.2 (theta 160000, YaRN x16 from 65536).
LISTED = [1, 0.687656, 0.4728708, 0.3251724, 0.2236068, 0.1537646, 0.1057371, 0.07271077, 0.05, 0.0343828,
          0.02364354, 0.01625862, 0.01118034, 0.007688228, 0.005286856, 0.003635539, 0.002265625,
          0.001396801, 0.0008496897, 0.000508082, 0.0002969778, 0.00016818, 9.086784e-05, 4.544423e-05,
          1.953125e-05, 5.372312e-06, 3.694303e-06, 2.54041e-06, 1.746928e-06, 1.201286e-06, 8.260713e-07,
          5.680529e-07]


def test_compressed_layer_frequencies_match_the_spec():
    np.testing.assert_allclose(rope_frequencies(d.FLASH, compressed=True), LISTED, rtol=2e-6)


def test_window_layer_frequencies_are_plain():
    f = rope_frequencies(d.FLASH, compressed=False)
    np.testing.assert_allclose(f, 10000.0 ** (-np.arange(0, 64, 2) / 64), rtol=1e-6)
    # Pairs 0-15 unchanged and 25-31 divided by 16 on compressed layers.
    plain = 160000.0 ** (-np.arange(0, 64, 2) / 64)
    fc = rope_frequencies(d.FLASH, compressed=True)
    np.testing.assert_allclose(fc[:16], plain[:16], rtol=1e-6)
    np.testing.assert_allclose(fc[25:], plain[25:] / 16, rtol=1e-6)


def test_rotation_is_interleaved_on_the_last_dims():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 2, 128)).astype(np.float32)
    pos = np.array([[0, 5, 1000]])
    f = rope_frequencies(d.FLASH, compressed=False)
    y = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos), f))
    np.testing.assert_array_equal(y[..., :64], x[..., :64])
    z = x[..., 64:].reshape(1, 3, 2, 32, 2)
    c = z[..., 0] + 1j * z[..., 1]
    ang = (pos[..., None, None].astype(np.float32) * f).astype(np.float64)
    want = c * np.exp(1j * ang)
    np.testing.assert_allclose(y[..., 64::2], want.real, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y[..., 65::2], want.imag, rtol=1e-5, atol=1e-5)
    back = np.asarray(apply_rope(jnp.asarray(y), jnp.asarray(pos), f, inverse=True))
    np.testing.assert_allclose(back, x, rtol=1e-5, atol=1e-5)


def test_dot_products_depend_on_relative_position():
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((2, 64)).astype(np.float32)
    f = rope_frequencies(d.FLASH, compressed=True)

    def dot(i, j):
        a = np.asarray(apply_rope(jnp.asarray(q[None]), jnp.asarray([i]), f))
        b = np.asarray(apply_rope(jnp.asarray(k[None]), jnp.asarray([j]), f))
        return float((a * b).sum())

    np.testing.assert_allclose(dot(10, 3), dot(107, 100), rtol=1e-4)
