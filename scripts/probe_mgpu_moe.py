"""Probe for a Mosaic GPU (``plgpu``) grouped NVFP4 MoE decode: the inline-PTX decode of
``probe_mgpu_nvfp4.py`` over (token, expert) pairs, at Flash's expert shapes (D 4096, I 2048), against the
package's Triton kernel (``nvfp4_moe``) and its reference, in one run. (Session 7 wrote it and lowered it for
CUDA on the CPU; it has not run on a GPU yet.)

One launch for w1 and w3 (stacked along N: ``[E, 2I, D]``), the clipped SwiGLU and routing weight in XLA, one
launch for w2, the weighted sum over a token's experts in XLA. Each program takes one pair (its expert id and
activation row read from a small index array copied to shared memory), 64 weight rows, and a range of K; the
activation row is the first of its own 8-row operand block (``[P, 8, K]``, rows 1-7 zeros).

    PYTHONPATH=. python scripts/probe_mgpu_moe.py lower              # CPU: lowers the launches for CUDA
    PYTHONPATH=.:scripts python scripts/probe_mgpu_moe.py 1,4 256/1/4,256/2/4   # GPU: tokens; tile_k/split/stages
"""
import functools
import sys

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
from jax import lax
from probe_mgpu_nvfp4 import TILE_M, _decode_fn, repack, tr

D, I, TOPK, LIMIT = 4096, 2048, 6, 10.0


