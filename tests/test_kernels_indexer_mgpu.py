"""The Mosaic GPU indexer scoring (pallas_kernels.indexer_mgpu) against the pure-JAX reference
(``indexer_topk.index_scores_reference``, i.e. ``dsv4_jax.indexer.index_scores`` with the causal limit): Mosaic
GPU's interpreter on the CPU (the kernel's copies, barriers, slot ownership, head sums and stores; the interpreter
runs its product as ``jnp.dot``), its lowering for Hopper on the CPU, and the kernel on the GPU
(``JAX_PLATFORMS=cuda pytest -m gpu``).

Small-integer inputs make the product, ReLU, weighting and head sum exact in any order, so scores and the
selection (with many ties) must equal the reference's exactly; random normal inputs differ from it by at most
one bf16 rounding of the score (the fp32 head sum runs in another order)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_utils import mgpu_interpret_or_skip, mgpu_lowering_or_skip, rng

from pallas_kernels import indexer_mgpu as IM
from pallas_kernels import indexer_topk as IX


def _int_inputs(r, b, t, d, n_rows):
    q = jnp.asarray(r.integers(-2, 3, (b, t, 64, d)), jnp.bfloat16)
    keys = jnp.asarray(r.integers(-2, 3, (b, n_rows, d)), jnp.bfloat16)
    w = jnp.asarray(r.integers(-2, 3, (b, t, 64)) * 0.25, jnp.float32)
    return q, w, keys


def _ref(q, w, keys, pos0, ratio=4):
    return IX.index_scores_reference(q, w, keys, pos0[:, None] + jnp.arange(q.shape[1]), ratio)


def _assert_within_rounding(s, q, w, keys, pos0):
    """``s`` within one bf16 step of the fp32 reference score, plus what fp32 sums in another order may differ
    by where terms cancel: 2^-16 of the score's magnitude ``sum_h |w_h| sum_i |q_hi k_i|`` (d + H terms of
    fp32 rounding, 2^-24 each, with room)."""
    s = np.asarray(s.astype(jnp.float32))
    ref = np.asarray(_ref(q, w, keys, pos0))
    mag = np.asarray(_ref(jnp.abs(q), jnp.abs(w), jnp.abs(keys), pos0))
    fin = np.isfinite(ref)
    assert (np.isfinite(s) == fin).all()
    ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(ref[fin]), 1e-30))) - 7)  # one bf16 step at the score
    err = np.abs(s[fin] - ref[fin])
    bound = ulp + mag[fin] * 2.0 ** -16
    assert (err <= bound).all(), (f"{int((err > bound).sum())} of {err.size} scores off by more than the bound; "
                                  f"worst excess {float((err - bound).max())}")
    assert (err <= ulp).mean() > 0.99  # cancellation beyond one step is rare
    return s[fin], ref[fin]


# (B, T, rows, pos0, d, config): T not a multiple of the 4-token group and rows not of the 64-row step; a
# sequence with no eligible row yet beside one deep in its cache; the rows split over programs (a last split
# past every token's rows); 2 slots; more eligible rows than present ones (the limit is the row count).
CASES = [
    (2, 9, 150, [0, 560], 128, None),
    (1, 6, 200, [700], 64, IM.MgpuIndexConfig(stages=2, nk=1)),
    (2, 5, 70, [3, 40], 128, IM.MgpuIndexConfig(stages=4, nk=2)),
    (1, 4, 64, [1000], 64, IM.MgpuIndexConfig(stages=2)),
]


@pytest.mark.parametrize("b,t,n_rows,pos0,d,cfg", CASES)
def test_scores_equal_reference_interpret(b, t, n_rows, pos0, d, cfg):
    mgpu_interpret_or_skip()
    q, w, keys = _int_inputs(rng(t * 31 + n_rows), b, t, d, n_rows)
    pos0 = jnp.asarray(pos0)
    s = IM.index_scores_mgpu(q, w, keys, pos0, ratio=4, config=cfg, interpret=True)
    assert s.shape == (b, t, n_rows) and s.dtype == jnp.bfloat16
    ref = _ref(q, w, keys, pos0)
    assert bool(jnp.all(s.astype(jnp.float32) == ref))
    assert int(jnp.sum(jnp.isfinite(ref))) > 0  # some rows were scored


def test_random_scores_within_one_rounding_interpret():
    mgpu_interpret_or_skip()
    r = rng(5)
    b, t, n_rows = 1, 7, 130
    q = jnp.asarray(r.standard_normal((b, t, 64, 128)), jnp.bfloat16)
    w = jnp.asarray(r.standard_normal((b, t, 64)), jnp.float32)
    keys = jnp.asarray(r.standard_normal((b, n_rows, 128)), jnp.bfloat16)
    pos0 = jnp.asarray([500])
    s, ref = _assert_within_rounding(IM.index_scores_mgpu(q, w, keys, pos0, ratio=4, interpret=True), q, w, keys,
                                     pos0)
    assert (s == ref).mean() > 0.9


@pytest.mark.parametrize("t,n_rows,k,pos0,query_block", [(9, 150, 20, [0, 560], 0), (11, 300, 64, [100, 1100], 4)])
def test_selection_equals_reference_interpret(t, n_rows, k, pos0, query_block):
    """Through ``index_select(mgpu=True)``: padded raw scores, nothing written past a token's rows, the top-k
    reading up to each token's limit; ties go to the lower row as in the reference."""
    mgpu_interpret_or_skip()
    q, w, keys = _int_inputs(rng(t + k), 2, t, 64, n_rows)
    pos0 = jnp.asarray(pos0)
    idx = IX.index_select(q, w, keys, pos0, ratio=4, top_k=k, query_block=query_block, interpret=True, mgpu=True)
    positions = pos0[:, None] + jnp.arange(t)
    ref = IX.mask_to_indices(IX.index_select_reference(q, w, keys, positions, 4, k), k)
    assert idx.shape == (2, t, k)
    assert bool(jnp.all(idx == ref))


