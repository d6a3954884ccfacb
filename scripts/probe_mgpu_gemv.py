"""Probe for a Mosaic GPU (``plgpu``) NVFP4 decode kernel: a swap-AB GEMV ``W [N, K] @ x^T [K, 8]`` with the
weight tile loaded by TMA, converted in registers and fed to wgmma from registers. No block scales yet: it
measures how fast the codes alone can be read and converted (BENCHMARKS.md, session 7).

Modes: ``i4`` (W as jnp.int4, Mosaic's own int4 -> bf16 conversion), ``u8`` (W as packed E2M1 codes, byte j of
a K tile holding columns j and j + tile_k/2, decoded by bit placement: exact E2M1 x 2^-126, times 2^126),
``f8h`` (e4m3 -> f16, f16 activations), ``f8`` (e4m3 -> bf16: not supported by the ptxas of jax 0.11.2).

    PYTHONPATH=.:scripts python scripts/probe_mgpu_gemv.py u8,i4 256/2/4,512/2/3   # tile_k/split/stages
    PYTHONPATH=. python scripts/probe_mgpu_gemv.py --interpret   # CPU (fails: the interpreter has no register wgmma operand)
"""
import functools
import sys
import time
import traceback

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
from jax import lax

from dsv4_jax.quant import E2M1_VALUES

INTERP = "--interpret" in sys.argv


