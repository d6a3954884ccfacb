"""The Sinkhorn normalisation of the mHC mixing matrices (ARCHITECTURE.md §4.2 step 8) in one Pallas-Triton
launch, with the pure-JAX reference.

``m0 [M, n, n]`` fp32 (one matrix per token) -> the same shape: a row softmax plus ``eps``, a column
normalisation, then ``iters - 1`` rounds of (row, column) normalisation, each a division by the sum plus
``eps``. A token's matrix is 16 numbers, so the work is nothing; what matters is how XLA compiles it. As a
loop it is 19 device-side iterations of tiny kernels; unrolled, XLA fuses the rounds but its fusion pass then
spends most of a program's compile time on them (a decode step at Flash's dimensions on an H200: 192 s to
compile unrolled, 60 s as a loop; BENCHMARKS.md, "Compile time"). The kernel runs all rounds in registers, one
launch per mix, and compiles once for every layer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt


def sinkhorn_reference(m0: jax.Array, iters: int, eps: float) -> jax.Array:
    """The model's §4.2 formula, ``dsv4_jax.hc.sinkhorn``: row softmax (+eps), column normalisation, then
    ``iters - 1`` (row, column) rounds, over the last two axes of ``m0 [..., n, n]``."""
    from dsv4_jax import hc  # hc reaches this kernel through dsv4_jax.kernels

    return hc.sinkhorn(m0, iters, eps)


def supported(n: int) -> bool:
    """Whether the kernel takes ``n x n`` matrices: Triton's blocks need power-of-two sides."""
    return n >= 1 and n & (n - 1) == 0 and n <= 16


def _kernel(m_ref, o_ref, *, iters: int, eps: float):
    m = m_ref[...]  # [bm, n, n] fp32
    e = jnp.exp(m - jnp.max(m, axis=2, keepdims=True))
    m = e / jnp.sum(e, axis=2, keepdims=True) + eps
    m = m / (jnp.sum(m, axis=1, keepdims=True) + eps)

    def round_(_, m):
        m = m / (jnp.sum(m, axis=2, keepdims=True) + eps)
        return m / (jnp.sum(m, axis=1, keepdims=True) + eps)

    o_ref[...] = jax.lax.fori_loop(0, iters - 1, round_, m)


@functools.partial(jax.jit, static_argnames=("iters", "eps", "block_rows", "interpret"))
def sinkhorn(m0: jax.Array, iters: int, eps: float, *, block_rows: int = 64,
             interpret: bool = False) -> jax.Array:
    """:func:`sinkhorn_reference` of ``m0 [..., n, n]`` (fp32; ``n`` a power of two up to 16) in one launch of
    ``block_rows`` matrices a program."""
    *lead, n, n2 = m0.shape
    if n != n2 or not supported(n):
        raise ValueError(f"the Sinkhorn kernel takes square matrices of a power-of-two side up to 16, got "
                         f"{m0.shape[-2:]}")
    if iters < 1:
        raise ValueError(f"iters must be at least 1, got {iters}")
    if block_rows < 1 or block_rows & (block_rows - 1):
        raise ValueError(f"block_rows must be a power of two, got {block_rows}")
    rows = m0.reshape(-1, n, n).astype(jnp.float32)
    m = rows.shape[0]
    bm = min(block_rows, max(1, pl.next_power_of_2(m)))
    padded = pl.cdiv(m, bm) * bm
    if padded != m:  # zero matrices in the padding: finite all the way through, then dropped
        rows = jnp.pad(rows, ((0, padded - m), (0, 0), (0, 0)))
    spec = pl.BlockSpec((bm, n, n), lambda i: (i, 0, 0))
    out = pl.pallas_call(
        functools.partial(_kernel, iters=iters, eps=eps),
        out_shape=jax.ShapeDtypeStruct(rows.shape, jnp.float32),
        grid=(padded // bm,),
        in_specs=[spec],
        out_specs=spec,
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="sinkhorn",
    )(rows)
    return out[:m].reshape(*lead, n, n)
