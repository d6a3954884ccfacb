"""The Mosaic GPU NVFP4 kernels (pallas_kernels.nvfp4_mgpu): the numpy model of the PTX path's data movement
and the GPU interpreter against the references on the CPU, the lowering for Hopper on the CPU, and the same
checks natively under ``-m gpu`` (every e4m3 scale byte included)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_utils import (
    F32_TOL,
    bf16,
    mgpu_interpret_or_skip,
    mgpu_lowering_or_skip,
    nvfp4,
    random_routing,
    rel,
    rng,
)

from dsv4_jax import quant
from pallas_kernels import nvfp4_layout as L
from pallas_kernels import nvfp4_matmul as NM
from pallas_kernels import nvfp4_mgpu as G
from pallas_kernels import nvfp4_moe as MO

# The hidden is rounded to bf16 before w2 in kernel and reference alike (see test_kernels_moe).
MOE_TOL = 2.0**-8


@pytest.mark.parametrize("tile_k", [128, 256])
def test_virtual_column_order_is_the_documented_permutation(tile_k):
    kp = 1024
    perm = G.virtual_columns(kp, tile_k)
    assert sorted(perm.tolist()) == list(range(kp))
    h = kp // 2
    for v in np.random.default_rng(0).integers(0, kp, 200):
        step, rest = divmod(int(v), tile_k)
        g, rest = divmod(rest, 32)
        hh, rest = divmod(rest, 16)
        jj, rest = divmod(rest, 8)
        t, e = divmod(rest, 2)
        assert perm[v] == hh * h + step * tile_k // 2 + 16 * g + 4 * t + 2 * jj + e


@pytest.mark.parametrize("n,k,tile_k", [(64, 512, 256), (128, 768, 128)])
def test_ptx_data_movement_model_equals_reference(n, k, tile_k):
    """Each thread's 4 code bytes through the bit-level model of the PTX into its four A-operand registers, times
    the scale each register reads, against the activations in virtual order: the exact product (float64)."""
    r = rng()
    w = nvfp4(r, n, k)
    p = L.pack_nvfp4(w, pad_k=256)
    x = bf16(r, 5, k)
    xv = np.asarray(G.to_virtual(jnp.pad(x, ((0, 0), (0, p.kp - k))), tile_k), np.float64)
    got = G.emulate_block_gemv(np.asarray(p.qweight), np.asarray(p.scale), xv, tile_k)[:n].T * 2.0**7
    want = np.asarray(L.dequantize_packed(p, jnp.float32), np.float64) @ np.asarray(x, np.float64).T
    np.testing.assert_allclose(got, want.T, rtol=1e-12, atol=1e-12 * np.abs(want).max())


@pytest.mark.parametrize("m,n,k,tile_k,split", [(3, 200, 304, 256, 1), (1, 64, 1024, 128, 2),
                                                (9, 128, 1024, 512, 2), (17, 192, 256, 128, 1)])
def test_dense_kernel_equals_reference_interpret(m, n, k, tile_k, split):
    """Ragged M, N, K (padding rows and columns), every step width (512: two 256-column decodes a step),
    split K, the scales copied once per program (K slices of 512+) or a step at a time; through
    ``nvfp4_matmul``."""
    mgpu_interpret_or_skip()
    r = rng()
    w, x = nvfp4(r, n, k), bf16(r, m, k)
    cfg = NM.MatmulConfig(method="mgpu", bk=tile_k, split_k=split, num_stages=2)
    y = NM.nvfp4_matmul(x, L.pack_nvfp4(w), jnp.float32, config=cfg, interpret=True)
    assert y.shape == (m, n)
    assert rel(y, NM.nvfp4_matmul_reference(x, w, jnp.float32)) < F32_TOL


E, D, I, K = 5, 512, 128, 4


def _experts(r, e=E, d=D, i=I):
    w1, w3, w2 = nvfp4(r, e, i, d), nvfp4(r, e, i, d), nvfp4(r, e, d, i)
    return (w1, w2, w3), tuple(L.pack_nvfp4(w) for w in (w1, w2, w3))


def _moe_cfg(schedule, bm=8, bk=128, split13=2):
    return MO.MoeConfig(schedule=schedule, bm=bm, bk=bk, split13=split13, split2=1, num_stages=2)


@pytest.mark.parametrize("schedule,t,kind", [("mgpu_pairs", 3, "random"), ("mgpu_sorted", 6, "random"),
                                             ("mgpu_sorted", 11, "one_expert"), ("mgpu_pairs", 2, "skip"),
                                             ("mgpu_sorted", 5, "skip")])
def test_grouped_kernel_equals_reference_interpret(schedule, t, kind):
    """Both schedules; an empty expert (E-1 never chosen), all tokens on one expert (several blocks of it, with
    the sorted schedule's 8-row blocks), pairs of other shards' experts (-1) adding nothing; SwiGLU clip bound."""
    mgpu_interpret_or_skip()
    r = rng()
    ws, ps = _experts(r)
    ids = np.stack([r.choice(E - 1, K, replace=False) for _ in range(t)])
    if kind == "one_expert":
        ids = np.tile([[2, 0, 1, 3]], (t, 1))
    wts = r.random((t, K)).astype(np.float32)
    ref_ids, ref_w = ids, wts
    if kind == "skip":
        skip = np.zeros(ids.shape, bool)
        skip[0, 1] = skip[1, :2] = True  # (and all of a token's pairs in the last one)
        skip[-1] = True
        ids, ref_ids, ref_w = np.where(skip, -1, ids), np.where(skip, 0, ids), np.where(skip, 0.0, wts)
    x = bf16(r, t, D, scale=3.0)
    # (one_expert: w13's scales copied once per program (K 512 unsplit), w2's per step (K 256 is too short))
    cfg = _moe_cfg(schedule, bk=512, split13=1) if kind == "one_expert" else _moe_cfg(schedule)
    y = MO.nvfp4_moe(x, jnp.asarray(ids), jnp.asarray(wts), *ps, 4.0, config=cfg, interpret=True)
    assert y.shape == (t, D) and y.dtype == jnp.float32
    assert rel(y, MO.nvfp4_moe_reference(x, jnp.asarray(ref_ids), jnp.asarray(ref_w), *ws, 4.0)) < MOE_TOL


def _packed_struct(n, k, lead=()):
    sd = jax.ShapeDtypeStruct
    return L.Nvfp4Packed(sd((*lead, n, k // 2), jnp.uint8), sd((*lead, n, k // 16), jnp.float8_e4m3fn),
                         sd(lead, jnp.float32), sd(lead, jnp.float32), n, k)


@pytest.mark.parametrize("m,n,k,cfg", [
    (1, 8192, 8192, None),  # the default: 256-column steps, scales a step at a time
    (16, 2048, 4096, NM.MatmulConfig(method="mgpu", bk=512, split_k=2, num_stages=2)),
    (64, 4096, 2048, NM.MatmulConfig(method="mgpu", bk=128, split_k=0, num_stages=3))])
def test_dense_kernel_lowers_for_hopper_on_cpu(m, n, k, cfg):
    """Mosaic GPU lowers the PTX path (layout inference and the inline PTX included) for a CUDA device without
    one, at the model's shapes, every step width."""
    mgpu_lowering_or_skip()
    cfg = cfg or NM.mgpu_config(m, n, k)

    def f(x, p):
        return NM.nvfp4_matmul(x, p, jnp.bfloat16, config=cfg)

    low = jax.jit(f).trace(jax.ShapeDtypeStruct((m, k), jnp.bfloat16), _packed_struct(n, k)).lower(
        lowering_platforms=("cuda",))
    assert "mosaic_gpu" in low.as_text()


@pytest.mark.parametrize("t,once", [(1, False), (16, True)])
def test_grouped_kernel_lowers_for_hopper_on_cpu(t, once):
    """Both MoE launches (w1 and w3 together; w2) at Flash's expert shapes, with the Hopper defaults (pairs
    sharing row blocks for one token, sorted blocks for 16), scales a step at a time or once a program."""
    mgpu_lowering_or_skip()
    e, d, i = 8, 4096, 2048
    cfg = MO.mgpu_config(t * 6)

    def gemv(*a, **kw):
        return real(*a, **kw, scales_once=once) if "scales_once" not in kw else real(*a, **kw)

    def f(x, ids, wts, w1, w2, w3):
        return MO.nvfp4_moe(x, ids, wts, w1, w2, w3, 10.0, config=cfg)

    real = G.block_gemv
    G.block_gemv = gemv
    jax.clear_caches()  # (a trace of the same shapes would not call the patched function)
    try:
        sd = jax.ShapeDtypeStruct
        low = jax.jit(f).trace(sd((t, d), jnp.bfloat16), sd((t, 6), jnp.int32), sd((t, 6), jnp.float32),
                               _packed_struct(i, d, (e,)), _packed_struct(d, i, (e,)),
                               _packed_struct(i, d, (e,))).lower(lowering_platforms=("cuda",))
    finally:
        G.block_gemv = real
        jax.clear_caches()
    assert low.as_text().count("mosaic_gpu") >= 2


def test_hopper_dispatch(monkeypatch):
    """Where ``default_config`` picks the Mosaic GPU kernels when it runs on Hopper (``available`` faked), and
    that a packed layout the kernel cannot read falls back to the Triton kernels (here in interpret mode)."""
    monkeypatch.setattr(G, "available", lambda: True)
    assert NM.default_config(1, 8192, 8192).method == "mgpu"
    assert NM.default_config(16, 2048, 4096).method == "mgpu"
    assert NM.default_config(64, 8192, 8192).method == "mgpu"
    assert NM.default_config(64, 2048, 4096).method != "mgpu"  # measured: Triton's 10.9 against 11.5 us
    assert NM.default_config(65, 8192, 8192).method == "dequant_dot"
    assert NM.default_config(1, 1024, 384).method != "mgpu"  # Kp 384: not whole 16-byte rows of scales
    assert NM.default_config(1, 8192, 8192, mgpu=False).method != "mgpu"
    schedules = [(MO.default_config(6 * t).schedule, MO.default_config(6 * t).bm) for t in (1, 5, 6, 64, 65, 1024)]
    assert schedules[:2] == [("mgpu_pairs", 16), ("mgpu_pairs", 16)]
    assert [s for s, _ in schedules[2:]] == ["mgpu_sorted"] * 4
    assert [bm for _, bm in schedules[2:]] == [8, 8, 16, 32]
    assert MO.default_config(6 * 1025).schedule == "sorted"
    r = rng()
    w1, w3, w2 = nvfp4(r, 3, 64, 384), nvfp4(r, 3, 64, 384), nvfp4(r, 3, 384, 64)
    ps = [L.pack_nvfp4(w, pad_k=128) for w in (w1, w2, w3)]  # Kp 384 and 128
    assert not G.moe_supported(ps[0], ps[1])
    x, ids, wts = bf16(r, 2, 384), jnp.asarray([[0, 2], [1, 0]], jnp.int32), jnp.asarray(r.random((2, 2)), jnp.float32)
    y = MO.nvfp4_moe(x, ids, wts, *ps, 10.0, interpret=True)
    assert rel(y, MO.nvfp4_moe_reference(x, ids, wts, w1, w2, w3, 10.0)) < MOE_TOL


def test_shapes_the_kernel_refuses():
    r = rng()
    p = L.pack_nvfp4(nvfp4(r, 64, 256), pad_n=64, pad_k=128)
    assert G.supported(p.kp, p.np_)
    q = L.pack_nvfp4(nvfp4(r, 64, 384), pad_n=64, pad_k=128)  # Kp 384: not whole 16-byte rows of scales
    assert not G.supported(q.kp, q.np_)
    with pytest.raises(ValueError, match="block_gemv"):
        G.block_gemv(q.qweight[None], q.scale[None], jnp.zeros((1, 8, 384), jnp.bfloat16), None)
    with pytest.raises(ValueError, match="rows"):
        G.nvfp4_matmul_mgpu(bf16(r, 65, 256), p, p.weight_scale_2)


# ---------------------------------------------------------------------------------------------------------
# On the GPU (Hopper).

def _gpu_or_skip():
    if not G.available():
        pytest.skip("the Mosaic GPU NVFP4 kernels need a Hopper GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 9, 16, 64])
def test_gpu_dense_equals_reference(m):
    _gpu_or_skip()
    r = rng()
    for n, k in ((1000, 2064), (8192, 4096), (192, 256)):
        w, x = nvfp4(r, n, k), bf16(r, m, k)
        p = L.pack_nvfp4(w)
        ref = NM.nvfp4_matmul_reference(x, w, jnp.float32)
        for tile_k in (128, 256):
            cfg = NM.MatmulConfig(method="mgpu", bk=tile_k, split_k=0, num_stages=3)
            assert rel(NM.nvfp4_matmul(x, p, jnp.float32, config=cfg), ref) < F32_TOL, (n, k, tile_k)
        assert (NM.default_config(m, p.np_, p.kp).method == "mgpu") == NM.mgpu_pays(m, p.np_, p.kp)


@pytest.mark.gpu
def test_gpu_every_scale_byte_and_code_is_exact():
    """Every finite e4m3 scale byte (zero, subnormals and negatives included) on blocks of every E2M1 code,
    one-hot activations: the kernel returns each decoded weight ``E2M1 x scale`` exactly."""
    _gpu_or_skip()
    n, k = 128, 256 * 16
    byte = np.arange(n * k // 16) % 256
    byte = np.where(np.isfinite(np.arange(256, dtype=np.uint8).view(jnp.float8_e4m3fn).astype(np.float32))[byte],
                    byte, 0).astype(np.uint8).reshape(n, k // 16)
    codes = ((np.arange(k)[None, :] + 3 * np.arange(n)[:, None]) % 16).astype(np.uint8)
    w = quant.Nvfp4(quant.pack_nibbles(jnp.asarray(codes)), jnp.asarray(byte.view(jnp.float8_e4m3fn)),
                    jnp.float32(1.0), jnp.float32(1.0))
    p = L.pack_nvfp4(w)
    want = np.asarray(L.dequantize_packed(p, jnp.float32))
    eye = jnp.eye(64, k, dtype=jnp.bfloat16)
    got = []
    for c0 in range(0, k, 64):
        got.append(np.asarray(NM.nvfp4_matmul(jnp.roll(eye, c0, axis=1), p, jnp.float32,
                                              config=NM.mgpu_config(64, p.np_, p.kp))).T)
    np.testing.assert_array_equal(np.concatenate(got, axis=1), want)  # (-0 weights sum to +0 with the zeros)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 4, 16, 40])
def test_gpu_grouped_equals_reference(t):
    """The default Hopper schedule for t tokens (pairs to 5 tokens, sorted above) and both schedules
    explicitly, every token on expert 5 (its first and last choice: a token on the same expert twice), pairs
    of other shards (-1); Flash-like proportions at a smaller size."""
    _gpu_or_skip()
    r = rng()
    e, d, i, k = 32, 1024, 512, 6
    ws, ps = _experts(r, e, d, i)
    ids, wts = random_routing(r, t, e - 2, k)
    x = bf16(r, t, d)
    cfg = MO.default_config(t * k)
    assert cfg.schedule.startswith("mgpu")
    for sched in ("mgpu_pairs", "mgpu_sorted"):
        c = MO.MoeConfig(schedule=sched, bm=8 if t < 16 else 16, split13=0, split2=0)
        assert rel(MO.nvfp4_moe(x, ids, wts, *ps, 10.0, config=c), MO.nvfp4_moe_reference(x, ids, wts, *ws, 10.0)) \
            < MOE_TOL, sched
    one = jnp.full((t, k), 5, jnp.int32).at[:, 1:].set(jnp.arange(1, k))
    assert rel(MO.nvfp4_moe(x, one, wts, *ps, 10.0), MO.nvfp4_moe_reference(x, one, wts, *ws, 10.0)) < MOE_TOL
    skip = jnp.asarray(r.random((t, k)) < 0.35)
    y = MO.nvfp4_moe(x, jnp.where(skip, -1, ids), wts, *ps, 10.0)
    assert rel(y, MO.nvfp4_moe_reference(x, jnp.where(skip, 0, ids), jnp.where(skip, 0.0, wts), *ws, 10.0)) \
        < MOE_TOL
