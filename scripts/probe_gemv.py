"""What limits the decode-shaped (M <= 8) NVFP4 matmul on a GPU: a Pallas-Triton streaming kernel that only
reads the same bytes (the ceiling of this access pattern), the tensor-core kernel (``method="fused"``) and the
CUDA-core kernel (``method="fma"``) over a sweep of tiles, on the 8192x8192 and expert shapes.

    python scripts/probe_gemv.py [--ms 1,4] [--budget 240]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
from cupti_timing import median_kernel_ms
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

import dsv4_jax  # noqa: F401
from pallas_kernels import nvfp4_layout as L
from pallas_kernels import nvfp4_matmul as NM

sys.path.insert(0, os.path.dirname(__file__))
from bench_kernels import copies, nv_bytes, rand_nvfp4

SHAPES = {"8192x8192": (8192, 8192), "w13 4096->2048": (2048, 4096), "w2 2048->4096": (4096, 2048)}


@jax.jit
def xla_read(p: L.Nvfp4Packed):
    """XLA's own read of the same bytes (row sums of codes and scales): the ceiling outside Pallas."""
    return jnp.sum(p.qweight, axis=1, dtype=jnp.int32).astype(jnp.float32) + jnp.sum(
        p.scale.astype(jnp.float32), axis=1)


@jax.jit
def xla_read32(p: L.Nvfp4Packed):
    """The same read with the bytes viewed as 32-bit words (row sums of words): XLA's fastest reader measured
    here (the uint8 reduction above is slower at these sizes)."""
    def words(a):
        a = jax.lax.bitcast_convert_type(a, jnp.uint8)
        return jax.lax.bitcast_convert_type(a.reshape(*a.shape[:-1], -1, 4), jnp.uint32)

    return jnp.sum(words(p.qweight) & 1, axis=-1) + jnp.sum(words(p.scale) & 1, axis=-1)


C = NM.MatmulConfig


def stream_sum(p: L.Nvfp4Packed, bn: int, bkh: int, split: int, warps: int, stages: int):
    """Reads every code and scale byte once (tiles ``[bn, bkh]``), sums them per row: no decode, no math."""
    np_, kh = p.qweight.shape
    steps = kh // (bkh * split)

    def kernel(q_ref, s_ref, o_ref):
        pn, sk = pl.program_id(0), pl.program_id(1)

        def body(t, acc):
            j0 = pl.multiple_of((sk * steps + t) * bkh, bkh)
            q = q_ref[pl.ds(pn * bn, bn), pl.ds(j0, bkh)].astype(jnp.int32)
            s = s_ref[pl.ds(pn * bn, bn), pl.ds(j0 // 8, bkh // 8)].astype(jnp.float32)
            return acc + jnp.sum(q, axis=1).astype(jnp.float32) + jnp.sum(s, axis=1)

        acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bn,), jnp.float32))
        o_ref[sk, pl.ds(pn * bn, bn)] = acc

    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((split, np_), jnp.float32),
                          grid=(np_ // bn, split), name="stream_sum",
                          compiler_params=plt.CompilerParams(num_warps=warps, num_stages=stages))(p.qweight, p.scale)


def timed(label, fn, argsets, nbytes, rows):
    try:
        ms = median_kernel_ms(fn, argsets, 20)
    except Exception as e:  # noqa: BLE001
        print(f"  {label}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
        return None
    rows.append((label, ms * 1e3, nbytes / ms / 1e9))
    print(f"  {label}: {ms * 1e3:.1f} us  {nbytes / ms / 1e9:.2f} TB/s", flush=True)
    return ms


def fma_cands(np_, kp):
    out = []
    for bn, bk, nw in ((32, 256, 4), (64, 256, 4), (64, 256, 8), (128, 256, 8), (32, 512, 4), (64, 512, 8),
                       (16, 512, 4), (16, 1024, 4), (32, 1024, 8)):
        for split in (1, 2, 4, 8):
            for ns in (2, 3, 4):
                if np_ % bn or kp % (bk * split) or kp // (bk * split) < 2 or (np_ // bn) * split > 4096:
                    continue
                if (np_ // bn) * split < 132 or ns == 4 and split != 4:
                    continue
                out.append(C(method="fma", bn=bn, bk=bk, split_k=split, num_warps=nw, num_stages=ns))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1,4")
    ap.add_argument("--budget", type=float, default=240.0)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--fma-only", action="store_true", help="only the default config and the best fma tiles")
    ap.add_argument("--reads-only", action="store_true", help="only XLA's reads of the same bytes")
    a = ap.parse_args()
    t0 = time.time()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    rows = []
    for name, (n, k) in SHAPES.items():
        p = L.pack_nvfp4(rand_nvfp4(jax.random.key(0), n, k))
        ps = copies(p, nv_bytes(n, k))
        nbytes = nv_bytes(n, k)
        print(f"== {name}", flush=True)
        if name not in a.shapes.split(","):
            continue
        timed(f"{name} xla read", xla_read, [(q,) for q in ps], nbytes, rows)
        timed(f"{name} xla read (32-bit words)", xla_read32, [(q,) for q in ps], nbytes, rows)
        if a.reads_only:
            continue
        for bn, bkh, split, nw, ns in ((64, 128, 8, 4, 3), (64, 256, 4, 4, 3), (32, 256, 4, 4, 3),
                                       (128, 128, 4, 8, 3), (64, 512, 1, 4, 3), (64, 128, 8, 4, 1),
                                       (32, 128, 8, 4, 4)):
            if p.np_ % bn or (p.kp // 2) % (bkh * split):
                continue
            timed(f"{name} stream bn{bn} bkh{bkh} s{split} w{nw} st{ns}",
                  functools.partial(stream_sum, bn=bn, bkh=bkh, split=split, warps=nw, stages=ns),
                  [(q,) for q in ps], nbytes, rows)
        for m in [int(v) for v in a.ms.split(",")]:
            xs = [(jax.random.normal(jax.random.key(i), (m, k), jnp.bfloat16), q) for i, q in enumerate(ps)]
            best = {}
            cands = [NM.default_config(m, p.np_, p.kp)] + fma_cands(p.np_, p.kp)
            if a.fma_only:
                cands = cands[:1] + [C(method="fma", bn=bn, bk=256, split_k=s, num_warps=w, num_stages=st)
                                     for bn, s, w, st in ((64, 8, 8, 2), (64, 4, 8, 2), (128, 4, 8, 3),
                                                          (32, 4, 4, 3), (64, 2, 8, 2), (32, 8, 4, 2))
                                     if p.np_ % bn == 0 and p.kp % (256 * s) == 0]
            for cfg in cands:
                if time.time() - t0 > a.budget:
                    print("  budget reached", flush=True)
                    break
                ms = timed(f"{name} m={m} {cfg.method} bn{cfg.bn} bk{cfg.bk} s{cfg.split_k} w{cfg.num_warps} "
                           f"st{cfg.num_stages}", functools.partial(NM.nvfp4_matmul, config=cfg), xs, nbytes, rows)
                if ms is not None and ms < best.get(cfg.method, (1e9,))[0]:
                    best[cfg.method] = (ms, cfg)
            for meth, (ms, cfg) in best.items():
                print(f"BEST {name} m={m} {meth}: {ms * 1e3:.1f} us {nbytes / ms / 1e9:.2f} TB/s {cfg}", flush=True)
        del ps


if __name__ == "__main__":
    main()