def pair_gemv(codes, scales, rows, idx, *, tile_k=256, split=1, stages=4):
  """``out[split, P, N, 8]`` fp32 partials (x 2^-8): column 0 of pair p is ``W[idx[0, p]] @ rows[p, 0]``.
  codes ``[E, N, K/2]`` (``repack`` layout), scales ``[E, N, K/16]`` e4m3 bytes, rows ``[P, 8, K]`` bf16 (row 0
  of each block is the pair's activation row), idx ``[1, P']`` int32 expert ids (P' a multiple of 4)."""
  N = codes.shape[1]
  P, _, K = rows.shape
  kper = K // split
  steps = kper // tile_k
  decode = _decode_fn(tile_k)

  def body(c_gmem, s_gmem, r_gmem, i_gmem, o_gmem, o_smem, i_smem, barrier):
    p = lax.axis_index("p"); mi = lax.axis_index("m"); si = lax.axis_index("s")
    plgpu.copy_gmem_to_smem(i_gmem, i_smem, barrier)
    plgpu.barrier_wait(barrier)
    eid = i_smem[0, p]

    def step(_, c_smem, s_smem, x_smem, acc):
      c = plgpu.load(c_smem, layout=plgpu.Layout.WGMMA_8BIT)
      plgpu.wgmma(acc, decode(c, s_smem), x_smem.T)
      plgpu.wgmma_wait(0)
      return acc

    in_specs = [plgpu.BlockSpec((TILE_M, tile_k // 2), lambda k: (0, k), transforms=tr(tile_k // 2, 8)),
                plgpu.BlockSpec((TILE_M, tile_k // 16), lambda k: (0, k)),
                plgpu.BlockSpec((8, tile_k), lambda k: (0, k), transforms=tr(tile_k * 2, 16))]

    @functools.partial(pl.run_scoped, acc=plgpu.ACC((TILE_M, 8), jnp.float32))
    def _scope(acc):
      plgpu.emit_pipeline(step, grid=(steps,), in_specs=in_specs, max_concurrent_steps=stages, init_carry=acc)(
          c_gmem.at[eid].at[pl.ds(mi * TILE_M, TILE_M), pl.ds(si * (kper // 2), kper // 2)],
          s_gmem.at[eid].at[pl.ds(mi * TILE_M, TILE_M), pl.ds(si * (kper // 16), kper // 16)],
          r_gmem.at[p].at[:, pl.ds(si * kper, kper)])
      o_smem[...] = acc[...]
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[si, p, pl.ds(mi * TILE_M, TILE_M), :])
      plgpu.wait_smem_to_gmem(0)

  f = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((split, P, N, 8), jnp.float32),
                   grid=(P, N // TILE_M, split), grid_names=("p", "m", "s"),
                   scratch_types={"o_smem": plgpu.SMEM((TILE_M, 8), jnp.float32, transforms=tr(32, 32)),
                                  "i_smem": plgpu.SMEM(idx.shape, jnp.int32),
                                  "barrier": plgpu.Barrier(num_arrivals=1)},
                   compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
  return f(codes, scales, rows, idx)


def _index(experts):
  p = experts.shape[0]
  pp = -(-p // 4) * 4
  return jnp.pad(experts.astype(jnp.int32)[None], ((0, 0), (0, pp - p)))


def _blocks(rows):
  """``[P, K]`` -> ``[P, 8, K]`` bf16 with each row first in its block."""
  return jnp.pad(rows.astype(jnp.bfloat16)[:, None], ((0, 0), (0, 7), (0, 0)))


@functools.partial(jax.jit, static_argnames=("cfg13", "cfg2"))
def moe(x, ids, rw, w13c, w13s, w2c, w2s, g1, g3, g2, *, cfg13=(256, 1, 4), cfg2=(256, 1, 4)):
  """Routed experts, fp32 ``[T, D]`` (``nvfp4_moe_reference``'s semantics). Global scales ``g* [E]``."""
  t, k = ids.shape
  flat = ids.reshape(-1)
  o13 = pair_gemv(w13c, w13s, _blocks(jnp.repeat(x, k, axis=0)), _index(flat),
                  **dict(zip(("tile_k", "split", "stages"), cfg13)))
  h13 = o13.sum(0)[:, :, 0] * 256.0
  a = jnp.minimum(h13[:, :I] * g1[flat][:, None], LIMIT)
  u = jnp.clip(h13[:, I:] * g3[flat][:, None], -LIMIT, LIMIT)
  h = (jax.nn.silu(a) * u * rw.reshape(-1)[:, None]).astype(jnp.bfloat16)
  o2 = pair_gemv(w2c, w2s, _blocks(h), _index(flat), **dict(zip(("tile_k", "split", "stages"), cfg2)))
  y = o2.sum(0)[:, :, 0] * (256.0 * g2[flat][:, None])
  return y.reshape(t, k, D).sum(1)


def random_experts(rng, e, n, k):
  codes = rng.integers(0, 16, (e, n, k), dtype=np.uint8)
  s = np.asarray(jnp.asarray(rng.uniform(0.125, 4, (e, n, k // 16)), jnp.float8_e4m3fn))
  g = rng.uniform(0.5, 2, e).astype(np.float32) * 1e-2
  return codes, s, g


def mosaic_layout(codes, s, tk):
  e, n, k = codes.shape
  return jnp.asarray(repack(codes.reshape(e * n, k), tk).reshape(e, n, k // 2)), jnp.asarray(s.view(np.uint8))


def checkpoint_format(codes, s, g):
  from dsv4_jax import quant

  packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
  return quant.Nvfp4(weight=jnp.asarray(packed), weight_scale=jnp.asarray(s), weight_scale_2=jnp.asarray(g),
                     input_scale=jnp.ones_like(jnp.asarray(g)))


if __name__ == "__main__":
  print(jax.__version__, flush=True)
  if sys.argv[1] == "lower":
    E = 8
    sd = jax.ShapeDtypeStruct
    args = (sd((1, D), jnp.bfloat16), sd((1, TOPK), jnp.int32), sd((1, TOPK), jnp.float32),
            sd((E, 2 * I, D // 2), jnp.uint8), sd((E, 2 * I, D // 16), jnp.uint8),
            sd((E, D, I // 2), jnp.uint8), sd((E, D, I // 16), jnp.uint8),
            sd((E,), jnp.float32), sd((E,), jnp.float32), sd((E,), jnp.float32))
    for cfg in ((256, 1, 4), (256, 2, 4)):
      low = moe.trace(*args, cfg13=cfg, cfg2=cfg).lower(lowering_platforms=("cuda",))
      print("lowered OK", cfg, len(low.as_text()))
    sys.exit()

  from cupti_timing import median_kernel_ms

  from pallas_kernels.nvfp4_layout import pack_nvfp4
  from pallas_kernels.nvfp4_moe import nvfp4_moe, nvfp4_moe_reference

  E = 24
  rng = np.random.default_rng(0)
  c1, s1, g1 = random_experts(rng, E, I, D)
  c3, s3, g3 = random_experts(rng, E, I, D)
  c2, s2, g2 = random_experts(rng, E, D, I)
  w1, w3, w2 = checkpoint_format(c1, s1, g1), checkpoint_format(c3, s3, g3), checkpoint_format(c2, s2, g2)
  p1, p3, p2 = pack_nvfp4(w1), pack_nvfp4(w3), pack_nvfp4(w2)
  cfgs = [tuple(map(int, c.split("/"))) for c in sys.argv[2].split(",")]
  mos = {}
  for tk in sorted({c[0] for c in cfgs}):
    w13c, w13s = mosaic_layout(np.concatenate([c1, c3], 1), np.concatenate([s1, s3], 1), tk)
    w2c, w2s = mosaic_layout(c2, s2, tk)
    mos[tk] = (w13c, w13s, w2c, w2s)
  gs = tuple(jnp.asarray(g) for g in (g1, g3, g2))
  for t in [int(v) for v in sys.argv[1].split(",")]:
    x = jnp.asarray(rng.standard_normal((t, D)), jnp.bfloat16)
    idsets = [jnp.asarray(np.stack([rng.permutation(E)[:TOPK] for _ in range(t)]), jnp.int32) for _ in range(4)]
    rw = jnp.asarray(rng.uniform(0.05, 0.3, (t, TOPK)), jnp.float32)
    ref = np.asarray(nvfp4_moe_reference(x, idsets[0], rw, w1, w2, w3, LIMIT))
    tri = jax.jit(lambda x, ids, rw: nvfp4_moe(x, ids, rw, p1, p2, p3, LIMIT))
    err = np.abs(np.asarray(tri(x, idsets[0], rw)) - ref).max() / np.abs(ref).max()
    ms = median_kernel_ms(tri, [(x, i, rw) for i in idsets], 20)
    print(f"T={t}: triton nvfp4_moe {ms * 1e3:.1f} us (max err {err:.1e})", flush=True)
    for cfg in cfgs:
      tk = cfg[0]
      try:
        fn = jax.jit(functools.partial(moe, cfg13=cfg, cfg2=cfg))
        run = lambda x, ids, rw, fn=fn, tk=tk: fn(x, ids, rw, *mos[tk], *gs)
        err = np.abs(np.asarray(run(x, idsets[0], rw)) - ref).max() / np.abs(ref).max()
        ms = median_kernel_ms(jax.jit(run), [(x, i, rw) for i in idsets], 20)
        print(f"T={t}: mosaic {cfg} {ms * 1e3:.1f} us (max err {err:.1e})", flush=True)
      except Exception as e:  # noqa: BLE001
        print(f"T={t}: mosaic {cfg} FAILED {type(e).__name__}: {str(e)[:1500]}", flush=True)
