"""Compressed-attention and indexer kernels (pallas_kernels.compressed_attention, pallas_kernels.indexer_topk)
against their pure-JAX references, in interpret mode on the CPU (GPU tests: JAX_PLATFORMS=cuda pytest -m gpu).

Attention: the kernel rounds unnormalised probabilities to bf16 where the reference rounds normalised ones, so
both are compared with the fp32 reference and must be as close to it as bf16 rounding allows. The indexer's
scores are exact on small-integer data (every product and partial sum is representable), so there the kernel
must select exactly the reference's rows, ties (many, by construction) included.
"""

import jax.numpy as jnp
import pytest
from kernel_utils import bf16, rel, rng

from dsv4_jax import kernels
from dsv4_jax.indexer import select
from pallas_kernels import compressed_attention as CA
from pallas_kernels import indexer_topk as IX

ATTN_TOL = 8e-3  # bf16 output rounding (2^-9 per element) plus bf16 probabilities


def _attn_inputs(r, b, t, h, d, w, n_rows):
    sink = jnp.asarray(r.standard_normal(h), jnp.float32)
    return bf16(r, b, t, h, d), bf16(r, b, t, d), bf16(r, b, w, d), bf16(r, b, n_rows, d), sink


def _check_attention(o, q, kv, ring, pos0, sink, rows, fp32_reference=True, **kw):
    ref = CA.compressed_attention_reference(q, kv, ring, pos0, sink, rows, **kw)
    assert o.shape == q.shape and o.dtype == jnp.bfloat16
    assert rel(o, ref) < ATTN_TOL
    if fp32_reference:  # the fp32 reference multiplies elementwise: only for small shapes
        ref32 = CA.compressed_attention_reference(q, kv, ring, pos0, sink, rows, dtype=jnp.float32, **kw)
        assert rel(o, ref32) < ATTN_TOL


# (T, pos0 per sequence, tiles): prefill from 0 and continued chunks, query blocks straddling tokens and the
# window, ring wrap-around, one sequence without rows yet.
PREFILL = [
    (11, [0, 5], CA.AttnConfig(bm=16, bk=16)),
    (21, [3, 30], CA.AttnConfig(bm=32, bk=16)),
]


@pytest.mark.parametrize("t,pos0,cfg", PREFILL)
@pytest.mark.parametrize("csa", [False, True])
def test_prefill_equals_reference_interpret(t, pos0, cfg, csa):
    r = rng(t)
    q, kv, ring, rows, sink = _attn_inputs(r, 2, t, 4, 128, 8, 9)
    pos0 = jnp.asarray(pos0)
    sel = jnp.asarray(r.random((2, t, 9)) < 0.5) if csa else None
    o = CA.compressed_attention(q, kv, ring, pos0, sink, rows, ratio=4, sel=sel, config=cfg, interpret=True)
    _check_attention(o, q, kv, ring, pos0, sink, rows, ratio=4, sel=sel)


def test_sliding_window_only_interpret():
    r = rng(1)
    q, kv, ring, _, sink = _attn_inputs(r, 2, 5, 4, 128, 8, 1)
    pos0 = jnp.asarray([0, 13])
    o = CA.compressed_attention(q, kv, ring, pos0, sink, config=CA.AttnConfig(bm=16, bk=16), interpret=True)
    _check_attention(o, q, kv, ring, pos0, sink, None)


@pytest.mark.parametrize("splits", [1, 4])
def test_decode_split_keys_interpret(splits):
    """One token per sequence, different lengths, rows split over programs (some splits empty)."""
    r = rng(splits)
    q, kv, ring, rows, sink = _attn_inputs(r, 3, 1, 16, 128, 16, 70)
    pos0 = jnp.asarray([281, 2, 130])
    cfg = CA.AttnConfig(bm=16, bk=16, splits=splits)
    o = CA.compressed_attention(q, kv, ring, pos0, sink, rows, ratio=4, config=cfg, interpret=True)
    _check_attention(o, q, kv, ring, pos0, sink, rows, ratio=4)


def test_dispatch_decode_gathers_selected_rows_interpret():
    """kernels.window_attention at T = 1 with a CSA selection (gather + count) equals the reference's mask."""
    r = rng(7)
    q, kv, ring, rows, sink = _attn_inputs(r, 2, 1, 4, 128, 8, 40)
    pos0 = jnp.asarray([150, 9])  # 37 and 2 eligible rows: more and fewer than top-k = 5
    scores = jnp.asarray(r.standard_normal((2, 1, 40)), jnp.float32)
    sel = select(scores, pos0[:, None], 4, 5)
    o = kernels.window_attention(q, kv, ring, pos0, rows, sel, sink, 4, jnp.bfloat16, top_k=5, interpret=True)
    _check_attention(o, q, kv, ring, pos0, sink, rows, ratio=4, sel=sel)


