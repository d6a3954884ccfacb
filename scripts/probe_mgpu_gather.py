"""Probe for a Mosaic GPU (``plgpu``) CSA attention kernel: can single key rows, chosen by index, be gathered by
TMA into the 128-byte swizzled tile that wgmma reads (BENCHMARKS.md, session 10)?

Mosaic lowers a TMA copy into an ``(8, 64)``-tiled buffer only at row offsets that are multiples of 8, and
Hopper has no TMA gather. A buffer 64 columns wide has the same bytes under ``(1, 64)`` and ``(8, 64)`` tiling
(one column of tiles, rows in order; the 128-byte swizzle follows the shared-memory address). So the probe
declares both views of one buffer (``plgpu.RefUnion``). It writes 64 rows, each picked by a random index,
through the ``(1, 64)`` view, one TMA copy a row, all on one barrier of 64 arrivals. A wgmma then reads the
``(8, 64)`` view as ``K^T`` of ``Q K^T``. The result is compared with ``Q @ rows[idx]^T`` in fp32.

    PYTHONPATH=. python scripts/probe_mgpu_gather.py          # on the GPU: prints the largest error
    PYTHONPATH=. python scripts/probe_mgpu_gather.py --lower  # anywhere: lowers for a CUDA device only
"""

import sys

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp

BK, D, R = 64, 64, 1000  # gathered rows, columns (one 128-byte swizzle span), rows to gather from


def _kernel(idx_g, rows_g, q_g, o_g, idx_s, k_union, q_s, o_s, bar, k_bar, q_bar):
    k_rows, k_tiles = k_union  # the same bytes: (1, 64) tiles for the copies, (8, 64) for wgmma
    plgpu.copy_gmem_to_smem(idx_g, idx_s, bar)
    plgpu.copy_gmem_to_smem(q_g, q_s, q_bar)
    plgpu.barrier_wait(bar)

    @pl.loop(0, BK)
    def _(j):
        plgpu.copy_gmem_to_smem(rows_g.at[pl.ds(idx_s[j], 1)], k_rows.at[pl.ds(j, 1)], k_bar)

    plgpu.barrier_wait(k_bar)
    plgpu.barrier_wait(q_bar)

    def qk(acc):
        plgpu.wgmma(acc, q_s, k_tiles.T)
        plgpu.wgmma_wait(0)
        return acc[...]

    o_s[...] = pl.run_scoped(qk, plgpu.ACC((64, BK), jnp.float32))
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_s, o_g)
    plgpu.wait_smem_to_gmem(0)


def gather_scores(idx: jax.Array, rows: jax.Array, q: jax.Array) -> jax.Array:
    """``q [64, D] @ rows[idx]^T`` (``idx [BK]``) with the rows gathered by TMA, one copy a row."""
    swizzle = plgpu.SwizzleTransform(128)
    k_union = plgpu.RefUnion(
        plgpu.SMEM((BK, D), jnp.bfloat16, transforms=(plgpu.TilingTransform((1, 64)), swizzle)),
        plgpu.SMEM((BK, D), jnp.bfloat16, transforms=(plgpu.TilingTransform((8, 64)), swizzle)))
    return plgpu.kernel(
        _kernel, out_type=jax.ShapeDtypeStruct((64, BK), jnp.float32),
        scratch_types=[plgpu.SMEM((BK,), jnp.int32), k_union,
                       plgpu.SMEM((64, D), jnp.bfloat16, transforms=(plgpu.TilingTransform((8, 64)), swizzle)),
                       plgpu.SMEM((64, BK), jnp.float32),
                       plgpu.Barrier(), plgpu.Barrier(num_arrivals=BK), plgpu.Barrier()])(idx, rows, q)


def main():
    if "--lower" in sys.argv:
        sd = jax.ShapeDtypeStruct
        low = jax.jit(gather_scores).trace(sd((BK,), jnp.int32), sd((R, D), jnp.bfloat16),
                                           sd((64, D), jnp.bfloat16)).lower(lowering_platforms=("cuda",))
        print("lowered for CUDA:", "mosaic_gpu" in low.as_text())
        return
    k = jax.random.split(jax.random.key(0), 3)
    rows = jax.random.normal(k[0], (R, D), jnp.bfloat16)
    q = jax.random.normal(k[1], (64, D), jnp.bfloat16)
    idx = jax.random.randint(k[2], (BK,), 0, R).astype(jnp.int32)
    out = jax.jit(gather_scores)(idx, rows, q)
    ref = jnp.dot(q.astype(jnp.float32), rows[idx].astype(jnp.float32).T)
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}: largest error {float(jnp.max(jnp.abs(out - ref))):.3g}"
          f" (scores up to {float(jnp.max(jnp.abs(ref))):.3g})")


if __name__ == "__main__":
    main()
