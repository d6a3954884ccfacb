"""Benchmark of the compressed-attention and indexer kernels (issue 6) on one GPU, at Flash dimensions.

Per layer type (SWA: window only; CSA: indexer scoring + top-512 + window + selected rows; HCA: window + all
128:1 rows): decode time per token at 8K / 128K / 1M cached tokens and prefill time at 8K / 32K / 128K tokens,
kernel path vs the pure-JAX reference where it fits. Achieved TB/s (decode: bytes that must be read) and
TFLOP/s (prefill: FLOPs that must be done) are set against ceilings measured in the same run (a 4 GiB
``jnp.sum``; an 8192^3 bf16 ``jnp.dot``). Prints a markdown table.

    PYTHONPATH=. python scripts/bench_attention.py [--batch 1] [--decode 8192,131072,1048576]
        [--prefill 8192,32768,131072] [--reference-max 8192]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax import kernels
from pallas_kernels import compressed_attention as CA
from pallas_kernels import indexer_topk as IX

H, D, W, HI, DI, TOPK = 64, 512, 128, 64, 128, 512


def timed(f, *args, iters: int = 10) -> float:
    """Median wall time (s) of ``f(*args)`` after one warm-up call (compilation)."""
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def peak_gib() -> float:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0) / 2**30


def ceilings() -> tuple[float, float]:
    """(HBM read TB/s, bf16 matmul TFLOP/s) measured now."""
    x = jnp.ones((2**31,), jnp.bfloat16)
    bw = x.nbytes / timed(jax.jit(jnp.sum), x) / 1e12
    del x
    a = jnp.ones((8192, 8192), jnp.bfloat16)
    mm = 2 * 8192**3 / timed(jax.jit(lambda u: jnp.dot(u, u, preferred_element_type=jnp.bfloat16)), a) / 1e12
    return bw, mm


def inputs(key, b: int, t: int, n_rows: int, n_index: int):
    ks = jax.random.split(key, 8)
    bf = jnp.bfloat16
    q = jax.random.normal(ks[0], (b, t, H, D), bf)
    kv = jax.random.normal(ks[1], (b, t, D), bf)
    ring = jax.random.normal(ks[2], (b, W, D), bf)
    rows = jax.random.normal(ks[3], (b, max(n_rows, 1), D), bf)
    sink = jax.random.normal(ks[4], (H,), jnp.float32)
    iq = jax.random.normal(ks[5], (b, t, HI, DI), bf)
    iw = jax.random.normal(ks[6], (b, t, HI), jnp.float32) * 0.01
    ikeys = jax.random.normal(ks[7], (b, max(n_index, 1), DI), bf)
    return q, kv, ring, rows, sink, iq, iw, ikeys


def layer_fn(kind: str, kernel: bool, t: int):
    """One layer's attention (+ indexer) for ``kind`` in SWA / CSA / HCA, kernel or reference path."""
    dtype = jnp.bfloat16
    ratio = {"SWA": 0, "CSA": 4, "HCA": 128}[kind]

    def f(q, kv, ring, rows, sink, iq, iw, ikeys, pos0):
        sel = None
        if kind == "CSA":
            if kernel:
                sel = kernels.index_select(iq, iw, ikeys, pos0, 4, TOPK, dtype, query_block=2048)
            else:
                sel = IX.index_select_reference(iq, iw, ikeys, pos0[:, None] + jnp.arange(t), 4, TOPK)
        r = None if kind == "SWA" else rows
        if kernel:
            return kernels.window_attention(q, kv, ring, pos0, r, sel, sink, ratio, dtype, top_k=TOPK)
        return CA.compressed_attention_reference(q, kv, ring, pos0, sink, r, ratio=max(ratio, 1), sel=sel)

    return jax.jit(f)