def gemv(w, xT, *, mode, tile_m=64, tile_k=256, split=2, steps=4):
  """out[split, N, B] f32 partials of W @ xT.  mode: 'i4' (w int4 [N,K]) | 'u8' (w uint8 [N,K/2], lo nibble col j, hi col j+tk/2 per tile)."""
  N = w.shape[0]
  B, K = xT.shape
  kper = K // split
  k_iters = kper // tile_k
  dense = mode in ("i4", "f8", "f8h")
  wk = tile_k if dense else tile_k // 2
  wbits = 4 if mode == "i4" else 8
  a_sw = plgpu.find_swizzle(wk * wbits)
  a_tr = (plgpu.TilingTransform((8, a_sw * 8 // wbits)), plgpu.SwizzleTransform(a_sw))
  bk = wk
  b_sw = plgpu.find_swizzle(bk * 16)
  b_tr = (plgpu.TilingTransform((8, b_sw * 8 // 16)), plgpu.SwizzleTransform(b_sw))
  o_sw = plgpu.find_swizzle(B * 32)
  o_tr = (plgpu.TilingTransform((8, o_sw * 8 // 32)), plgpu.SwizzleTransform(o_sw))

  def body(w_gmem, x_gmem, o_gmem, o_smem):
    mi = lax.axis_index("m")
    si = lax.axis_index("s")

    def step(_, *refs):
      if dense:
        a_smem, b_smem, acc = refs
        a = a_smem[...].astype(xT.dtype)
        plgpu.wgmma(acc, a, b_smem.T)
      else:
        a_smem, blo, bhi, acc = refs
        c = a_smem[...].astype(jnp.int16)
        for part, b_smem in ((c & 15, blo), (c >> 4, bhi)):
          bits = ((part & 8) << 12) | ((part & 7) << 6)
          a = lax.bitcast_convert_type(bits, jnp.bfloat16) * jnp.asarray(2.0 ** 126, jnp.bfloat16)
          plgpu.wgmma(acc, a, b_smem.T)
      plgpu.wgmma_wait(0)
      return acc

    in_specs = [plgpu.BlockSpec((tile_m, wk), lambda k: (0, k), transforms=a_tr)]
    if dense:
      in_specs.append(plgpu.BlockSpec((B, tile_k), lambda k: (0, k), transforms=b_tr))
      x_args = (x_gmem.at[:, pl.ds(si * kper, kper)],)
    else:
      in_specs += [plgpu.BlockSpec((B, bk), lambda k: (0, 2 * k), transforms=b_tr),
                   plgpu.BlockSpec((B, bk), lambda k: (0, 2 * k + 1), transforms=b_tr)]
      xs = x_gmem.at[:, pl.ds(si * kper, kper)]
      x_args = (xs, xs)

    @functools.partial(pl.run_scoped, acc=plgpu.ACC((tile_m, B), jnp.float32))
    def _scope(acc):
      plgpu.emit_pipeline(step, grid=(k_iters,), in_specs=in_specs, max_concurrent_steps=steps,
                          init_carry=acc)(
          (w_gmem.at[pl.ds(mi * tile_m, tile_m), pl.ds(si * (kper if dense else kper // 2), kper if dense else kper // 2)]),
          *x_args)
      o_smem[...] = acc[...]
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[si, pl.ds(mi * tile_m, tile_m), :])
      plgpu.wait_smem_to_gmem(0)

  kw = {}
  if INTERP:
    kw["interpret"] = plgpu.InterpretGPUParams()
  f = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((split, N, B), jnp.float32),
                   grid=(N // tile_m, split), grid_names=("m", "s"),
                   scratch_types={"o_smem": plgpu.SMEM((tile_m, B), jnp.float32, transforms=o_tr)},
                   compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
                   **kw)
  return f(w, xT)


E2M1 = E2M1_VALUES


def make(mode, N, K, B, tile_k, seed=0):
  rng = np.random.default_rng(seed)
  xT = rng.standard_normal((K, B)).astype(np.float32)
  xT = np.asarray(jnp.asarray(xT, jnp.bfloat16).astype(jnp.float32))
  if mode in ("f8", "f8h"):
    wv = np.asarray(jnp.asarray(rng.standard_normal((N, K)) * 4, jnp.float8_e4m3fn).astype(jnp.float32))
    xd = jnp.float16 if mode == "f8h" else jnp.bfloat16
    return jnp.asarray(wv, jnp.float8_e4m3fn), jnp.asarray(xT.T, xd), wv @ xT
  if mode == "i4":
    wv = rng.integers(-8, 8, (N, K))
    return jnp.asarray(wv, jnp.int4), jnp.asarray(xT.T, jnp.bfloat16), wv.astype(np.float32) @ xT
  codes = rng.integers(0, 16, (N, K)).astype(np.uint8)
  wv = E2M1[codes]
  # pack: per tile of tile_k columns, byte j = col j (lo) | col j + tile_k/2 (hi)
  c = codes.reshape(N, K // tile_k, 2, tile_k // 2)
  packed = (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(N, K // 2).astype(np.uint8)
  return jnp.asarray(packed), jnp.asarray(xT.T, jnp.bfloat16), wv @ xT


def bench(fn, *args, iters=50):
  out = fn(*args); out.block_until_ready()
  ts = []
  for _ in range(iters):
    t = time.perf_counter(); fn(*args).block_until_ready(); ts.append(time.perf_counter() - t)
  return out, float(np.median(ts))


if __name__ == "__main__":
  if INTERP:
    for mode in ("i4", "u8"):
      N, K, B = 128, 1024, 8
      w, xT, ref = make(mode, N, K, B, 256)
      try:
        out = gemv(w, xT, mode=mode).sum(0)
        print(mode, "max err", float(np.abs(np.asarray(out) - ref).max()), "ref scale", float(np.abs(ref).max()))
      except Exception:  # noqa: BLE001
        traceback.print_exc()
    sys.exit()

  MODES = sys.argv[1].split(",")
  CFGS = [tuple(map(int, c.split("/"))) for c in sys.argv[2].split(",")]
  print(jax.__version__, jax.devices()[0].device_kind, flush=True)
  N = K = 8192
  B = 8
  for mode in MODES:
    for tile_k, split, steps in CFGS:
      try:
        w, xT, ref = make(mode, N, K, B, tile_k)
        ws = [jnp.asarray(np.asarray(w)) for _ in range(6)]
        fn = jax.jit(functools.partial(gemv, mode=mode, tile_k=tile_k, split=split, steps=steps))
        out = np.asarray(fn(w, xT)).sum(0)
        err = float(np.abs(out - ref).max() / np.abs(ref).max())
        from cupti_timing import median_kernel_ms
        ms = median_kernel_ms(fn, [(wi, xT) for wi in ws], 50)
        nbytes = N * K // (1 if mode.startswith("f8") else 2)
        print(f"{mode} tk{tile_k} split{split} steps{steps}: rel err {err:.2e}  {ms*1e3:.1f} us  {nbytes/ms/1e9:.2f} TB/s (codes only)", flush=True)
      except Exception as e:  # noqa: BLE001
        print(f"{mode} tk{tile_k} split{split} steps{steps}: FAILED {type(e).__name__}: {str(e)[:1500]}", flush=True)
