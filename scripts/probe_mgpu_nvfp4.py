"""Probe for a Mosaic GPU (``plgpu``) NVFP4 decode kernel: E2M1 decode in inline PTX (``plgpu.inline_mgpu``) on
32-bit words laid out for the wgmma register operand (BENCHMARKS.md, session 7: 16.3 us at 8192x8192, exact,
against 24.6 us for the Triton kernel; not yet a kernel of the package).

Swap-AB GEMV y^T = W x^T, 8192x8192, block scales included. Per row and K tile of TK columns the codes are
repacked so that the 4 bytes a thread loads in WGMMA_8BIT layout (bytes 16g + 4t'..+3 of its row) hold exactly
the 8 weights of its four bf16 A-operand registers G = 4g..4g+3 (columns 8G + 2t', +1): register j's two weights are nibbles j and
j + 4 of the word, so one shift pair + masks places both (bf16 bits = E2M1 x 2^-126), and one bf16x2 multiply
by s x 2^118 (s the e4m3 block scale) makes them E2M1 x s x 2^-8, exact. A thread's 16 block scales of a row
are one 16-byte shared-memory load, converted two at a time (e4m3x2 -> f16x2 -> bf16 bits by shift and add).

    PYTHONPATH=. python scripts/probe_mgpu_nvfp4.py lower                     # CPU: lowers for CUDA, checks the repack
    PYTHONPATH=.:scripts python scripts/probe_mgpu_nvfp4.py 256/8/4,256/4/4   # GPU: tile_k/split/stages
"""
import functools
import sys

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
from jax import lax

from dsv4_jax.quant import E2M1_VALUES

TILE_M = 64


