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
    PYTHONPATH=. python scripts/probe_mgpu_gather.py --time   # on the GPU: the gather's throughput (below)

``--time`` asks what a CSA kernel in Mosaic would spend on its gathers (BENCHMARKS.md, session 15). A CSA token
reads its 512 selected rows of Flash's 512-d latent; with 128-byte swizzled tiles a row is 8 copies of 64
columns, so a 64-row step of the attention is 512 TMA copies. One wave of resident programs (one an SM) each
walks ``STEPS`` steps through two slots, each step gathering 64 rows picked at random among 32K (a 128K prefill's
compressed rows) and waiting for the step before. Issued by one warpgroup (all 512 copies) or two (256 each, as
the attention's two value warpgroups would). Against the same bytes copied as whole ``[64, 64]`` tiles (8
copies a step). Prints per layout the kernel time, GB/s, copies per µs per SM and the time a 128K CSA prefill's
gathers would take (131072 tokens x 8 steps) at that rate. The Triton kernel's whole CSA attention at 128K takes
49.5 ms; the tensor work alone at 650 TFLOP/s, 17 ms.
"""

import functools
import sys

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

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


TD, TSTEPS, TROWS = 512, 64, 32768  # Flash's latent, steps a program, rows to pick from


def _time_kernel(idx_g, rows_g, o_g, k_rows, idx_s, bars, idx_bar, *, wgs: int, gather: bool):
    wg = lax.axis_index("wg") if wgs > 1 else 0
    p = lax.axis_index("p")
    tiles = TD // 64 // wgs  # column tiles a warpgroup copies

    @pl.when(wg == 0)
    def _():
        plgpu.copy_gmem_to_smem(idx_g.at[p], idx_s, idx_bar)

    plgpu.barrier_wait(idx_bar)

    def issue(i):
        slot = lax.rem(i, 2)
        bar = bars.at[slot * wgs + wg]
        for c in range(tiles):
            col = (wg * tiles + c) * 64
            col = col if isinstance(col, int) else pl.multiple_of(col, 64)
            if gather:
                @pl.loop(0, BK)
                def _(j):
                    plgpu.copy_gmem_to_smem(rows_g.at[pl.ds(idx_s[i, j], 1), pl.ds(col, 64)],
                                            k_rows.at[slot, wg * tiles + c, pl.ds(j, 1)], bar)
            else:
                start = pl.multiple_of(lax.rem(idx_s[i, 0], TROWS // BK) * BK, BK)
                plgpu.copy_gmem_to_smem(rows_g.at[pl.ds(start, BK), pl.ds(col, 64)], k_rows.at[slot, wg * tiles + c],
                                        bar)

    issue(0)

    @pl.loop(0, TSTEPS)
    def _(i):
        pl.when(i + 1 < TSTEPS)(lambda: issue(i + 1))
        plgpu.barrier_wait(bars.at[lax.rem(i, 2) * wgs + wg])

    @pl.when(wg == 0)
    def _():
        plgpu.copy_smem_to_gmem(k_rows.at[0, 0], o_g.at[p])
        plgpu.wait_smem_to_gmem(0)


def timed_gather(idx: jax.Array, rows: jax.Array, *, wgs: int, gather: bool) -> jax.Array:
    """Each of ``idx.shape[0]`` programs walks ``TSTEPS`` steps of 64 rows (``idx [P, TSTEPS, 64]``)."""
    swizzle = plgpu.SwizzleTransform(128)
    view = (1, 64) if gather else (8, 64)  # one (1, 64) row copy a tile column; or whole (8, 64)-tiled tiles
    arrivals = BK * TD // 64 // wgs if gather else TD // 64 // wgs
    n_p = idx.shape[0]
    return plgpu.kernel(
        functools.partial(_time_kernel, wgs=wgs, gather=gather),
        out_type=jax.ShapeDtypeStruct((n_p, BK, 64), jnp.bfloat16),
        grid=(n_p,), grid_names=("p",), num_threads=wgs, thread_name="wg",
        scratch_types=[plgpu.SMEM((2, TD // 64, BK, 64), jnp.bfloat16,
                                  transforms=(plgpu.TilingTransform(view), swizzle)),
                       plgpu.SMEM((TSTEPS, BK), jnp.int32),
                       plgpu.Barrier(num_arrivals=arrivals, num_barriers=2 * wgs), plgpu.Barrier()],
    )(idx, rows)


def time_gathers():
    import pathlib

    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from cupti_timing import median_kernel_ms, median_wall_ms

    from pallas_kernels.compressed_attention import sm_count

    n_p = sm_count()
    k = jax.random.split(jax.random.key(1), 2)
    rows = jax.random.normal(k[0], (TROWS, TD), jnp.bfloat16)
    idx = jax.random.randint(k[1], (n_p, TSTEPS, BK), 0, TROWS).astype(jnp.int32)
    nbytes = n_p * TSTEPS * BK * TD * 2
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}: {n_p} programs x {TSTEPS} steps x {BK} rows "
          f"x {TD} columns ({nbytes / 2**20:.0f} MiB)\n\n| copies | warpgroups issuing | copies a step | kernel µs | "
          "GB/s | copies / µs / SM | 128K CSA prefill's gathers, ms |\n|---|---|---|---|---|---|---|", flush=True)
    for gather in (True, False):
        for wgs in (1, 2):
            f = jax.jit(functools.partial(timed_gather, wgs=wgs, gather=gather))
            try:
                ms = median_kernel_ms(f, [(idx, rows)], 10) or median_wall_ms(f, [(idx, rows)], 10)
            except Exception as e:  # noqa: BLE001
                print(f"| {'rows' if gather else 'tiles'} | {wgs} | {type(e).__name__}: {str(e)[:200]} |", flush=True)
                continue
            per_step = BK * TD // 64 if gather else TD // 64
            rate = n_p * TSTEPS * per_step / (ms * 1e3) / n_p
            prefill_ms = 131072 * 8 * ms / (n_p * TSTEPS)  # 131072 tokens x 8 steps, n_p at a time
            print(f"| {'rows, 8 a row' if gather else 'whole tiles'} | {wgs} | {per_step} | {ms * 1e3:.1f} | "
                  f"{nbytes / ms / 1e6:.0f} | {rate:.1f} | {prefill_ms:.1f} |", flush=True)


def main():
    if "--time" in sys.argv:
        time_gathers()
        return
    if "--lower" in sys.argv:
        for gather in (True, False):
            for wgs in (1, 2):
                sd = jax.ShapeDtypeStruct
                low = jax.jit(functools.partial(timed_gather, wgs=wgs, gather=gather)).trace(
                    sd((132, TSTEPS, BK), jnp.int32), sd((TROWS, TD), jnp.bfloat16)).lower(lowering_platforms=("cuda",))
                print(f"timed gather (rows {gather}, {wgs} warpgroups) lowered for CUDA:", "mosaic_gpu" in low.as_text())
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