def _index_inputs(r, b, t, h, d, n_rows):
    """Small integers: the bf16 matmul, ReLU, weighting and head sum are exact, with many tied scores."""
    q = jnp.asarray(r.integers(-2, 3, (b, t, h, d)), jnp.bfloat16)
    keys = jnp.asarray(r.integers(-2, 3, (b, n_rows, d)), jnp.bfloat16)
    w = jnp.asarray(r.integers(-2, 3, (b, t, h)) * 0.25, jnp.float32)
    return q, w, keys


# (B, T, rows, top-k, pos0, tiles): decode deep in a cache, prefill chunks straddling score blocks, fewer
# eligible rows than top-k.
INDEX = [
    (2, 1, 300, 5, [1199, 40], IX.IndexConfig(bt=1, bk=32, chunk=128, bs=32)),
    (2, 7, 40, 5, [0, 100], IX.IndexConfig(bt=2, bk=16, chunk=32, bs=16)),
    (1, 3, 50, 64, [150], None),
]


@pytest.mark.parametrize("b,t,n_rows,k,pos0,cfg", INDEX)
def test_indexer_selects_reference_rows_interpret(b, t, n_rows, k, pos0, cfg):
    r = rng(n_rows)
    q, w, keys = _index_inputs(r, b, t, 16, 64, n_rows)
    pos0 = jnp.asarray(pos0)
    positions = pos0[:, None] + jnp.arange(t)
    s = IX.index_scores_kernel(q, w, keys, pos0, ratio=4, cfg=cfg or IX.default_config(t, n_rows), interpret=True)
    assert bool(jnp.all(s.astype(jnp.float32) == IX.index_scores_reference(q, w, keys, positions, 4)))
    m = IX.index_select(q, w, keys, pos0, ratio=4, top_k=k, config=cfg, interpret=True)
    assert bool(jnp.all(m == IX.index_select_reference(q, w, keys, positions, 4, k)))


@pytest.mark.parametrize("k", [1, 7, 200])
def test_topk_mask_equals_lax_top_k_interpret(k):
    """Random bf16 scores with -inf tails, signed zeros and repeated values; ties go to the lower index."""
    r = rng(k)
    s = jnp.asarray(r.standard_normal((5, 300)), jnp.bfloat16).astype(jnp.float32)
    s = s.at[:, ::7].set(0.0).at[:, 3::11].set(-0.0).at[:, 5::13].set(1.0)
    positions = jnp.asarray([[1199], [40], [0], [600], [803]])
    s = jnp.where(jnp.arange(300) < (positions + 1) // 4, s, -jnp.inf)
    cfg = IX.IndexConfig(chunk=128, bs=64)
    m = IX.topk_mask(s, top_k=k, cfg=cfg, interpret=True)
    assert bool(jnp.all(m == select(s[:, None], positions, 4, k)[:, 0]))


def test_dispatch_reference_path_is_the_reference():
    """On the CPU, kernels.index_select / window_attention are the model's reference functions."""
    r = rng(3)
    q, w, keys = _index_inputs(r, 1, 4, 16, 64, 20)
    pos0 = jnp.asarray([60])
    ref = IX.index_select_reference(q, w, keys, pos0[:, None] + jnp.arange(4), 4, 5)
    assert bool(jnp.all(kernels.index_select(q, w, keys, pos0, 4, 5, jnp.bfloat16) == ref))


@pytest.mark.gpu
@pytest.mark.parametrize("t,pos0,ratio,csa", [(1, [5000, 130000], 128, False), (1, [9000, 7], 4, True),
                                              (300, [0, 1000], 4, True), (300, [0, 513], 128, False)])
def test_gpu_attention_equals_reference(t, pos0, ratio, csa):
    r = rng(t)
    n_rows = 131072 // ratio if t == 1 else 1024 // ratio * 4
    q, kv, ring, rows, sink = _attn_inputs(r, 2, t, 64, 512, 128, n_rows)
    pos0 = jnp.asarray(pos0)
    sel = None
    if csa:
        scores = jnp.asarray(r.standard_normal((2, t, n_rows)), jnp.float32)
        sel = select(scores, pos0[:, None] + jnp.arange(t), ratio, 512)
    o = kernels.window_attention(q, kv, ring, pos0, rows, sel, sink, ratio, jnp.bfloat16, top_k=512)
    _check_attention(o, q, kv, ring, pos0, sink, rows, fp32_reference=False, ratio=ratio, sel=sel)


@pytest.mark.gpu
@pytest.mark.parametrize("t,pos0", [(1, [1048575, 4000]), (64, [0, 70000])])
def test_gpu_indexer_selects_reference_rows(t, pos0):
    r = rng(t)
    n_rows = 262144
    q, w, keys = _index_inputs(r, 2, t, 64, 128, n_rows)
    pos0 = jnp.asarray(pos0)
    positions = pos0[:, None] + jnp.arange(t)
    m = kernels.index_select(q, w, keys, pos0, 4, 512, jnp.bfloat16, query_block=32)
    assert bool(jnp.all(m == IX.index_select_reference(q, w, keys, positions, 4, 512)))