def tr(row_bytes, elem_bits):
  sw = plgpu.find_swizzle(row_bytes * 8)
  return (plgpu.TilingTransform((8, sw * 8 // elem_bits)), plgpu.SwizzleTransform(sw))


def _decode_fn(tk):
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, llvm, vector
  from jax.experimental.mosaic.gpu import fragmented_array as fa
  from jax.experimental.mosaic.gpu import utils as mu

  def decode(ctx, codes, s_ref):
    del ctx
    i32 = ir.IntegerType.get_signless(32)
    i8 = ir.IntegerType.get_signless(8)
    bf16 = ir.BF16Type.get()
    regs = codes.registers  # (1, tk/32, 1, 1, 2, 1, 1, 1, 1) of vector<4xi8>
    assert regs.shape == (1, tk // 32, 1, 1, 2, 1, 1, 1, 1), regs.shape
    tid = mu.thread_idx()
    lane = arith.remui(tid, mu.c(32, i32))
    warp = arith.remui(arith.divui(tid, mu.c(32, i32)), mu.c(4, i32))
    base_row = arith.addi(arith.muli(warp, mu.c(16, i32)), arith.divui(lane, mu.c(4, i32)))
    nblk = tk // 16
    scales = {}
    i64 = ir.IntegerType.get_signless(64)
    i16 = ir.IntegerType.get_signless(16)
    for h in range(2):
      row = arith.index_castui(ir.IndexType.get(), arith.addi(base_row, mu.c(8 * h, i32)))
      sv = vector.load(ir.VectorType.get((nblk,), i8), s_ref, [row, mu.c(0, ir.IndexType.get())])
      sv16 = vector.bitcast(ir.VectorType.get((nblk // 2,), i16), sv)
      for b in range(0, nblk, 2):
        pair = arith.extui(i32, vector.extract(sv16, dynamic_position=[], static_position=[b // 2]))
        # two e4m3 scales -> f16x2 (exact) -> bf16 bits of s x 2^118 (f16 exponent + 230, top 7 mantissa bits),
        # each splat into both lanes of a bf16x2
        both = llvm.inline_asm(
            i64, [pair],
            """{
            .reg .b16 e2; .reg .b32 h2, t, a, b;
            cvt.u16.u32 e2, $1;
            cvt.rn.f16x2.e4m3x2 h2, e2;
            shr.b32 t, h2, 3;
            and.b32 t, t, 0x1FFF1FFF;
            add.u32 t, t, 0x73007300;
            prmt.b32 a, t, 0, 0x1010;
            prmt.b32 b, t, 0, 0x3232;
            mov.b64 $0, {a, b};
            }""", "=l,r")
        scales[h, b] = arith.trunci(i32, both)
        scales[h, b + 1] = arith.trunci(i32, arith.shrui(both, mu.c(32, i64)))
    shifts = [("shl", 6, "shl", 12), ("shl", 2, "shl", 8), ("shr", 2, "shl", 4), ("shr", 6, "shl", 0)]
    out = np.empty((1, tk // 8, 1, 1, 2, 1, 1, 1, 1), dtype=object)
    for g in range(tk // 32):
      for h in range(2):
        w = mu.bitcast(regs[0, g, 0, 0, h, 0, 0, 0, 0], i32)
        for j in range(4):
          G = 4 * g + j
          op1, n1, op2, n2 = shifts[j]
          r = llvm.inline_asm(
              i32, [w, scales[h, G // 2]],
              f"""{{
              .reg .b32 a, b;
              {op1}.b32 a, $1, {n1};
              {op2}.b32 b, $1, {n2};
              and.b32 a, a, 0x01C001C0;
              and.b32 b, b, 0x80008000;
              or.b32 a, a, b;
              mul.rn.bf16x2 $0, a, $2;
              }}""", "=r,r,r")
          out[0, G, 0, 0, h, 0, 0, 0, 0] = mu.bitcast(r, ir.VectorType.get((2,), bf16))
    return fa.FragmentedArray(_registers=out, _layout=fa.WGMMA_LAYOUT, _is_signed=None)

  return plgpu.inline_mgpu(
      arg_types=(plgpu.Layout.WGMMA_8BIT, plgpu.RefType()),
      return_type=plgpu.ShapeDtypeStruct((TILE_M, tk), jnp.bfloat16, plgpu.Layout.WGMMA),
  )(decode)


def gemv(codes, scales, xT, *, tile_k=256, split=2, stages=4):
  N = codes.shape[0]
  B, K = xT.shape
  B = max(B, 8)
  kper = K // split
  steps = kper // tile_k
  decode = _decode_fn(tile_k)

  def body(c_gmem, s_gmem, x_gmem, o_gmem, o_smem):
    mi = lax.axis_index("m"); si = lax.axis_index("s")

    def step(_, c_smem, s_smem, x_smem, acc):
      c = plgpu.load(c_smem, layout=plgpu.Layout.WGMMA_8BIT)
      a = decode(c, s_smem)
      plgpu.wgmma(acc, a, x_smem.T)
      plgpu.wgmma_wait(0)
      return acc

    in_specs = [plgpu.BlockSpec((TILE_M, tile_k // 2), lambda k: (0, k), transforms=tr(tile_k // 2, 8)),
                plgpu.BlockSpec((TILE_M, tile_k // 16), lambda k: (0, k)),
                plgpu.BlockSpec((B, tile_k), lambda k: (0, k), transforms=tr(tile_k * 2, 16))]

    @functools.partial(pl.run_scoped, acc=plgpu.ACC((TILE_M, B), jnp.float32))
    def _scope(acc):
      plgpu.emit_pipeline(step, grid=(steps,), in_specs=in_specs, max_concurrent_steps=stages, init_carry=acc)(
          c_gmem.at[pl.ds(mi * TILE_M, TILE_M), pl.ds(si * (kper // 2), kper // 2)],
          s_gmem.at[pl.ds(mi * TILE_M, TILE_M), pl.ds(si * (kper // 16), kper // 16)],
          x_gmem.at[:, pl.ds(si * kper, kper)])
      o_smem[...] = acc[...]
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[si, pl.ds(mi * TILE_M, TILE_M), :])
      plgpu.wait_smem_to_gmem(0)

  f = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((split, N, B), jnp.float32),
                   grid=(N // TILE_M, split), grid_names=("m", "s"),
                   scratch_types={"o_smem": plgpu.SMEM((TILE_M, B), jnp.float32, transforms=tr(B * 4, 32))},
                   compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
  return f(codes, scales, xT)


E2M1 = E2M1_VALUES


def repack(codes, tk):
  """codes [N, K] (0..15) -> [N, K/2] uint8 in the probe's word layout."""
  N, K = codes.shape
  # col = 32g + 8j + 2t' + e within a tile (register G = 4g + j of thread quad t')
  # word (n, T, g, t'): nibble j <- col 8(4g+j) + 2t' (e=0), nibble j+4 <- e=1
  c = codes.reshape(N, K // tk, tk // 32, 4, 4, 2)  # [n, T, g, j, t', e]
  c = c.transpose(0, 1, 2, 4, 5, 3)  # [n, T, g, t', e, j]
  nib = c.reshape(N, K // tk, tk // 32, 4, 8).astype(np.uint32)  # nibble index = 4e + j
  word = sum(nib[..., i] << (4 * i) for i in range(8))  # [n, T, g, t']
  return word.astype("<u4").view(np.uint8).reshape(N, K // 2)


def emulate(word_bytes, tk):
  """numpy model of the decode: packed [N, K/2] -> E2M1 values [N, K] in column order."""
  N = word_bytes.shape[0]
  K = word_bytes.shape[1] * 2
  w = word_bytes.reshape(N, -1).view("<u4").reshape(N, K // tk, tk // 32, 4)
  nib = np.stack([(w >> (4 * i)) & 15 for i in range(8)], -1)  # [n, T, g, t', 4e+j]
  nib = nib.reshape(N, K // tk, tk // 32, 4, 2, 4).transpose(0, 1, 2, 5, 3, 4)  # [n, T, g, j, t', e]
  return E2M1[nib.reshape(N, K)]


def make(N, K, B, tk, seed=0):
  rng = np.random.default_rng(seed)
  xT = np.asarray(jnp.asarray(rng.standard_normal((K, B)), jnp.bfloat16).astype(jnp.float32))
  codes = rng.integers(0, 16, (N, K)).astype(np.uint8)
  s = np.asarray(jnp.asarray(rng.uniform(0.125, 4, (N, K // 16)), jnp.float8_e4m3fn))
  packed = repack(codes, tk)
  assert np.array_equal(emulate(packed, tk), E2M1[codes])
  wv = E2M1[codes] * np.repeat(s.astype(np.float32), 16, axis=1)
  return (jnp.asarray(packed), jnp.asarray(s.view(np.uint8)), jnp.asarray(xT.T, jnp.bfloat16),
          (wv @ xT) * 2.0 ** -8)


if __name__ == "__main__":
  print(jax.__version__, flush=True)
  if sys.argv[1] == "lower":
    tk = 256
    f = jax.jit(functools.partial(gemv, tile_k=tk))
    low = f.trace(jax.ShapeDtypeStruct((8192, 4096), jnp.uint8), jax.ShapeDtypeStruct((8192, 512), jnp.uint8),
                  jax.ShapeDtypeStruct((8, 8192), jnp.bfloat16)).lower(lowering_platforms=("cuda",))
    print("lowered OK", len(low.as_text()))
    make(128, 1024, 1, tk)
    print("repack/emulate OK")
    sys.exit()
  from cupti_timing import median_kernel_ms
  N = K = 8192
  for tile_k, split, stages in [tuple(map(int, c.split("/"))) for c in sys.argv[1].split(",")]:
    try:
      codes, s, xT, ref = make(N, K, 8, tile_k)
      fn = jax.jit(functools.partial(gemv, tile_k=tile_k, split=split, stages=stages))
      out = np.asarray(fn(codes, s, xT)).sum(0)
      err = float(np.abs(out - ref).max() / np.abs(ref).max())
      cs = [jnp.asarray(np.asarray(codes)) for _ in range(6)]
      ms = median_kernel_ms(fn, [(c, s, xT) for c in cs], 30)
      print(f"tk{tile_k} split{split} st{stages}: rel err {err:.2e} {ms*1e3:.1f} us {N*K*0.5625/ms/1e9:.2f} TB/s",
            flush=True)
    except Exception as e:  # noqa: BLE001
      print(f"tk{tile_k} split{split} st{stages}: FAILED {type(e).__name__}: {str(e)[:2000]}", flush=True)