def decode_cost(kind: str, b: int, ctx: int) -> float:
    """Bytes a decode step must read: q, the ring, the visible / selected rows (and the index rows)."""
    base = b * (H * D * 2 + W * D * 2)
    if kind == "HCA":
        return base + b * (ctx // 128) * D * 2
    if kind == "CSA":
        return base + b * (min(TOPK, ctx // 4) * D * 2 + (ctx // 4) * DI * 2 + HI * DI * 2)
    return base


def prefill_flops(kind: str, t: int) -> float:
    """FLOPs a prefill of ``t`` tokens must do (QK and PV over each query's window + visible/selected rows;
    indexer scoring over the eligible rows)."""
    win = sum(min(i + 1, W) for i in range(0, t, 64)) * 64
    keys = win
    idx = 0.0
    if kind == "HCA":
        keys += sum((i + 1) // 128 for i in range(t))
    if kind == "CSA":
        keys += sum(min(TOPK, (i + 1) // 4) for i in range(0, t, 64)) * 64
        idx = 2.0 * HI * DI * sum((i + 1) // 4 for i in range(0, t, 64)) * 64
    return 4.0 * H * D * keys + idx


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--decode", default="8192,131072,1048576")
    ap.add_argument("--prefill", default="8192,32768,131072")
    ap.add_argument("--reference-max", type=int, default=8192, help="longest prefill run through the reference")
    args = ap.parse_args()
    bw, mm = ceilings()
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}; measured ceilings: HBM read {bw:.2f} TB/s, "
          f"bf16 matmul {mm:.0f} TFLOP/s", flush=True)
    b = args.batch
    key = jax.random.PRNGKey(0)
    print(f"\n## Decode, batch {b}, per layer\n\n| layer | cached | kernel µs | floor µs | x floor | TB/s | "
          "reference µs | peak GiB |\n|---|---|---|---|---|---|---|---|", flush=True)
    per_layer_1m = {}
    for ctx in [int(c) for c in args.decode.split(",") if c]:
        for kind in ("SWA", "CSA", "HCA"):
            a = inputs(key, b, 1, ctx // 128 if kind == "HCA" else ctx // 4, ctx // 4)
            pos0 = jnp.full((b,), ctx - 1, jnp.int32)
            try:
                tk = timed(layer_fn(kind, True, 1), *a, pos0)
            except Exception as e:  # noqa: BLE001 (report and go on)
                print(f"| {kind} | {ctx} | error: {type(e).__name__}: {str(e)[:200]} |", flush=True)
                continue
            try:
                tr = f"{timed(layer_fn(kind, False, 1), *a, pos0) * 1e6:.1f}"
            except Exception as e:  # noqa: BLE001
                tr = type(e).__name__
            floor = decode_cost(kind, b, ctx) / (bw * 1e12)
            if ctx == 1048576:
                per_layer_1m[kind] = tk
            print(f"| {kind} | {ctx} | {tk * 1e6:.1f} | {floor * 1e6:.2f} | {tk / floor:.1f} | "
                  f"{decode_cost(kind, b, ctx) / tk / 1e12:.3f} | {tr} | {peak_gib():.1f} |", flush=True)
            del a
    if per_layer_1m:
        n = {"SWA": 2, "CSA": 21, "HCA": 20}
        tot = sum(per_layer_1m.get(k, 0.0) * n[k] for k in n)
        print(f"\nWhole model (2 SWA + 21 CSA + 20 HCA layers) attention+indexer per decode token at 1M, batch {b}: "
              f"{tot * 1e3:.2f} ms (sum of the per-layer times)", flush=True)
    print("\n## Prefill from position 0, batch 1, one layer\n\n| layer | tokens | kernel ms | TFLOP/s | % of matmul | "
          "reference ms | peak GiB |\n|---|---|---|---|---|---|---|", flush=True)
    for t in [int(c) for c in args.prefill.split(",") if c]:
        for kind in ("SWA", "HCA", "CSA"):
            a = inputs(key, 1, t, t // 128 if kind == "HCA" else t // 4, t // 4)
            pos0 = jnp.zeros((1,), jnp.int32)
            try:
                tk = timed(layer_fn(kind, True, t), *a, pos0, iters=2 if t > 32768 else 5)
            except Exception as e:  # noqa: BLE001
                print(f"| {kind} | {t} | error: {type(e).__name__}: {str(e)[:200]} |", flush=True)
                continue
            tr = "-"
            if t <= args.reference_max:
                try:
                    tr = f"{timed(layer_fn(kind, False, t), *a, pos0, iters=3) * 1e3:.1f}"
                except Exception as e:  # noqa: BLE001
                    tr = type(e).__name__
            fl = prefill_flops(kind, t)
            print(f"| {kind} | {t} | {tk * 1e3:.2f} | {fl / tk / 1e12:.1f} | {100 * fl / tk / 1e12 / mm:.0f} % | "
                  f"{tr} | {peak_gib():.1f} |", flush=True)
            del a


if __name__ == "__main__":
    main()
