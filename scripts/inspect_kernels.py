"""What Triton makes of our Pallas kernels, without a GPU: each kernel the model launches, at Flash dimensions
and its default tiles, lowered for an sm_90 GPU on the CPU (Triton IR written to ``--out``), and, given a Python
that has the ``triton`` package (``--triton-python``; the GPU machine's jax bundles its own Triton, so any
``pip install triton`` of a nearby version in a separate environment will do), compiled for sm_90 with the
registers, spilled bytes and shared memory ptxas reports, and the TTGIR, PTX and SASS written beside the IR.
A tool for kernel work between GPU sessions: register pressure and layout conversions can be read here for
free; speed still needs the GPU (``bench_kernels.py``, ``bench_attention.py``).

    PYTHONPATH=. python scripts/inspect_kernels.py [--out /tmp/kernels] [--only attention,indexer]
        [--triton-python /path/to/venv/bin/python]

Uses JAX internals (``pallas_kernels.lowering``); a JAX version without them gets a clear error.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from dsv4_jax import quant
from pallas_kernels import compressed_attention as CA
from pallas_kernels import fp8_matmul as F8
from pallas_kernels import indexer_topk as IX
from pallas_kernels import lowering
from pallas_kernels import nvfp4_layout as L
from pallas_kernels import nvfp4_matmul as NM
from pallas_kernels import nvfp4_moe as MO

H, D, W, HI, DI = 64, 512, 128, 64, 128

_COMPILE = r"""
import json, os, subprocess, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import compile as tcompile
path, nw, ns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
k = tcompile(path, target=GPUTarget("cuda", 90, 32), options={"num_warps": nw, "num_stages": ns})
base = path[:-len(".ttir")]
for key in ("ttgir", "ptx"):
    open(f"{base}.{key}", "w").write(k.asm[key])
open(f"{base}.cubin", "wb").write(k.asm["cubin"])
bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
sass = subprocess.run([os.path.join(bindir, "nvdisasm"), "-c", f"{base}.cubin"], capture_output=True, text=True)
open(f"{base}.sass", "w").write(sass.stdout)
r = subprocess.run([os.path.join(bindir, "ptxas"), "-v", "--gpu-name=sm_90a", f"{base}.ptx", "-o", os.devnull],
                   capture_output=True, text=True)
info = [line for line in r.stderr.splitlines() if "Used" in line]
print(json.dumps({"ptxas": info[-1].split(":", 1)[1].strip() if info else r.stderr.strip()[-200:],
                  "shared": k.metadata.shared, "triton": triton.__version__}))
