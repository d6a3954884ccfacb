"""Shared helpers of the kernel tests: fresh random NVFP4 / FP8 weights, the error measures, the model's logits with
and without its kernels, and the skips of the Mosaic GPU tests on a jax without its interpreter or cross-platform
lowering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax import quant


def rng(seed=None):
    return np.random.default_rng(seed)


def nvfp4(r, *shape, input_scale=1.0):
    """Random NVFP4 weight ``[*shape]`` (lead dims = experts) with per-matrix global scales."""
    w = r.standard_normal(shape).astype(np.float32) * r.uniform(0.01, 2.0)
    return quant.quantize_nvfp4(jnp.asarray(w), input_scale=jnp.full(shape[:-2], input_scale, jnp.float32))


def fp8(r, n, k):
    return quant.quantize_fp8_block(jnp.asarray(r.standard_normal((n, k)).astype(np.float32) * 0.05))


def bf16(r, *shape, scale=1.0):
    return jnp.asarray(r.standard_normal(shape) * scale, jnp.bfloat16)


def random_routing(r, t, n_experts, k):
    """``ids [t, k]`` int32 (distinct experts per token, from the first ``n_experts``) and fp32 weights."""
    ids = np.stack([r.choice(n_experts, k, replace=False) for _ in range(t)])
    return jnp.asarray(ids, jnp.int32), jnp.asarray(r.random((t, k)), jnp.float32)


def model_logits(model, tokens, kernels_on: bool) -> np.ndarray:
    """``forward``'s float32 logits with the GPU kernels (``kernels.ENABLED``) or the pure-JAX references; the
    compiled programs are dropped before and after, as they were traced under the other setting."""
    from dsv4_jax import forward, kernels

    kernels.ENABLED = kernels_on
    jax.clear_caches()
    try:
        return np.asarray(forward(model, tokens), np.float32)
    finally:
        kernels.ENABLED = True
        jax.clear_caches()


def per_position(a, b) -> np.ndarray:
    """Each position's largest logit difference, relative to the largest logit of ``b``: ``[..., V]`` -> ``[...]``."""
    return np.abs(a - b).max(-1) / np.abs(b).max()


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.isfinite(a).all(), "non-finite output"
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# Kernels and references multiply the same exact bf16 weights with fp32 accumulation in a different order:
# fp32 results agree to ~1e-6 relative; bf16 results to one bf16 rounding (2^-8 relative per element).
F32_TOL = 1e-5
BF16_TOL = 2.0**-8


def mgpu_interpret_or_skip():
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if not hasattr(plgpu, "InterpretGPUParams"):
        pytest.skip("this jax has no Mosaic GPU interpreter")


def mgpu_lowering_or_skip():
    mgpu_interpret_or_skip()
    try:
        jax.jit(lambda v: v + 1).trace(jax.ShapeDtypeStruct((8,), jnp.float32)).lower(lowering_platforms=("cuda",))
    except (TypeError, AttributeError, ValueError) as e:  # a jax without cross-platform lowering
        pytest.skip(f"cannot lower for cuda here: {e}")
