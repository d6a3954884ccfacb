"""Benchmark of the NVFP4 / FP8 matmul kernels on the model's real shapes (GPU only).

    PYTHONPATH=. python scripts/bench_kernels.py [--tune] [--sections nv,fp8,moe] [--ms 1,4] [--out DIR]

Prints one table of median kernel times (CUPTI, summed over every kernel of one call, glue included) for:
dense NVFP4 (ours, XLA dequantise-then-dot, bf16 ``jnp.dot`` on dequantised weights), FP8 block-scaled (ours,
the XLA formulation, XLA dequantise-then-dot, bf16) and the grouped MoE layer (ours, ``jax.lax.ragged_dot``, a
dense batched einsum of equal FLOPs), over M in {1, 4, 16, 64, 256, 1024, 4096, 16384}, with effective TB/s
(bytes of the stored weights), TFLOP/s and ratios to the copy bandwidth and bf16 matmul rate measured in the
same run. Weights rotate over several copies so that repeated calls do not read them from L2 (60 MB).
``--tune`` first times candidate configurations at the decisive sizes and prints the best ones, with the
per-kernel CUPTI breakdown of the winner (decode rows print theirs too).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
from cupti_timing import kernels_of_call, median_kernel_ms, median_wall_ms

from dsv4_jax import quant
from pallas_kernels import fp8_matmul as F
from pallas_kernels import fp8_matmul_mgpu as FM
from pallas_kernels import nvfp4_layout as L
from pallas_kernels import nvfp4_matmul as NM
from pallas_kernels import nvfp4_mgpu as NG
from pallas_kernels import nvfp4_moe as MO

MS = [1, 4, 16, 64, 256, 1024, 4096, 16384]
NV_SHAPES = {"expert w13 4096->2048": (2048, 4096), "expert w2 2048->4096": (4096, 2048),
             "8192x8192": (8192, 8192)}
FP8_SHAPES = {"attn wq_a 4096->1024": (1024, 4096), "attn wq_b 1024->32768": (32768, 1024),
              "attn wo_b 8192->4096": (4096, 8192), "8192x8192": (8192, 8192)}
E, D, I, TOPK = 256, 4096, 2048, 6
ROTATE_BYTES = 256 << 20
T0 = time.time()


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------------------------------------------------
# Timing


def median_ms(fn, argsets, iters: int) -> float:
    """Median over ``iters`` calls (rotating over ``argsets``) of the summed kernel time of one call, ms (CUPTI;
    wall-clock time of blocking calls where CUPTI is unavailable)."""
    ms = median_kernel_ms(fn, argsets, iters)
    return median_wall_ms(fn, argsets, iters) if ms is None else ms


def copies(tree, nbytes: int, cap: int = 48):
    """Enough distinct copies of ``tree`` to exceed the L2 several times over."""
    r = int(min(cap, max(2, -(-ROTATE_BYTES // max(nbytes, 1)))))
    return [tree] + [jax.tree.map(lambda a: jnp.array(a, copy=True), tree) for _ in range(r - 1)]


# ---------------------------------------------------------------------------------------------------------
# Random weights in the stored formats (uniform codes, e4m3 block scales in [1/8, 4]).


def rand_nvfp4(key, *shape) -> quant.Nvfp4:
    k1, k2 = jax.random.split(key)
    *lead, n, k = shape
    q = jax.random.randint(k1, (*lead, n, k // 2), 0, 256, jnp.int32).astype(jnp.uint8)
    s = jnp.exp2(jax.random.randint(k2, (*lead, n, k // 16), -3, 3).astype(jnp.float32))
    s = (s * 1.25).astype(jnp.float8_e4m3fn)
    g = jnp.full(lead, 1e-3, jnp.float32)
    return quant.Nvfp4(q, s, g, jnp.ones(lead, jnp.float32))


def rand_fp8(key, n, k) -> quant.Fp8Block:
    w = (jax.random.normal(key, (n, k), jnp.float32) * 64).astype(jnp.float8_e4m3fn)
    s = jnp.full((-(-n // 128), -(-k // 128)), 120, jnp.uint8)
    return quant.Fp8Block(w, jax.lax.bitcast_convert_type(s, jnp.float8_e8m0fnu))


def nv_bytes(n, k):
    return n * k // 2 + n * k // 16


# ---------------------------------------------------------------------------------------------------------
# Ceilings measured in this run


def ceilings():
    x = jax.random.normal(jax.random.key(0), (1 << 29,), jnp.float32)  # 2 GiB
    t = median_ms(jax.jit(lambda a: a * 2.0), [(x,)], 10)
    copy_tbs = 2 * x.nbytes / t / 1e9
    a = jax.random.normal(jax.random.key(1), (8192, 8192), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (8192, 8192), jnp.bfloat16)
    t = median_ms(jax.jit(lambda p, q: jnp.dot(p, q, preferred_element_type=jnp.float32).astype(jnp.bfloat16)),
                  [(a, b)], 10)
    return copy_tbs, 2 * 8192**3 / t / 1e9


# ---------------------------------------------------------------------------------------------------------
# Methods


def nv_ours(cfg=None):
    return jax.jit(lambda x, p: NM.nvfp4_matmul(x, p, jnp.bfloat16, config=cfg))


nv_xla = jax.jit(lambda x, w: quant.linear(x, w, jnp.bfloat16, jnp.bfloat16))
bf16_dot = jax.jit(lambda x, w: jnp.dot(x, w.T, preferred_element_type=jnp.float32).astype(jnp.bfloat16))


def fp8_ours(cfg=None):
    return jax.jit(lambda x, w: F.fp8_matmul(x, w, jnp.bfloat16, config=cfg))


fp8_xla_form = jax.jit(lambda x, w: F.fp8_matmul_xla(x, w, jnp.bfloat16))
fp8_xla_dequant = jax.jit(lambda x, w: quant.linear(x, w, jnp.bfloat16, jnp.bfloat16))


def moe_ours(cfg=None):
    return jax.jit(lambda x, ids, wt, p1, p2, p3: MO.nvfp4_moe(x, ids, wt, p1, p2, p3, 10.0, config=cfg))


@jax.jit
def moe_ragged(x, ids, wt, w1t, w2t, w3t):
    """``lax.ragged_dot`` on bf16 experts (pre-dequantised, ``w1t [E, D, I]``): sort, 3 ragged dots, combine."""
    t, k = ids.shape
    flat = ids.reshape(-1)
    order = jnp.argsort(flat)
    sizes = jnp.zeros((E,), jnp.int32).at[flat].add(1)
    xs = x[order // k]
    a = jax.lax.ragged_dot(xs, w1t, sizes, preferred_element_type=jnp.float32)
    u = jax.lax.ragged_dot(xs, w3t, sizes, preferred_element_type=jnp.float32)
    h = (jax.nn.silu(jnp.minimum(a, 10.0)) * jnp.clip(u, -10, 10) * wt.reshape(-1)[order][:, None])
    y = jax.lax.ragged_dot(h.astype(jnp.bfloat16), w2t, sizes, preferred_element_type=jnp.float32)
    return jnp.zeros((t * k, D), jnp.float32).at[order].set(y).reshape(t, k, D).sum(1)


@jax.jit
def moe_einsum(xg, w1t, w2t, w3t):
    """Dense batched einsum of the same FLOPs: ``xg [E, C, D]`` tokens per expert, uniform capacity."""
    a = jnp.einsum("ecd,edi->eci", xg, w1t, preferred_element_type=jnp.float32)
    u = jnp.einsum("ecd,edi->eci", xg, w3t, preferred_element_type=jnp.float32)
    h = (jax.nn.silu(jnp.minimum(a, 10.0)) * jnp.clip(u, -10, 10)).astype(jnp.bfloat16)
    return jnp.einsum("eci,eid->ecd", h, w2t, preferred_element_type=jnp.float32)


def routing(key, t):
    k1, k2 = jax.random.split(key)
    _, ids = jax.lax.top_k(jax.random.uniform(k1, (t, E)), TOPK)
    return ids.astype(jnp.int32), jax.random.uniform(k2, (t, TOPK), jnp.float32)


# ---------------------------------------------------------------------------------------------------------
# Tuning: one try / time / log / keep-best loop for every kernel family.


def kernel_breakdown(fn, argsets) -> list[tuple[str, float]]:
    """(kernel name, us) of every kernel one call launches (CUPTI), after a warm-up; [] without CUPTI."""
    return [(name, ms * 1e3) for name, ms in kernels_of_call(fn, *argsets[-1]) or []]


def log_breakdown(label, fn, argsets):
    parts = safe(kernel_breakdown, fn, argsets) or []
    total = sum(us for _, us in parts)
    log(f"  kernels of {label}: {total:.1f} us = " + " + ".join(f"{n[:40]} {us:.1f}" for n, us in parts))


def best_of(label: str, make_fn, cands, argsets, iters: int = 10, frac: float = 0.6):
    """Times ``make_fn(cfg)`` for each candidate on ``argsets`` (median CUPTI time), logs each and returns
    ``(ms, cfg)`` of the fastest, or None; stops early past ``frac`` of the time budget."""
    best = None
    for cfg in cands:
        if time.time() - T0 > BUDGET * frac:
            log(f"  tune {label}: budget reached")
            break
        try:
            t = median_ms(make_fn(cfg), argsets, iters)
        except Exception as e:  # noqa: BLE001
            log(f"  tune {label} {cfg}: FAILED {type(e).__name__}: {str(e)[:300]}")
            continue
        log(f"  tune {label} {cfg}: {t * 1e3:.1f} us")
        if best is None or t < best[0]:
            best = (t, cfg)
    if best:
        log(f"BEST {label}: {best[0] * 1e3:.1f} us {best[1]}")
        log_breakdown(label, make_fn(best[1]), argsets)
    return best


def nv_candidates(m, np_, kp):
    decs = ("asm", "int") if FLAGS.int_decode else ("asm",)
    out = []
    if m <= 16 and not FLAGS.no_triton_tune:
        for dec in decs:
            for bn, bk, nw, ns, splits in ((64, 256, 4, 4, (4, 8, 16)), (128, 256, 4, 4, (4, 8, 16)),
                                           (32, 256, 4, 4, (8, 16)), (64, 512, 4, 3, (4, 8)), (128, 256, 8, 3, (8,)),
                                           (64, 256, 4, 3, (8,)), (64, 256, 4, 6, (8,))):
                for split in splits:
                    if np_ % bn or kp % (bk * split) or kp // (bk * split) < 2:
                        continue
                    out.append(NM.MatmulConfig(bm=16, bn=bn, bk=bk, split_k=split, swap_ab=True, num_warps=nw,
                                               num_stages=ns, decode=dec))
        if m <= NM.FMA_MAX_M:
            for bn, bk, nw, ns, split in ((64, 256, 8, 2, 8), (128, 256, 8, 3, 4), (32, 256, 4, 3, 4),
                                          (64, 256, 4, 2, 8)):
                if np_ % bn == 0 and kp % (bk * split) == 0 and kp // (bk * split) >= 2:
                    out.append(NM.MatmulConfig(method="fma", bn=bn, bk=bk, split_k=split, num_warps=nw,
                                               num_stages=ns))
    if m <= 64 and NG.available() and NG.supported(kp, np_):
        for tk, split, ns in ((256, 8, 3), (256, 8, 4), (256, 16, 3), (256, 16, 4), (256, 4, 3), (128, 8, 4),
                              (128, 16, 4), (256, 0, 2)):
            if (kp // tk) % max(split, 1) == 0:
                out.append(NM.MatmulConfig(method="mgpu", bk=tk, split_k=split, num_stages=ns))
    if 16 < m <= 64 and not FLAGS.no_triton_tune:
        for swap in (True, False):
            for bn, bk, split in ((64, 256, 1), (64, 256, 2), (128, 128, 1)):
                if kp % (bk * split) == 0:
                    out.append(NM.MatmulConfig(bm=64, bn=bn, bk=bk, split_k=split, swap_ab=swap, num_stages=4))
    if m > 64:
        for bm, bn, bk, nw, ns in ((64, 128, 128, 4, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3)):
            out.append(NM.MatmulConfig(bm=bm, bn=bn, bk=bk, swap_ab=False, num_warps=nw, num_stages=ns))
        out.append(NM.MatmulConfig(method="dequant_dot"))
    return out


def moe_candidates(t_tok):
    mg = []
    if NG.available():
        sched = "mgpu_pairs" if t_tok * TOPK <= MO.PAIRWISE_MAX else "mgpu_sorted"
        mg = [MO.MoeConfig(schedule=sched, bm=bm, bk=tk, split13=s1, split2=s2, num_stages=ns)
              for bm, tk, s1, s2, ns in ((8, 256, 0, 0, 4), (8, 256, 0, 0, 3), (8, 256, 1, 1, 4), (8, 256, 2, 1, 3),
                                         (8, 256, 4, 2, 3), (8, 128, 0, 0, 4), (16, 256, 0, 0, 4))
              if bm == 8 or sched == "mgpu_sorted"]
        if FLAGS.no_triton_tune:
            return mg
    if t_tok * TOPK <= MO.PAIRWISE_MAX:
        c = [MO.MoeConfig(bn13=a, bn2=b, split13=s1, split2=s2, num_stages=ns)
             for a, b, s1, s2, ns in ((64, 64, 4, 2, 4), (64, 64, 2, 2, 4), (64, 64, 8, 2, 4), (64, 64, 4, 1, 4),
                                      (64, 64, 4, 4, 4), (128, 128, 8, 4, 3), (32, 32, 2, 1, 4), (64, 64, 4, 2, 3),
                                      (128, 64, 8, 2, 3))]
        # CUDA-core rows (fma): no 16-row tensor-core tile for a single row per pair.
        c += [MO.MoeConfig(bn13=a, bn2=b, split13=s1, split2=s2, num_warps=nw, num_stages=ns, fma=True)
              for a, b, s1, s2, nw, ns in ((64, 64, 4, 2, 8, 2), (64, 64, 4, 2, 4, 3), (64, 64, 2, 2, 8, 2),
                                           (64, 64, 8, 4, 8, 2), (128, 128, 4, 2, 8, 2), (32, 32, 4, 2, 4, 3),
                                           (64, 64, 4, 4, 8, 3))]
        return mg + (c if t_tok == 1 else c[:5] + c[-7:-3])
    if t_tok <= 64:
        # The decode schedule reads an expert shared by several tokens once per pair; the sorted one once.
        return mg + [MO.default_config(t_tok * TOPK, mgpu=False), MO.MoeConfig(split13=4, split2=2),
                     MO.MoeConfig(split13=2, split2=1)]
    return mg + [MO.MoeConfig(bm=bm, bn13=a, bn2=b, bk=c, schedule="sorted", swap_ab=False, num_warps=nw, num_stages=3)
            for bm, a, b, c, nw in ((64, 64, 128, 128, 4), (128, 64, 128, 64, 8))]


def fp8_candidates():
    return [F.Fp8Config(bm=16, bn=bn, split_k=split, num_warps=nw, num_stages=ns, decode=dec)
            for bn, split, nw, ns in ((64, 4, 4, 4), (64, 8, 4, 4), (128, 4, 4, 4), (128, 8, 8, 4), (32, 8, 4, 4),
                                      (64, 4, 4, 6), (64, 2, 4, 4))
            for dec in ("convert", "asm")]


def tune(results: dict):
    key = jax.random.key(7)
    if "moe" in FLAGS.sections:
        ws = [rand_nvfp4(jax.random.key(i), E, n, k) for i, (n, k) in enumerate(((I, D), (D, I), (I, D)))]
        ps = [L.pack_nvfp4(w) for w in ws]
        for t_tok in FLAGS.moe_tune_tokens:
            args = [(jax.random.normal(jax.random.key(j), (t_tok, D), jnp.bfloat16),
                     *routing(jax.random.key(100 + j), t_tok), *ps) for j in range(4)]
            best = best_of(f"moe T={t_tok}", moe_ours, moe_candidates(t_tok), args, iters=8, frac=0.3)
            if best:
                results[f"moe|{t_tok}"] = (best[0], dataclasses.asdict(best[1]))
        del ws, ps
    for name, (n, k) in NV_SHAPES.items():
        if "nv" not in FLAGS.sections or name != "8192x8192":
            continue
        p = L.pack_nvfp4(rand_nvfp4(key, n, k))
        ps = copies(p, nv_bytes(n, k))
        for m in FLAGS.nv_tune_ms:
            x = jax.random.normal(key, (m, k), jnp.bfloat16)
            best = best_of(f"nv {name} m={m}", nv_ours, nv_candidates(m, p.np_, p.kp), [(x, q) for q in ps],
                           frac=0.5)
            if best:
                results[f"nv|{name}|{m}"] = (best[0], dataclasses.asdict(best[1]))
    for name, (n, k) in FP8_SHAPES.items():
        if "fp8" not in FLAGS.sections or name not in ("8192x8192", "attn wq_a 4096->1024"):
            continue
        wsl = copies(rand_fp8(key, n, k), n * k)
        x = jax.random.normal(key, (1, k), jnp.bfloat16)
        cands = [c for c in fp8_candidates() if (-(-k // 128)) % c.split_k == 0]
        best = best_of(f"fp8 {name} m=1", fp8_ours, cands, [(x, q) for q in wsl], frac=0.65)
        if best:
            results[f"fp8|{name}|1"] = (best[0], dataclasses.asdict(best[1]))


# ---------------------------------------------------------------------------------------------------------
# The table


TUNED: dict = {}


def tuned(kind: str, name: str, m: int):
    """The tuned configuration for this size bucket (``--tune``), else None (the library default)."""
    if kind == "nv":
        got = TUNED.get(f"nv|{name}|{1 if m <= 16 else m}")
        if got is None:
            return None
        cfg = NM.MatmulConfig(**got[1])
        if cfg.method == "fma" and m > NM.FMA_MAX_M:
            return None
        return dataclasses.replace(cfg, bm=16 if m <= 16 else cfg.bm)
    if kind == "moe":
        got = TUNED.get(f"moe|{m}")
        return None if got is None else MO.MoeConfig(**got[1])
    got = TUNED.get(f"fp8|{name}|1") if m <= 16 else None
    return None if got is None else F.Fp8Config(**got[1])


def row(rows, kind, shape, m, method, ms, nbytes, flops, copy_tbs, bf16_tf):
    tbs = nbytes / ms / 1e9
    tf = flops / ms / 1e9
    rows.append({"kind": kind, "shape": shape, "m": m, "method": method, "us": ms * 1e3, "tbs": tbs,
                 "tflops": tf, "pct_copy": 100 * tbs / copy_tbs, "pct_bf16": 100 * tf / bf16_tf})
    log(f"{kind:6s} {shape:24s} M={m:<6d} {method:22s} {ms * 1e3:10.1f} us {tbs:6.2f} TB/s {tf:7.1f} TFLOP/s "
        f"{100 * tbs / copy_tbs:6.1f}% copy {100 * tf / bf16_tf:6.1f}% bf16")


def safe(f, *args):
    try:
        return f(*args)
    except Exception as e:  # noqa: BLE001
        log(f"   failed: {type(e).__name__}: {str(e)[:300]}")
        return None


def bench_moe(copy_tbs, bf16_tf, rows):
    key = jax.random.key(1)
    ws = [rand_nvfp4(jax.random.key(i), E, n, k) for i, (n, k) in enumerate(((I, D), (D, I), (I, D)))]
    ps = [L.pack_nvfp4(w) for w in ws]
    wts = None if FLAGS.no_baselines else [quant.dequantize(w, jnp.bfloat16).transpose(0, 2, 1) for w in ws]
    for t_tok in FLAGS.moe_tokens:
        if time.time() - T0 > BUDGET:
            return
        pairs = t_tok * TOPK
        experts = min(E, pairs)
        nb = experts * 3 * nv_bytes(I, D)
        fl = 2 * pairs * 3 * D * I
        args = [(jax.random.normal(jax.random.key(j), (t_tok, D), jnp.bfloat16),
                 *routing(jax.random.key(100 + j), t_tok)) for j in range(4)]
        it = 10 if t_tok <= 1024 else 3
        cfg = tuned("moe", "", t_tok) or MO.default_config(pairs)
        ours = moe_ours(cfg)
        t = safe(median_ms, ours, [(*a, *ps) for a in args], it)
        if t:
            row(rows, "moe", "256 experts top-6", t_tok, f"ours ({cfg.schedule})", t, nb, fl, copy_tbs, bf16_tf)
        if cfg.schedule.startswith("mgpu"):
            t = safe(median_ms, moe_ours(MO.default_config(pairs, mgpu=False)), [(*a, *ps) for a in args], it)
            if t:
                row(rows, "moe", "256 experts top-6", t_tok, "pallas-triton", t, nb, fl, copy_tbs, bf16_tf)
        if t_tok <= 4:
            log_breakdown(f"moe T={t_tok}", ours, [(*a, *ps) for a in args])
        if wts is None:
            continue
        if 64 <= t_tok <= 8192:
            t = safe(median_ms, moe_ragged, [(*args[0], *wts)], 2 if t_tok >= 4096 else 3)
            if t:
                row(rows, "moe", "256 experts top-6", t_tok, "lax.ragged_dot (bf16)", t, 2 * E * 3 * D * I, fl,
                    copy_tbs, bf16_tf)
        if pairs >= E:
            xg = jax.random.normal(key, (E, pairs // E, D), jnp.bfloat16)
            t = safe(median_ms, moe_einsum, [(xg, *wts)], it)
            if t:
                row(rows, "moe", "256 experts top-6", t_tok, "batched einsum (bf16)", t, 2 * E * 3 * D * I, fl,
                    copy_tbs, bf16_tf)


def bench(copy_tbs, bf16_tf, rows):
    key = jax.random.key(1)
    if "moe" in FLAGS.sections:
        bench_moe(copy_tbs, bf16_tf, rows)
    for name, (n, k) in NV_SHAPES.items():
        if "nv" not in FLAGS.sections:
            break
        w = rand_nvfp4(key, n, k)
        p = L.pack_nvfp4(w)
        wb = quant.dequantize(w, jnp.bfloat16)
        ws, ps, wbs = copies(w, nv_bytes(n, k)), copies(p, nv_bytes(n, k)), copies(wb, 2 * n * k, 8)
        for m in FLAGS.ms:
            if time.time() - T0 > BUDGET:
                return
            x = jax.random.normal(key, (m, k), jnp.bfloat16)
            it = 15 if m <= 1024 else 5
            fl = 2 * m * n * k
            cfg = tuned("nv", name, m) or NM.default_config(m, p.np_, p.kp)
            ours = nv_ours(cfg)
            meths = [(f"ours ({cfg.method})", ours, [(x, q) for q in ps], nv_bytes(n, k)),
                     ("xla dequant+dot", nv_xla, [(x, q) for q in ws], nv_bytes(n, k)),
                     ("bf16 jnp.dot", bf16_dot, [(x, q) for q in wbs], 2 * n * k)]
            if cfg.method == "mgpu":
                meths.insert(1, ("pallas-triton", nv_ours(NM.default_config(m, p.np_, p.kp, mgpu=False)),
                                 [(x, q) for q in ps], nv_bytes(n, k)))
            for meth, fn, sets, nb in meths[:1 + (cfg.method == "mgpu")] if FLAGS.no_baselines else meths:
                t = safe(median_ms, fn, sets, it)
                if t:
                    row(rows, "nvfp4", name, m, meth, t, nb, fl, copy_tbs, bf16_tf)
            if m == 1:
                log_breakdown(f"nvfp4 {name} M=1", ours, [(x, q) for q in ps])
    for name, (n, k) in FP8_SHAPES.items():
        if "fp8" not in FLAGS.sections:
            break
        w = rand_fp8(key, n, k)
        wb = quant.dequantize(w, jnp.bfloat16)
        ws, wbs = copies(w, n * k), copies(wb, 2 * n * k, 8)
        for m in FLAGS.ms:
            if time.time() - T0 > BUDGET:
                return
            x = jax.random.normal(key, (m, k), jnp.bfloat16)
            it = 15 if m <= 1024 else 5
            fl = 2 * m * n * k
            cfg = tuned("fp8", name, m) or F.default_config(m, n, k)
            meths = [(f"ours ({cfg.method})", fp8_ours(cfg), ws, n * k)]
            if m <= 64:
                meths.append(("xla scale-folded", fp8_xla_form, ws, n * k))
                if cfg.method != "pallas":
                    meths.append(("pallas-triton", fp8_ours(F.default_config(m, n, k, mgpu=False)), ws, n * k))
                if cfg.method != "mgpu" and FM.available() and FM.supported(m, n, k):
                    meths.append(("mosaic-gpu", fp8_ours(F.Fp8Config(method="mgpu", split_k=FM.default_split(n, k))),
                                  ws, n * k))
            if m == 1:
                log_breakdown(f"fp8 {name} M=1", fp8_ours(cfg), [(x, q) for q in ws])
            if not FLAGS.no_baselines:
                meths += [("xla dequant+dot", fp8_xla_dequant, ws, n * k), ("bf16 jnp.dot", bf16_dot, wbs, 2 * n * k)]
            for meth, fn, wl, nb in meths:
                t = safe(median_ms, fn, [(x, q) for q in wl], it)
                if t:
                    row(rows, "fp8", name, m, meth, t, nb, fl, copy_tbs, bf16_tf)
def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main():
    global BUDGET
    ap = argparse.ArgumentParser()
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--budget", type=float, default=480.0)
    ap.add_argument("--sections", default="nv,fp8,moe", help="comma list of nv, fp8, moe")
    ap.add_argument("--ms", type=_ints, default=MS, help="M values of the dense tables")
    ap.add_argument("--moe-tokens", type=_ints, default=sorted({*MS, 8192}), help="token counts of the MoE table")
    ap.add_argument("--nv-tune-ms", type=_ints, default=[1], help="M values tuned at 8192x8192")
    ap.add_argument("--moe-tune-tokens", type=_ints, default=[1, 4, 16])
    ap.add_argument("--no-baselines", action="store_true", help="only our kernels (and XLA's FP8 formulation)")
    ap.add_argument("--int-decode", action="store_true", help="also tune the portable integer decoder")
    ap.add_argument("--no-triton-tune", action="store_true", help="tune only the Mosaic GPU kernels (Hopper)")
    args = ap.parse_args()
    args.sections = args.sections.split(",")
    FLAGS.__dict__.update(vars(args))
    BUDGET = args.budget
    dev = jax.devices()[0]
    log(f"{dev.device_kind}, jax {jax.__version__}, {datetime.date.today()}, python {sys.version.split()[0]}")
    copy_tbs, bf16_tf = ceilings()
    log(f"ceilings: copy {copy_tbs:.2f} TB/s (read+write), bf16 8192^3 jnp.dot {bf16_tf:.0f} TFLOP/s")
    results = {"device": dev.device_kind, "jax": jax.__version__, "copy_tbs": copy_tbs, "bf16_tflops": bf16_tf}
    if args.tune:
        tune(results)
        TUNED.update({k: v for k, v in results.items() if "|" in k})
        with open(os.path.join(args.out, "tune.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
    rows = []
    if not args.skip_bench:
        bench(copy_tbs, bf16_tf, rows)
        with open(os.path.join(args.out, "bench.json"), "w") as f:
            json.dump({**results, "rows": rows}, f, indent=1)
        log("\n| kind | shape | M | method | us | TB/s | TFLOP/s | % copy | % bf16 |")
        log("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            log(f"| {r['kind']} | {r['shape']} | {r['m']} | {r['method']} | {r['us']:.1f} | {r['tbs']:.2f} | "
                f"{r['tflops']:.1f} | {r['pct_copy']:.0f} | {r['pct_bf16']:.0f} |")


BUDGET = 480.0
FLAGS = argparse.Namespace(sections=["nv", "fp8", "moe"], no_baselines=False, int_decode=False, no_triton_tune=False, ms=MS,
                           moe_tokens=MS, nv_tune_ms=[1], moe_tune_tokens=[1])

if __name__ == "__main__":
    main()