"""


def _lower(fn, *args) -> list[lowering.TritonLaunch]:
    launches: list[lowering.TritonLaunch] = []
    try:
        with lowering.sm90(launches):
            lowering.export_for_cuda(fn, *args)
    except lowering.LoweringUnavailable as e:
        raise SystemExit(str(e)) from None
    return launches


def _abstract(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


def _packed(lead: tuple, n: int, k: int):
    w = quant.Nvfp4(_abstract((*lead, n, k // 2), jnp.uint8), _abstract((*lead, n, k // 16), jnp.float8_e4m3fn),
                    _abstract(lead, jnp.float32), _abstract(lead, jnp.float32))
    return jax.eval_shape(L.pack_nvfp4, w)


def cases():
    """(group, name, config, fn, abstract args) of the kernels the model launches, at Flash dimensions."""
    bf = jnp.bfloat16
    w = _packed((), 8192, 8192)
    for m in (1, 16):
        cfg = NM.default_config(m, 8192, 8192)
        yield "nvfp4", f"dense_8192x8192_m{m}", cfg, lambda x, w, cfg=cfg: NM.nvfp4_matmul(x, w, config=cfg), \
            (_abstract((m, 8192), bf), w)
    w8 = quant.Fp8Block(_abstract((8192, 8192), jnp.float8_e4m3fn), _abstract((64, 64), jnp.float8_e8m0fnu))
    cfg = F8.default_config(1, 8192, 8192)
    yield "fp8", "fp8_8192x8192_m1", cfg, lambda x, w, cfg=cfg: F8.fp8_matmul(x, w, config=cfg), \
        (_abstract((1, 8192), bf), w8)
    w13, w2 = _packed((256,), 2048, 4096), _packed((256,), 4096, 2048)
    cfg = MO.default_config(6)
    yield "moe", "moe_batch1", cfg, lambda x, i, r, a, b, c, cfg=cfg: MO.nvfp4_moe(x, i, r, a, b, c, 10.0, config=cfg), \
        (_abstract((1, 4096), bf), _abstract((1, 6), jnp.int32), _abstract((1, 6), jnp.float32), w13, w2, w13)
    # (name, tokens, compression ratio (0: window only), compressed rows, selected rows)
    for name, t, ratio, r, k in (("decode_hca_1m_b1", 1, 128, 1 << 13, 0), ("decode_csa_1m_b1", 1, 4, 1 << 18, 512),
                                 ("prefill_swa_4096", 4096, 0, 0, 0), ("prefill_hca_4096", 4096, 128, 32, 0),
                                 ("prefill_csa_4096", 4096, 4, 1024, 512)):
        cfg = CA.default_config(t, H, r, 1, k)
        yield "attention", name, cfg, \
            lambda q, kv, ring, p, s, rows, t=t, ratio=ratio, k=k, cfg=cfg: CA.compressed_attention(
                q, kv, ring, p, s, rows if ratio else None, ratio=max(ratio, 1), config=cfg,
                idx=jnp.zeros((1, t, k), jnp.int32) if k else None), \
            (_abstract((1, t, H, D), bf), _abstract((1, t, D), bf), _abstract((1, W, D), bf),
             _abstract((1,), jnp.int32), _abstract((H,), jnp.float32), _abstract((1, max(r, 1), D), bf))
    for t, r in ((1, 1 << 18), (2048, 1 << 15)):
        cfg = IX.default_config(t, r)
        yield "indexer", f"indexer_t{t}_r{r}", cfg, \
            lambda q, w, keys, p, cfg=cfg: IX.index_select(q, w, keys, p, ratio=4, top_k=512, config=cfg), \
            (_abstract((1, t, HI, DI), bf), _abstract((1, t, HI), jnp.float32), _abstract((1, r, DI), bf),
             _abstract((1,), jnp.int32))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/dsv4_kernels", help="folder for the IR files")
    ap.add_argument("--only", default="", help="comma-separated groups: nvfp4, fp8, moe, attention, indexer")
    ap.add_argument("--triton-python", default="", help="a Python with the triton package, to compile for sm_90")
    args = ap.parse_args()
    only = {g for g in args.only.split(",") if g}
    os.makedirs(args.out, exist_ok=True)
    print("| kernel | launch | tiles | warps / stages | registers, spills (ptxas) | shared bytes |\n"
          "|---|---|---|---|---|---|", flush=True)
    for group, name, cfg, fn, fargs in cases():
        if only and group not in only:
            continue
        for i, launch in enumerate(_lower(fn, *fargs)):
            func = launch.module.split("tt.func", 1)[1].split("@", 1)[1].split("(", 1)[0]
            path = os.path.join(args.out, f"{name}_{i}_{func}.ttir")
            with open(path, "w") as f:
                f.write(launch.module)
            nw, ns = launch.num_warps, launch.num_stages
            regs = shared = "-"
            if args.triton_python:
                r = subprocess.run([args.triton_python, "-c", _COMPILE, path, str(nw), str(ns)], check=False,
                                   capture_output=True, text=True)
                if r.returncode == 0:
                    info = json.loads(r.stdout.strip().splitlines()[-1])
                    regs, shared = info["ptxas"], info["shared"]
                else:
                    regs = "compile failed: " + r.stderr.strip().splitlines()[-1][:120]
            tiles = ", ".join(f"{k}={v}" for k, v in vars(cfg).items() if k not in ("num_warps", "num_stages"))
            print(f"| {name} | {func} | {tiles} | {nw} / {ns} | {regs} | {shared} |", flush=True)
    print(f"\nTriton IR (and with --triton-python TTGIR, PTX, SASS) in {args.out}")


if __name__ == "__main__":
    sys.exit(main())
