"""Sweep of the Mosaic GPU NVFP4 kernels (``pallas_kernels.nvfp4_mgpu``) on one Hopper GPU: pipeline step,
K split and stage count, scales copied once per program (``scales_once``) or a step at a time (default), and
a diagnostic variant whose "decode" only reinterprets the code bytes (no integer work, no scales: wrong
numbers). ``--stream`` times instead a kernel
that only streams the same bytes through the same TMA pipeline (code, scale and activation tiles; no decode, no
MMA, no output): the memory pipeline's own ceiling at 8192^2. Prints median CUPTI kernel time per configuration
(BENCHMARKS.md, sessions 8-9).

    PYTHONPATH=.:scripts python scripts/sweep_mgpu_nvfp4.py [--moe-tokens 1,4,16,64] [--stream]
"""
import argparse

import jax
import jax.numpy as jnp
import numpy as np
from bench_kernels import log, moe_ours, rand_nvfp4, routing
from cupti_timing import median_kernel_ms

from pallas_kernels import nvfp4_layout as L
from pallas_kernels import nvfp4_matmul as NM
from pallas_kernels import nvfp4_mgpu as G
from pallas_kernels import nvfp4_moe as MO


def no_decode(tile_k):
    """Diagnostic stand-in for ``nvfp4_mgpu._decode_ptx``: each code word reinterpreted as two bf16, no work."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from jax._src.lib.mlir import ir
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    from jax.experimental.mosaic.gpu import utils as mu

    def decode(ctx, codes, s_lo, s_hi):
        del ctx, s_lo, s_hi
        i32, bf16x2 = ir.IntegerType.get_signless(32), ir.VectorType.get((2,), ir.BF16Type.get())
        out = np.empty((1, tile_k // 8, 1, 1, 2, 1, 1, 1, 1), dtype=object)
        for g in range(tile_k // 32):
            for h in range(2):
                w = mu.bitcast(codes.registers[0, g, 0, 0, h, 0, 0, 0, 0], i32)
                for j in range(4):
                    out[0, 4 * g + j, 0, 0, h, 0, 0, 0, 0] = mu.bitcast(w, bf16x2)
        return fa.FragmentedArray(_registers=out, _layout=fa.WGMMA_LAYOUT, _is_signed=None)

    return plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA_8BIT, plgpu.RefType(), plgpu.RefType()),
                             return_type=plgpu.ShapeDtypeStruct((G.TILE_M, tile_k), jnp.bfloat16, plgpu.Layout.WGMMA)
                             )(decode)


def with_scales_once(flag):
    block_gemv = G.block_gemv

    def f(*a, **k):
        return block_gemv(*a, **{**k, "scales_once": flag})

    return f


def stream_only(codes, scales, rows, *, tile_k: int, split: int, stages: int):
    """The TMA pipeline of ``nvfp4_mgpu.block_gemv`` (one matrix, one block) with an empty step: per program
    (64 weight rows, one K slice) the ``[64, tile_k/2]`` code tiles, the two ``[64, 1, 16]`` scale tiles and the
    ``[R, tile_k]`` activation tiles are copied to shared memory and released unread."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    np_, kp = codes.shape[0], 2 * codes.shape[1]
    r = rows.shape[0]
    steps = kp // tile_k
    sper, kper = steps // split, kp // split
    sv = jax.lax.bitcast_convert_type(scales, jnp.uint8).reshape(np_, kp // 256, 16)

    def kernel(c_gmem, s_gmem, x_gmem, o_gmem):
        del o_gmem
        mi, si = jax.lax.axis_index("m"), jax.lax.axis_index("s")
        specs = G.pipeline_specs(tile_k, kp, r, si * sper)  # the kernel's own copies
        s_rows = s_gmem.at[pl.ds(mi * G.TILE_M, G.TILE_M)]
        plgpu.emit_pipeline(lambda idx, *refs: None, grid=(sper,), in_specs=specs, max_concurrent_steps=stages)(
            c_gmem.at[pl.ds(mi * G.TILE_M, G.TILE_M), pl.ds(si * (kper // 2), kper // 2)], s_rows, s_rows,
            x_gmem.at[:, pl.ds(si * kper, kper)])

    return plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((8,), jnp.float32), grid=(np_ // G.TILE_M, split),
                        grid_names=("m", "s"),
                        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)
                        )(codes, sv, rows)


def stream(ws):
    n = k = 8192
    rows = jnp.zeros((8, k), jnp.bfloat16) + 1
    for tile_k, split, st in ((256, 8, 3), (256, 8, 2), (256, 2, 4), (256, 4, 4), (256, 16, 2)):
        fn = jax.jit(lambda q, s, x, tile_k=tile_k, split=split, st=st: stream_only(q, s, x, tile_k=tile_k,
                                                                                 split=split, stages=st))
        us = median_kernel_ms(fn, [(p.qweight, p.scale, rows) for p in ws], 20) * 1e3
        log(f"8192^2 stream only (no decode, no MMA): step {tile_k} split {split} stages {st}: {us:.1f} us "
            f"({n * k * 0.5625 / us / 1e6:.2f} TB/s)")
    f = jax.jit(lambda p: (p.qweight.astype(jnp.int32).sum(), p.scale.astype(jnp.float32).sum()))
    log(f"8192^2 XLA reduction over codes + scales: {median_kernel_ms(f, [(p,) for p in ws], 20) * 1e3:.1f} us")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moe-tokens", default="1,4,16,64")
    ap.add_argument("--stream", action="store_true", help="only the streaming-ceiling probe")
    args = ap.parse_args()
    log(jax.devices()[0].device_kind, jax.__version__)
    real_gemv, real_decode = G.block_gemv, G._decode_ptx
    n = k = 8192
    ws = [L.pack_nvfp4(rand_nvfp4(jax.random.key(50 + i), n, k)) for i in range(6)]
    if args.stream:
        return stream(ws)
    for m in (1, 16, 64):
        x = jax.random.normal(jax.random.key(1), (m, k), jnp.bfloat16)
        cfgs = [(256, 8, 3), (512, 8, 2), (512, 4, 2), (512, 4, 3), (256, 4, 3), (512, 2, 3), (256, 16, 2)]
        for variant in ("default", "scales once", "no decode (diagnostic)"):
            G.block_gemv = with_scales_once(True) if variant == "scales once" else real_gemv
            G._decode_ptx = no_decode if variant.startswith("no decode") else real_decode
            jax.clear_caches()  # (else the jitted wrappers keep the kernels traced for the previous variant)
            for bk, split, st in cfgs if m == 1 else cfgs[:3]:
                c = NM.MatmulConfig(method="mgpu", bk=bk, split_k=split, num_stages=st)
                fn = jax.jit(lambda x, p, c=c: NM.nvfp4_matmul(x, p, jnp.bfloat16, config=c))
                try:
                    us = median_kernel_ms(fn, [(x, p) for p in ws], 20) * 1e3
                except Exception as e:  # noqa: BLE001
                    log(f"8192^2 M={m} {variant}: step {bk} split {split} stages {st}: {type(e).__name__}: {e}")
                    continue
                log(f"8192^2 M={m} {variant}: step {bk} split {split} stages {st}: {us:.1f} us "
                    f"({n * k * 0.5625 / us / 1e6:.2f} TB/s)")
    G.block_gemv, G._decode_ptx = real_gemv, real_decode
    jax.clear_caches()
    del ws
    e, d, i = 256, 4096, 2048
    ps = [L.pack_nvfp4(rand_nvfp4(jax.random.key(j), e, a, b)) for j, (a, b) in enumerate(((i, d), (d, i), (i, d)))]
    for t in [int(v) for v in args.moe_tokens.split(",")]:
        sets = [(jax.random.normal(jax.random.key(j), (t, d), jnp.bfloat16), *routing(jax.random.key(100 + j), t),
                 *ps) for j in range(4)]
        sched = "mgpu_pairs" if t * 6 <= MO.PAIRWISE_MAX else "mgpu_sorted"
        for bk, s13, s2, st in ((512, 1, 1, 2), (256, 1, 1, 4), (512, 2, 1, 2), (512, 0, 0, 2), (256, 0, 0, 3)):
            cfg = MO.MoeConfig(schedule=sched, bm=8, bk=bk, split13=s13, split2=s2, num_stages=st)
            us = median_kernel_ms(moe_ours(cfg), sets, 10) * 1e3
            log(f"MoE {t} tokens {sched}: step {bk} split {s13}/{s2} stages {st}: {us:.1f} us")


if __name__ == "__main__":
    main()
