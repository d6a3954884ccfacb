"""Probe for a Mosaic GPU (``plgpu``) NVFP4 decode kernel *with* block scales, in Mosaic array operations only
(no inline PTX): swap-AB GEMV ``W [N, K] @ x^T``, 8192x8192, one activation row.

Codes packed per K tile (byte j: column j in the low nibble, column j + tile_k/2 in the high one), scales e4m3
stored transposed ``[K/16, N]`` so that a 16-column block's 64 scales are one contiguous row. Per 16-column
chunk: E2M1 by bit placement (exact, x 2^-126), times the scale x 2^118 in bf16 (exact), one K=16 wgmma; the
result carries 2^-8 (an epilogue would fold it into the global scale). Exact against numpy; BENCHMARKS.md
(session 7) has the times: slower than the Triton kernel, so not a kernel of the package.

Environment switches (for bisecting): SCALE=0 (no scale multiply), WHOLE=1 (one wgmma per half tile, no
scales), SPEC=0 (no scale input), OLD=1 (nibble split first), MUL=1 (x 2^126 instead of the scale).

    PYTHONPATH=.:scripts python scripts/probe_mgpu_nvfp4.py 256/2/4,512/2/3     # tile_k/split/stages
"""
import functools
import os
import sys

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
from cupti_timing import median_kernel_ms
from jax import lax

TILE_M = 64
SCALE = os.environ.get("SCALE", "1") == "1"
MUL = os.environ.get("MUL") == "1"
SPEC = os.environ.get("SPEC", "1") == "1"
WHOLE = os.environ.get("WHOLE") == "1"
XT = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)) if WHOLE else (plgpu.TilingTransform((8, 16)), plgpu.SwizzleTransform(32))


def tr(bits_row, elem_bits):
  sw = plgpu.find_swizzle(bits_row)
  return (plgpu.TilingTransform((8, sw * 8 // elem_bits)), plgpu.SwizzleTransform(sw))


def gemv(codes, scales_t, xT, *, tile_k=256, split=2, stages=4, variant="chunk"):
  N = codes.shape[0]
  B, K = xT.shape
  B = max(B, 8)
  kper = K // split
  steps = kper // tile_k
  hk = tile_k // 2
  nb = tile_k // 16

  def body(*args, o_smem):
    if SPEC:
      c_gmem, s_gmem, x_gmem, o_gmem = args
    else:
      c_gmem, x_gmem, o_gmem = args
    mi = lax.axis_index("m"); si = lax.axis_index("s")

    def step(_, *refs):
      if SPEC:
        c_smem, s_smem, xlo, xhi, acc = refs
      else:
        c_smem, xlo, xhi, acc = refs
      if WHOLE:
        xlo, xhi = xlo.T, xhi.T
      c = c_smem[...].astype(jnp.int16)
      if os.environ.get("OLD") == "1":
        parts = tuple(((p & 8) << 12) | ((p & 7) << 6) for p in (c & 15, c >> 4))
      else:
        parts = (((c & 8) << 12) | ((c & 7) << 6), ((c & 0x80) << 8) | ((c & 0x70) << 2))
      for h, (bits, x_smem) in enumerate(zip(parts, (xlo, xhi))):
        a = lax.bitcast_convert_type(bits, jnp.bfloat16)
        if MUL: a = a * jnp.asarray(2.0 ** 126, jnp.bfloat16)
        if WHOLE:
          plgpu.wgmma(acc, a, x_smem)
          continue
        for b in range(hk // 16):
          ab = a[:, 16 * b:16 * b + 16]
          if SCALE:
            s = s_smem[h * (hk // 16) + b, :].astype(jnp.float32) * jnp.float32(2.0 ** 118)
            ab = ab * s.astype(jnp.bfloat16)[:, None]
          plgpu.wgmma(acc, ab, x_smem.at[:, 16 * b:16 * b + 16].T)
      plgpu.wgmma_wait(0)
      return acc

    in_specs = [plgpu.BlockSpec((TILE_M, hk), lambda k: (0, k), transforms=tr(hk * 8, 8))] + ([
                plgpu.BlockSpec((nb, TILE_M), lambda k: (k, 0))] if SPEC else []) + [
                plgpu.BlockSpec((B, hk), lambda k: (0, 2 * k), transforms=XT),
                plgpu.BlockSpec((B, hk), lambda k: (0, 2 * k + 1), transforms=XT)]

    @functools.partial(pl.run_scoped, acc=plgpu.ACC((TILE_M, B), jnp.float32))
    def _scope(acc):
      xs = x_gmem.at[:, pl.ds(si * kper, kper)]
      plgpu.emit_pipeline(step, grid=(steps,), in_specs=in_specs, max_concurrent_steps=stages, init_carry=acc)(
          c_gmem.at[pl.ds(mi * TILE_M, TILE_M), pl.ds(si * (kper // 2), kper // 2)],
          *([s_gmem.at[pl.ds(si * (kper // 16), kper // 16), pl.ds(mi * TILE_M, TILE_M)]] if SPEC else []), xs, xs)
      o_smem[...] = acc[...]
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[si, pl.ds(mi * TILE_M, TILE_M), :])
      plgpu.wait_smem_to_gmem(0)

  f = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((split, N, B), jnp.float32),
                   grid=(N // TILE_M, split), grid_names=("m", "s"),
                   scratch_types={"o_smem": plgpu.SMEM((TILE_M, B), jnp.float32, transforms=tr(B * 32, 32))},
                   compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
  return f(codes, scales_t, xT) if SPEC else f(codes, xT)


E2M1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], np.float32)


def make(N, K, B, tile_k, seed=0):
  rng = np.random.default_rng(seed)
  xT = np.asarray(jnp.asarray(rng.standard_normal((K, B)), jnp.bfloat16).astype(jnp.float32))
  codes = rng.integers(0, 16, (N, K)).astype(np.uint8)
  s = np.asarray(jnp.asarray(rng.uniform(0.125, 4, (N, K // 16)), jnp.float8_e4m3fn))
  wv = E2M1[codes] * np.repeat(s.astype(np.float32), 16, axis=1)
  c = codes.reshape(N, K // tile_k, 2, tile_k // 2)
  packed = (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(N, K // 2).astype(np.uint8)
  return jnp.asarray(packed), jnp.asarray(s.T.copy()), jnp.asarray(xT.T, jnp.bfloat16), (wv @ xT) * 2.0 ** -8


if __name__ == "__main__":
  print(jax.__version__, flush=True)
  N = K = 8192
  for tile_k, split, stages in [tuple(map(int, c.split("/"))) for c in sys.argv[1].split(",")]:
    try:
      codes, st, xT, ref = make(N, K, 1, tile_k)
      fn = jax.jit(functools.partial(gemv, tile_k=tile_k, split=split, stages=stages))
      out = np.asarray(fn(codes, st, xT)).sum(0)[:, :1]
      err = float(np.abs(out - ref).max() / np.abs(ref).max())
      cs = [jnp.asarray(np.asarray(codes)) for _ in range(6)]
      ms = median_kernel_ms(fn, [(c, st, xT) for c in cs], 30)
      print(f"tk{tile_k} split{split} st{stages}: rel err {err:.2e} {ms*1e3:.1f} us {N*K*0.5625/ms/1e9:.2f} TB/s", flush=True)
    except Exception as e:  # noqa
      print(f"tk{tile_k} split{split} st{stages}: FAILED {type(e).__name__}: {str(e)[:2000]}", flush=True)
