"""W4A4 option: Blackwell numerics on any GPU. Activations are quantised to NVFP4 with the checkpoint's
static ``input_scale`` before the NVFP4 x NVFP4 product (what an FP4 x FP4 deployment computes, CHECKPOINT.md
§4.2 "Runtime activation quantization"), then multiplied by the W4A16 kernel.

Per 16 inputs: block scale ``s = e4m3(amax / (6 * input_scale))`` (saturating at 448), codes
``E2M1(x / (s * input_scale))`` rounded to nearest even with saturation at 6. The kernel receives the exact
bf16 values ``E2M1 x s`` and the fp32 ``input_scale`` joins ``weight_scale_2`` in the epilogue
(``alpha = input_scale * weight_scale_2``), so the only roundings are the two quantisations and the fp32
accumulation, as on Blackwell's block-scaled tensor cores.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4_jax import quant

from .nvfp4_layout import Nvfp4Packed, unpack_nvfp4
from .nvfp4_matmul import MatmulConfig, nvfp4_matmul


def quantize_activations(x: jax.Array, input_scale: jax.Array) -> jax.Array:
    """``x [..., K]`` -> ``E2M1 x s`` in bf16 (exact), to be multiplied by ``input_scale`` later.
    A block whose scale rounds to zero quantises to zeros."""
    k = x.shape[-1]
    if k % quant.NVFP4_BLOCK:
        raise ValueError(f"activation width {k} is not a multiple of 16")
    g = jnp.asarray(input_scale, jnp.float32)
    xb = x.astype(jnp.float32).reshape(*x.shape[:-1], k // quant.NVFP4_BLOCK, quant.NVFP4_BLOCK)
    amax = jnp.max(jnp.abs(xb), axis=-1, keepdims=True)
    s = quant.e4m3_round(jnp.minimum(amax / (quant.E2M1_MAX * g), quant.E4M3_MAX))
    total = s * g
    q = jnp.where(total > 0, xb / jnp.where(total > 0, total, 1.0), 0.0)
    v = quant.e2m1_round(jnp.clip(q, -quant.E2M1_MAX, quant.E2M1_MAX)) * s
    return v.reshape(x.shape).astype(jnp.bfloat16)


def w4a4_matmul_reference(x: jax.Array, w: quant.Nvfp4, out_dtype=jnp.bfloat16) -> jax.Array:
    """Reference: fp32 product of the two fully dequantised NVFP4 operands (both global scales included)."""
    xq = quantize_activations(x, w.input_scale).astype(jnp.float32) * w.input_scale
    y = quant.matmul("mk,nk->mn", xq.reshape(-1, x.shape[-1]), quant.dequantize_full(w))
    return y.reshape(*x.shape[:-1], -1).astype(out_dtype)


def w4a4_matmul(x: jax.Array, p: Nvfp4Packed, out_dtype=jnp.bfloat16, *, config: MatmulConfig | None = None,
                interpret: bool = False) -> jax.Array:
    """W4A4: ``quantize_activations(x, input_scale) @ W^T * (input_scale * weight_scale_2)``."""
    xq = quantize_activations(x, p.input_scale)
    return nvfp4_matmul(xq, p, out_dtype, act_scale=p.input_scale, config=config, interpret=interpret)


def w4a4_reference_from_packed(x: jax.Array, p: Nvfp4Packed, out_dtype=jnp.bfloat16) -> jax.Array:
    """:func:`w4a4_matmul_reference` on a packed weight."""
    return w4a4_matmul_reference(x, unpack_nvfp4(p), out_dtype)