def test_shapes_and_dispatch_policy(monkeypatch):
    assert IM.supported(64, 128) and IM.supported(64, 64) and IM.supported(64, 256, IM.MgpuIndexConfig(stages=2))
    assert not IM.supported(32, 128) and not IM.supported(64, 96) and not IM.supported(64, 320)
    assert not IM.supported(64, 128, IM.MgpuIndexConfig(stages=3))  # slots go by warpgroup parity
    assert not IM.supported(64, 256)  # 4 slots of 64 x 256 beside 256 x 256 queries: over 227 KB
    assert IM.default_config(128).stages == 4 and IM.default_config(256).stages == 2
    assert IM.supported(64, 256, IM.default_config(256))
    with pytest.raises(ValueError, match="64 heads"):
        IM.index_scores_mgpu(jnp.zeros((1, 4, 16, 128), jnp.bfloat16), jnp.zeros((1, 4, 16), jnp.float32),
                             jnp.zeros((1, 8, 128), jnp.bfloat16), jnp.zeros((1,), jnp.int32), ratio=4)
    with pytest.raises(ValueError, match="64 heads"):  # asked for at a shape it does not take: refused by name
        IX.index_select(jnp.zeros((1, 4, 16, 128), jnp.bfloat16), jnp.zeros((1, 4, 16), jnp.float32),
                        jnp.zeros((1, 8, 128), jnp.bfloat16), jnp.zeros((1,), jnp.int32), ratio=4, top_k=2, mgpu=True)
    monkeypatch.setattr(IM, "available", lambda: True)
    monkeypatch.setattr(IM, "ON_BY_DEFAULT", False)
    assert not IM.use(2048, 64, 128)  # asked for (mgpu=True) until measured on a GPU
    monkeypatch.setattr(IM, "ON_BY_DEFAULT", True)
    assert IM.use(2048, 64, 128) and IM.use(16, 64, 128)
    assert not IM.use(1, 64, 128)  # decode keeps the Triton scoring (bound by memory)
    assert not IM.use(2048, 16, 128) and not IM.use(2048, 64, 128, interpret=True)
    monkeypatch.setattr(IM, "available", lambda: False)
    assert not IM.use(2048, 64, 128)


@pytest.mark.parametrize("b,t,n_rows,d,cfg", [(1, 2048, 32768, 128, None), (2, 9, 150, 128, IM.MgpuIndexConfig(nk=2)),
                                              (1, 64, 1000, 256, IM.MgpuIndexConfig(stages=2))])
def test_kernel_lowers_for_hopper_on_cpu(b, t, n_rows, d, cfg):
    """Mosaic GPU lowers the kernel (layouts of the head sums, wgmma operands, TMA offsets, shared memory within
    the SM's) for a CUDA device without one, at Flash's dimensions (a 2048-token query block at 128K)."""
    mgpu_lowering_or_skip()
    sd = jax.ShapeDtypeStruct

    def f(q, w, keys, pos0):
        return IM.index_scores_raw(q, w, keys, pos0, ratio=4, cfg=cfg or IM.default_config(d))

    low = jax.jit(f).trace(sd((b, t, 64, d), jnp.bfloat16), sd((b, t, 64), jnp.float32),
                           sd((b, n_rows, d), jnp.bfloat16), sd((b,), jnp.int32)).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in low.as_text()


@pytest.mark.gpu
@pytest.mark.parametrize("b,t,n_rows,pos0,cfg", [
    (2, 300, 5000, [0, 19000], None),  # a sequence from its start beside one deep in its cache
    (1, 2048, 32768, [129024], None),  # the last query block of a 128K prefill
    (1, 1000, 4096, [8000], IM.MgpuIndexConfig(stages=2, nk=8))])
def test_gpu_scores_and_selection_equal_reference(b, t, n_rows, pos0, cfg):
    if not IM.available():
        pytest.skip("needs a Hopper GPU")
    q, w, keys = _int_inputs(rng(t), b, t, 128, n_rows)
    pos0 = jnp.asarray(pos0)
    s = IM.index_scores_mgpu(q, w, keys, pos0, ratio=4, config=cfg)
    ref = _ref(q, w, keys, pos0)
    assert bool(jnp.all(s.astype(jnp.float32) == ref))
    idx = IX.index_select(q, w, keys, pos0, ratio=4, top_k=512, query_block=1024, mgpu=True)
    positions = pos0[:, None] + jnp.arange(t)
    assert bool(jnp.all(idx == IX.mask_to_indices(IX.index_select_reference(q, w, keys, positions, 4, 512), 512)))
    r = rng(1)  # random normal scores: within one bf16 rounding of the reference
    qn = jnp.asarray(r.standard_normal(q.shape), jnp.bfloat16)
    wn = jnp.asarray(r.standard_normal(w.shape), jnp.float32)
    kn = jnp.asarray(r.standard_normal(keys.shape), jnp.bfloat16)
    _assert_within_rounding(IM.index_scores_mgpu(qn, wn, kn, pos0, ratio=4, config=cfg), qn, wn, kn, pos0)
