"""Benchmark of the compressed-attention and indexer kernels (issue 6) on one GPU, at Flash dimensions.

Per layer type (SWA: window only; CSA: indexer scoring + top-512 + window + selected rows; HCA: window + all
128:1 rows): decode time per step at 8K / 128K / 1M cached tokens for each batch size, and prefill time at
8K / 32K / 128K tokens, kernel path vs the pure-JAX reference where it fits. Kernel times are CUPTI sums of the
kernels one call launches (inputs rotated over copies larger than the L2); wall times are medians of whole
calls (dispatch included). Achieved TB/s (decode: bytes that must be read) and TFLOP/s (prefill: FLOPs that
must be done) are set against ceilings measured in the same run (a 4 GiB ``jnp.sum``; an 8192^3 bf16
``jnp.dot``). Where the default attention kernel is the Mosaic GPU one (SWA and HCA prefill, HCA decode of 8
tokens or more: ``compressed_attention.use_mgpu``) or the indexer's scoring the Mosaic GPU one (CSA prefill:
``indexer_mgpu.use``), the Pallas-Triton kernels are timed beside it. ``--by-kernel`` also lists each decode
step's kernels with their times, and each prefill's summed by kernel; ``--sweep`` first times a few tile choices
of each kernel. Prints markdown tables.

    PYTHONPATH=. python scripts/bench_attention.py [--batch 1,32] [--decode 8192,131072,1048576]
        [--prefill 8192,32768,131072] [--reference-max 8192] [--kinds SWA,CSA,HCA] [--by-kernel] [--sweep]
        [--no-mosaic-indexer] [--sweep-decode B] [--sweep-indexer] [--sweep-prefill]
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
from cupti_timing import extension, median_kernel_ms, median_kernels_ms, median_wall_ms

from dsv4_jax import kernels
from pallas_kernels import compressed_attention as CA
from pallas_kernels import compressed_attention_mgpu as CM
from pallas_kernels import indexer_mgpu as IM
from pallas_kernels import indexer_topk as IX

H, D, W, HI, DI, TOPK = 64, 512, 128, 64, 128, 512
LAYERS = {"SWA": 2, "CSA": 21, "HCA": 20}  # Flash's 43 layers
RATIO = {"SWA": 0, "CSA": 4, "HCA": 128}
ROTATE_BYTES = 256 << 20


def measure(fn, argsets, iters: int) -> tuple[float | None, float]:
    """``(kernel ms, wall ms)`` of one call: median over ``iters`` calls (rotating over ``argsets``) of the
    summed CUPTI kernel time (None without CUPTI), and median wall time of blocking calls."""
    wall = median_wall_ms(fn, argsets, iters)
    try:
        kernel = median_kernel_ms(fn, argsets, iters)
    except Exception:  # noqa: BLE001
        kernel = None
    return kernel, wall


def copies(tree, cap: int = 8):
    """Enough distinct copies of ``tree`` to exceed the L2 several times over."""
    nbytes = sum(a.nbytes for a in jax.tree.leaves(tree))
    r = int(min(cap, max(1, -(-ROTATE_BYTES // max(nbytes, 1)))))
    return [tree] + [jax.tree.map(lambda a: jnp.array(a, copy=True), tree) for _ in range(r - 1)]


def peak_gib() -> float:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0) / 2**30


def ceilings() -> tuple[float, float]:
    """(HBM read TB/s, bf16 matmul TFLOP/s) measured now."""
    x = jnp.ones((2**31,), jnp.bfloat16)
    bw = x.nbytes / (measure(jax.jit(jnp.sum), [(x,)], 10)[1] * 1e-3) / 1e12
    k = measure(jax.jit(jnp.sum), [(x,)], 10)[0]
    bw = max(bw, x.nbytes / (k * 1e-3) / 1e12) if k else bw
    del x
    a = jnp.ones((8192, 8192), jnp.bfloat16)
    k, wall = measure(jax.jit(lambda u: jnp.dot(u, u, preferred_element_type=jnp.bfloat16)), [(a,)], 10)
    return bw, 2 * 8192**3 / ((k or wall) * 1e-3) / 1e12


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


def spread_selection(b: int, t: int, pos0: int) -> jax.Array:
    """A stand-in for the indexer's choice (sweeps): ``min(k, eligible)`` rows spread over the eligible ones."""
    lim = (pos0 + jnp.arange(t) + 1) // 4
    j = jnp.arange(TOPK)
    idx = jnp.where(lim[:, None] >= TOPK, j * lim[:, None] // TOPK, j)
    return jnp.broadcast_to(jnp.where(j < jnp.minimum(lim, TOPK)[:, None], idx, -1), (b, t, TOPK)).astype(jnp.int32)


def layer_fn(kind: str, kernel: bool, t: int, triton: bool = False):
    """One layer's attention (+ indexer) for ``kind`` in SWA / CSA / HCA, kernel or reference path; ``triton``:
    the Pallas-Triton kernels where the default would take a Mosaic GPU one (the attention of SWA / HCA, the
    indexer's prefill scoring)."""
    dtype = jnp.bfloat16
    ratio = RATIO[kind]

    def f(q, kv, ring, rows, sink, iq, iw, ikeys, pos0):
        r = None if kind == "SWA" else rows
        if kernel and triton and kind != "CSA":
            return CA.compressed_attention(q, kv, ring, pos0, sink, r, ratio=max(ratio, 1), mgpu=False)
        if kernel:
            sel = None
            if kind == "CSA" and triton:
                sel = IX.index_select(iq, iw, ikeys, pos0, ratio=4, top_k=TOPK, query_block=2048, mgpu=False)
                return CA.compressed_attention(q, kv, ring, pos0, sink, r, ratio=ratio, idx=sel, mgpu=False)
            elif kind == "CSA":
                sel = kernels.index_select(iq, iw, ikeys, pos0, 4, TOPK, dtype, query_block=2048)
            return kernels.window_attention(q, kv, ring, pos0, r, sel, sink, ratio, dtype)
        sel = None
        if kind == "CSA":
            sel = IX.index_select_reference(iq, iw, ikeys, pos0[:, None] + jnp.arange(t), 4, TOPK)
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


def attention_keys(kind: str, t: int) -> float:
    """Keys (window + visible or selected rows) summed over the queries of a prefill of ``t`` tokens."""
    keys = sum(min(i + 1, W) for i in range(0, t, 64)) * 64
    if kind == "HCA":
        keys += sum((i + 1) // 128 for i in range(t))
    if kind == "CSA":
        keys += sum(min(TOPK, (i + 1) // 4) for i in range(0, t, 64)) * 64
    return keys


def prefill_flops(kind: str, t: int) -> float:
    """FLOPs a prefill of ``t`` tokens must do (QK and PV over each query's keys; indexer scoring over the
    eligible rows)."""
    idx = 2.0 * HI * DI * sum((i + 1) // 4 for i in range(0, t, 64)) * 64 if kind == "CSA" else 0.0
    return 4.0 * H * D * attention_keys(kind, t) + idx


def _fmt(x: float | None, scale: float = 1e3, digits: int = 1) -> str:
    return "-" if x is None else f"{x * scale:.{digits}f}"


def sweep(key, mm: float, bw: float):
    """Tile choices of the attention kernel (prefill at 32K, decode at 1M, batch 1) and of the indexer."""
    sweep_prefill(key, mm)
    sweep_indexer(key, mm, bw)
    sweep_decode(key, bw, 1, [1 << 20])


def sweep_prefill(key, mm: float):
    """Tile choices of the prefill attention kernel at 32K tokens, per layer type."""
    t = 32768
    print(f"\n## Tile sweep\n\nPrefill attention at {t} tokens (kernel only; CSA with a spread selection):\n\n"
          "| layer | bm | bk | warps | stages | ms | TFLOP/s | % of matmul |\n|---|---|---|---|---|---|---|---|",
          flush=True)
    pos0 = jnp.zeros((1,), jnp.int32)
    # (bm = 128 and 3 stages do not fit in shared memory; 16 warps measured 2-4x slower, BENCHMARKS.md)
    cfgs = [(64, 64, 8, 2), (64, 32, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2), (64, 64, 16, 2)]
    for kind in ("SWA", "HCA", "CSA"):
        q, kv, ring, rows, sink, *_ = inputs(key, 1, t, t // 128 if kind == "HCA" else t // 4, 1)
        idx = spread_selection(1, t, 0) if kind == "CSA" else None
        r = None if kind == "SWA" else rows
        fl = 4.0 * H * D * attention_keys(kind, t)
        for bm, bk, nw, ns in cfgs + ([(32, 32, 4, 2), (32, 64, 4, 3), (16, 64, 4, 2), (32, 64, 8, 2)]
                                      if kind == "CSA" else []):
            if kind == "CSA" and bm > H:
                continue
            cfg = CA.AttnConfig(bm=bm, bk=bk, num_warps=nw, num_stages=ns)
            f = jax.jit(lambda *a, cfg=cfg, r=r, idx=idx, kind=kind: CA.compressed_attention(
                *a, r, ratio=max(RATIO[kind], 1), idx=idx, config=cfg))
            try:
                k, wall = measure(f, [(q, kv, ring, pos0, sink)], 5)
            except Exception as e:  # noqa: BLE001
                print(f"| {kind} | {bm} | {bk} | {nw} | {ns} | {type(e).__name__} |", flush=True)
                continue
            ms = k or wall
            print(f"| {kind} | {bm} | {bk} | {nw} | {ns} | {ms:.2f} | {fl / ms / 1e9:.0f} | "
                  f"{100 * fl / ms / 1e9 / mm:.0f} % |", flush=True)


def sweep_indexer(key, mm: float, bw: float):
    """Tile choices of the indexer (scoring tiles; ``bits``/``chunk``: the top-k's radix passes): scoring alone and
    scoring + top-512, prefill at 32K and decode at 1M cached tokens (batches 1 and 32)."""
    t = 32768
    print(f"\n## Indexer tiles\n\nPrefill, {t} tokens from position 0 (ms; scoring of all tokens in one call, "
          "TFLOP/s on the eligible rows; select in query blocks of 2048):\n\n"
          "| bt | bk | nk | warps | stages | scoring ms | TFLOP/s | % of matmul | + top-512 ms |\n"
          "|---|---|---|---|---|---|---|---|---|", flush=True)
    _, _, _, _, _, iq, iw, ikeys = inputs(key, 1, t, 1, t // 4)
    pos0 = jnp.zeros((1,), jnp.int32)
    fl = 2.0 * HI * DI * sum((i + 1) // 4 for i in range(t))
    base = IX.default_config(t, t // 4)
    choices = [(base.bt, base.bk, base.nk, base.num_warps, base.num_stages)]
    choices += [c for c in [(4, 64, 32, 4, 3), (2, 64, 32, 4, 2), (1, 64, 32, 4, 2), (2, 128, 16, 8, 2)]
                if c not in choices]
    for bt, bk, nk, nw, ns in choices:
        cfg = dataclasses.replace(base, bt=bt, bk=bk, nk=nk, num_warps=nw, num_stages=ns)
        fs = jax.jit(lambda q, w, k, cfg=cfg: IX.index_scores_kernel(q, w, k, pos0, ratio=4, cfg=cfg))
        fa = jax.jit(lambda *a, cfg=cfg: IX.index_select(*a, pos0, ratio=4, top_k=TOPK, config=cfg, query_block=2048))
        row = f"| {bt} | {bk} | {nk} | {nw} | {ns} |"
        try:
            ks = measure(fs, [(iq, iw, ikeys)], 3)[0]
            ka = measure(fa, [(iq, iw, ikeys)], 3)[0]
        except Exception as e:  # noqa: BLE001
            print(f"{row} {type(e).__name__}: {str(e)[:160]} |", flush=True)
            continue
        rate = fl / ks / 1e9 if ks else 0.0
        print(f"{row} {_fmt(ks, 1.0, 2)} | {rate:.0f} | {100 * rate / mm:.0f} % | {_fmt(ka, 1.0, 2)} |", flush=True)
    print("\nMosaic GPU scoring (`indexer_mgpu`), same tokens; and the last query block of a 128K prefill (2048 "
          "tokens x 32K rows) against the Triton default:\n\n| stages | nk | 32K scoring ms | TFLOP/s | % of matmul "
          "| + top-512 ms | 128K last block ms | TFLOP/s | Triton ms |\n|---|---|---|---|---|---|---|---|---|",
          flush=True)
    big = inputs(key, 1, 2048, 1, 32768)[5:]
    p_big = jnp.full((1,), 131072 - 2048, jnp.int32)
    fl_big = 2.0 * HI * DI * sum((131072 - 2048 + i + 1) // 4 for i in range(2048))
    tri_big = measure(jax.jit(lambda q, w, k: IX.index_scores_kernel(q, w, k, p_big, ratio=4,
                                                                      cfg=IX.default_config(2048, 32768))),
                      [big], 5)[0]
    for stages, nk in [(4, 0), (2, 0), (4, 64), (4, 16)]:
        mc = IM.MgpuIndexConfig(stages=stages, nk=nk)
        fs = jax.jit(lambda q, w, k, mc=mc: IM.index_scores_raw(q, w, k, pos0, ratio=4, cfg=mc))
        fb = jax.jit(lambda q, w, k, mc=mc: IM.index_scores_raw(q, w, k, p_big, ratio=4, cfg=mc))
        try:
            ks, kb = measure(fs, [(iq, iw, ikeys)], 3)[0], measure(fb, [big], 5)[0]
            ka = "-"
            if mc == IM.default_config(DI):
                fa = jax.jit(lambda *a: IX.index_select(*a, pos0, ratio=4, top_k=TOPK, query_block=2048, mgpu=True))
                ka = _fmt(measure(fa, [(iq, iw, ikeys)], 3)[0], 1.0, 2)
        except Exception as e:  # noqa: BLE001
            print(f"| {stages} | {nk} | {type(e).__name__}: {str(e)[:160]} |", flush=True)
            continue
        rate, rate_b = (fl / ks / 1e9 if ks else 0.0), (fl_big / kb / 1e9 if kb else 0.0)
        print(f"| {stages} | {nk} | {_fmt(ks, 1.0, 2)} | {rate:.0f} | {100 * rate / mm:.0f} % | {ka} | "
              f"{_fmt(kb, 1.0, 3)} | {rate_b:.0f} | {_fmt(tri_big, 1.0, 3)} |", flush=True)
    del big
    s = IX.index_scores_kernel(iq[:, -2048:], iw[:, -2048:], ikeys, pos0 + t - 2048, ratio=4, cfg=base)
    s = s.reshape(2048, -1)
    lim = (t - 2048 + jnp.arange(2048) + 1) // 4
    print(f"\nTop-512 alone over the scores of the last 2048 tokens ({s.shape[1]} rows each; ms):\n\n"
          "| bits | bs | chunk | warps | ms |\n|---|---|---|---|---|", flush=True)
    for bits, bs, chunk, nw in [(4, 1024, 8192, 4), (4, 512, 2048, 4), (4, 1024, 2048, 4), (4, 1024, 4096, 4),
                                (2, 1024, 8192, 4), (4, 1024, 8192, 8)]:
        cfg = dataclasses.replace(base, bits=bits, bs=bs, chunk=chunk, num_warps=nw)
        f = jax.jit(lambda x, lim, cfg=cfg: IX.topk_indices(x, lim, top_k=TOPK, cfg=cfg))
        try:
            k = measure(f, [(s, lim)], 5)[0]
        except Exception as e:  # noqa: BLE001
            print(f"| {bits} | {bs} | {chunk} | {nw} | {type(e).__name__}: {str(e)[:160]} |", flush=True)
            continue
        print(f"| {bits} | {bs} | {chunk} | {nw} | {_fmt(k, 1.0, 3)} |", flush=True)
    del s
    ctx = 1 << 20
    for b in (1, 32):
        print(f"\nDecode at {ctx} cached tokens, batch {b} (µs; top-k in blocks of min(chunk, 512)):\n\n"
              "| bk | nk | warps | bits | chunk | scoring | + top-512 | scoring TB/s | % of HBM read |\n"
              "|---|---|---|---|---|---|---|---|---|", flush=True)
        _, _, _, _, _, iq, iw, ikeys = inputs(key, b, 1, 1, ctx // 4)
        pos0 = jnp.full((b,), ctx - 1, jnp.int32)
        base = IX.default_config(1, ctx // 4, b)
        choices = [(base.bk, base.nk, base.num_warps, base.bits, base.chunk)]
        choices += [c for c in [(128, 4, 4, 4, 2048), (64, 16, 4, 4, 2048), (64, 8, 4, 4, 1024), (64, 8, 4, 4, 2048),
                                (64, 8, 4, 4, 4096), (64, 8, 4, 4, 8192), (64, 8, 4, 2, 1024)] if c not in choices]
        for bk, nk, nw, bits, chunk in choices:
            cfg = dataclasses.replace(base, bk=bk, nk=nk, num_warps=nw, bits=bits, chunk=chunk,
                                      bs=min(512, chunk))
            fs = jax.jit(lambda q, w, k, p, cfg=cfg: IX.index_scores_kernel(q, w, k, p, ratio=4, cfg=cfg))
            fa = jax.jit(lambda q, w, k, p, cfg=cfg: IX.index_select(q, w, k, p, ratio=4, top_k=TOPK, config=cfg))
            args = copies((iq, iw, ikeys, pos0), cap=4)
            row = f"| {bk} | {nk} | {nw} | {bits} | {chunk} |"
            try:
                ks, ka = measure(fs, args, 20)[0], measure(fa, args, 20)[0]
            except Exception as e:  # noqa: BLE001
                print(f"{row} {type(e).__name__}: {str(e)[:160]} |", flush=True)
                continue
            nbytes = b * (ctx // 4) * DI * 2
            tbs = nbytes / (ks * 1e-3) / 1e12 if ks else 0.0
            print(f"{row} {_fmt(ks)} | {_fmt(ka)} | {tbs:.2f} | {100 * tbs / bw:.0f} % |", flush=True)
            del args


def sweep_decode(key, bw: float, b: int, contexts: list[int]):
    """Tile choices of the decode attention kernel alone (CSA with a spread selection, HCA over all rows; for HCA
    also the Mosaic GPU kernel's splits)."""
    for ctx in contexts:
        print(f"\nDecode attention at {ctx} cached tokens, batch {b} (kernel only, µs; default = the kernel's own "
              "choice):\n\n| layer | bm | warps | splits | kernel µs | x floor |\n|---|---|---|---|---|---|", flush=True)
        pos0 = jnp.full((b,), ctx - 1, jnp.int32)
        for kind in ("CSA", "HCA"):
            n_rows = ctx // 128 if kind == "HCA" else ctx // 4
            q, kv, ring, rows, sink, *_ = inputs(key, b, 1, n_rows, 1)
            idx = spread_selection(b, 1, ctx - 1) if kind == "CSA" else None
            floor = (decode_cost(kind, b, ctx) - (b * (ctx // 4) * DI * 2 if kind == "CSA" else 0)) / (bw * 1e12)
            dflt = CA.default_config(1, H, n_rows, b, TOPK if kind == "CSA" else 0)
            choices = [(dflt.bm, dflt.num_warps, dflt.splits)]
            choices += [c for c in [(64, 8, 1), (64, 8, 2), (64, 8, 4), (64, 8, 8), (64, 8, 16), (64, 8, 32),
                                    (32, 4, 2), (32, 4, 4), (32, 4, 8), (32, 4, 16), (32, 4, 32), (32, 4, 64),
                                    (64, 4, 16), (16, 4, 8), (16, 4, 32), (64, 16, 4), (64, 16, 8)]
                        if c not in choices and not (kind == "CSA" and c[2] > 8)]
            runs = []  # (bm, warps, splits, default?, function of (q, kv, ring, pos0, sink, rows))
            for i, (bm, nw, splits) in enumerate(choices):
                cfg = CA.AttnConfig(bm=bm, bk=64, splits=splits, num_warps=nw)
                runs.append((bm, nw, splits, i == 0, lambda *a, cfg=cfg, idx=idx, kind=kind: CA.compressed_attention(
                    *a, ratio=RATIO[kind], idx=idx, config=cfg)))
            if kind == "HCA" and CM.supported(H, D):  # the Mosaic GPU kernel's splits (bm / warps: its own)
                dflt_m = CM.default_config(1, n_rows, b).splits
                for splits in sorted({dflt_m, 1, 2, 3, 4, 6, 8, 16, 32} - {s for s in (16, 32) if b * s > 264}):
                    cfg = CM.MgpuAttnConfig(splits=splits)
                    runs.append(("Mosaic", "-", splits, splits == dflt_m,
                                 lambda *a, cfg=cfg: CM.compressed_attention_mgpu(*a, ratio=128, config=cfg)))
            for bm, nw, splits, is_default, fn in runs:
                args = copies((q, kv, ring, pos0, sink, rows))
                try:
                    k, wall = measure(jax.jit(fn), args, 20)
                except Exception as e:  # noqa: BLE001
                    print(f"| {kind} | {bm} | {nw} | {splits} | {type(e).__name__} |", flush=True)
                    continue
                us = (k or wall) * 1e3
                tag = " (default)" if is_default else ""
                print(f"| {kind} | {bm} | {nw} | {splits}{tag} | {us:.1f} | {us * 1e-6 / floor:.1f} |", flush=True)
                del args


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", default="1,32", help="decode batch sizes")
    ap.add_argument("--decode", default="8192,131072,1048576")
    ap.add_argument("--prefill", default="8192,32768,131072")
    ap.add_argument("--kinds", default="SWA,CSA,HCA", help="layer types to time")
    ap.add_argument("--reference-max", type=int, default=8192, help="longest prefill run through the reference")
    ap.add_argument("--by-kernel", action="store_true", help="also list the kernels of each decode step and prefill, with their times")
    ap.add_argument("--no-mosaic-indexer", action="store_true",
                    help="score CSA prefill with the Triton kernel only (indexer_mgpu.ON_BY_DEFAULT = False)")
    ap.add_argument("--sweep", action="store_true", help="time a few tile choices first")
    ap.add_argument("--sweep-decode", type=int, default=0, metavar="B",
                    help="only time the decode kernel's tile choices at batch B (at the --decode contexts over 64K)")
    ap.add_argument("--sweep-indexer", action="store_true", help="only time the indexer's tile choices")
    ap.add_argument("--sweep-prefill", action="store_true", help="only time the prefill attention's tile choices")
    args = ap.parse_args()
    wanted = args.kinds.split(",")
    if unknown := set(wanted) - set(LAYERS):
        ap.error(f"--kinds: unknown layer types {sorted(unknown)} (SWA, CSA, HCA)")
    kinds = [k for k in LAYERS if k in wanted]
    IM.ON_BY_DEFAULT = IM.ON_BY_DEFAULT and not args.no_mosaic_indexer
    bw, mm = ceilings()
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}; measured ceilings: HBM read {bw:.2f} TB/s, "
          f"bf16 matmul {mm:.0f} TFLOP/s; CUPTI {'on' if extension() else 'off (wall times)'}", flush=True)
    key = jax.random.PRNGKey(0)
    if args.sweep_prefill:
        sweep_prefill(key, mm)
        return
    if args.sweep_indexer:
        sweep_indexer(key, mm, bw)
        return
    if args.sweep_decode:
        sweep_decode(key, bw, args.sweep_decode, [int(c) for c in args.decode.split(",") if int(c) > 65536])
        return
    if args.sweep:
        sweep(key, mm, bw)
    batches = [int(c) for c in args.batch.split(",") if c]
    decode(key, batches[0], args.decode, bw, kinds, reference=True, by_kernel=args.by_kernel)
    prefill(key, args.prefill, args.reference_max, mm, kinds, by_kernel=args.by_kernel)
    for b in batches[1:]:
        decode(key, b, args.decode, bw, kinds, reference=False, by_kernel=args.by_kernel)


def _triton(kind: str, b: int, t: int, argsets, scale: float = 1e3, digits: int = 1) -> str:
    """The Triton kernels' time where the default takes a Mosaic GPU one (else "-")."""
    mosaic = IM.use(t, HI, DI) if kind == "CSA" else CA.use_mgpu(b, t, H, D, kind == "HCA")
    if not mosaic:
        return "-"
    try:
        k, wall = measure(layer_fn(kind, True, t, triton=True), argsets, 10 if t == 1 else 3)
    except Exception as e:  # noqa: BLE001
        return type(e).__name__
    return _fmt(k or wall, scale, digits)


def decode(key, b: int, contexts: str, bw: float, kinds: list[str], reference: bool, by_kernel: bool = False):
    print(f"\n## Decode, batch {b}, one layer (µs per step)\n\n| layer | cached | kernel | wall | floor | "
          "x floor | TB/s | Triton kernel | reference wall | peak GiB |\n|---|---|---|---|---|---|---|---|---|---|",
          flush=True)
    per_layer_1m, launches = {}, []
    for ctx in [int(c) for c in contexts.split(",") if c]:
        for kind in kinds:
            a = inputs(key, b, 1, ctx // 128 if kind == "HCA" else ctx // 4, ctx // 4 if kind == "CSA" else 1)
            pos0 = jnp.full((b,), ctx - 1, jnp.int32)
            argsets = copies((*a, pos0), cap=4)
            try:
                k, wall = measure(fn := layer_fn(kind, True, 1), argsets, 10)
            except Exception as e:  # noqa: BLE001 (report and go on)
                print(f"| {kind} | {ctx} | error: {type(e).__name__}: {str(e)[:200]} |", flush=True)
                continue
            tr = "-"
            if reference:
                try:
                    tr = _fmt(measure(layer_fn(kind, False, 1), argsets[:1], 3)[1])
                except Exception as e:  # noqa: BLE001
                    tr = type(e).__name__
            tri = _triton(kind, b, 1, argsets)
            sec = (k or wall) * 1e-3
            floor = decode_cost(kind, b, ctx) / (bw * 1e12)
            if ctx == 1048576:
                per_layer_1m[kind] = (k, wall)
            if by_kernel:
                parts = median_kernels_ms(fn, argsets, 5)  # the compiled step just timed
                launches.append(f"- {kind} at {ctx}: " + ("no CUPTI, or the calls launched different kernels"
                                if parts is None else ", ".join(f"{n} {ms * 1e3:.1f}" for n, ms in parts)))
            print(f"| {kind} | {ctx} | {_fmt(k)} | {wall * 1e3:.1f} | {floor * 1e6:.2f} | {sec / floor:.1f} | "
                  f"{decode_cost(kind, b, ctx) / sec / 1e12:.2f} | {tri} | {tr} | {peak_gib():.1f} |", flush=True)
            del a, argsets
    if launches:
        print(f"\nKernels of one decode step, batch {b} (CUPTI, µs, medians of 5 calls, in launch order):\n",
              *launches, sep="\n", flush=True)
    if len(per_layer_1m) == 3:
        kern = sum((per_layer_1m[k][0] or 0.0) * n for k, n in LAYERS.items())
        wall = sum(per_layer_1m[k][1] * n for k, n in LAYERS.items())
        print(f"\nWhole model (2 SWA + 21 CSA + 20 HCA layers) attention + indexer per decode step at 1M, batch {b}: "
              f"kernels {kern:.3f} ms, wall {wall:.3f} ms (sums of the per-layer times; per token "
              f"{kern / b:.3f} / {wall / b:.3f} ms)", flush=True)


def by_name(parts: list[tuple[str, float]] | None, top: int = 8) -> str:
    """A call's kernel times summed by kernel name, the largest first (``top`` of them, then the rest)."""
    if parts is None:
        return "no CUPTI, or the calls launched different kernels"
    tot: dict[str, list[float]] = {}
    for n, ms in parts:
        tot.setdefault(n, [0.0, 0])
        tot[n][0] += ms
        tot[n][1] += 1
    ranked = sorted(tot.items(), key=lambda kv: -kv[1][0])
    out = [f"{n[:48]} {ms:.2f} ({c}x)" for n, (ms, c) in ranked[:top]]
    if len(ranked) > top:
        out.append(f"others {sum(ms for _, (ms, _) in ranked[top:]):.2f}")
    return ", ".join(out)


def prefill(key, lengths: str, reference_max: int, mm: float, kinds: list[str], by_kernel: bool = False):
    print("\n## Prefill from position 0, batch 1, one layer\n\n| layer | tokens | kernel ms | wall ms | TFLOP/s | "
          "% of matmul | Triton kernel ms | reference ms | peak GiB |\n|---|---|---|---|---|---|---|---|---|",
          flush=True)
    launches = []
    for t in [int(c) for c in lengths.split(",") if c]:
        for kind in sorted(kinds, key=("SWA", "HCA", "CSA").index):
            a = inputs(key, 1, t, t // 128 if kind == "HCA" else t // 4, t // 4 if kind == "CSA" else 1)
            pos0 = jnp.zeros((1,), jnp.int32)
            try:
                k, wall = measure(fn := layer_fn(kind, True, t), [(*a, pos0)], 3 if t > 32768 else 5)
            except Exception as e:  # noqa: BLE001
                print(f"| {kind} | {t} | error: {type(e).__name__}: {str(e)[:200]} |", flush=True)
                continue
            if by_kernel:
                launches.append(f"- {kind} at {t}: {by_name(median_kernels_ms(fn, [(*a, pos0)], 3))}")
            tr = "-"
            if t <= reference_max:
                try:
                    tr = _fmt(measure(layer_fn(kind, False, t), [(*a, pos0)], 3)[1], 1.0)
                except Exception as e:  # noqa: BLE001
                    tr = type(e).__name__
            ms = k or wall
            fl = prefill_flops(kind, t)
            peak = peak_gib()
            tri = _triton(kind, 1, t, [(*a, pos0)], 1.0, 2)
            print(f"| {kind} | {t} | {_fmt(k, 1.0, 2)} | {wall:.2f} | {fl / ms / 1e9:.0f} | "
                  f"{100 * fl / ms / 1e9 / mm:.0f} % | {tri} | {tr} | {peak:.1f} |", flush=True)
            del a
    if launches:
        print("\nKernels of one prefill (CUPTI, ms, medians of 3 calls, summed by name):\n", *launches, sep="\n",
              flush=True)


if __name__ == "__main__":
    main()
