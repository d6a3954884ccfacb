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


def _selection(r, b, t, n_rows, k, density=0.5):
    """A random selection as the kernels take it (ascending indices padded with -1, some rows not yet eligible
    among them) and as the reference takes it (the mask)."""
    idx = IX.mask_to_indices(jnp.asarray(r.random((b, t, n_rows)) < density), k)
    return idx, IX.indices_to_mask(idx, n_rows)


# (T, pos0 per sequence, tiles): prefill from 0 and continued chunks, query blocks straddling tokens and the
# window, ring wrap-around, one sequence without rows yet.
PREFILL = [
    (11, [0, 5], CA.AttnConfig(bm=16, bk=16)),
    (21, [3, 30], CA.AttnConfig(bm=32, bk=16)),
]


@pytest.mark.parametrize("t,pos0,cfg", PREFILL)
def test_prefill_equals_reference_interpret(t, pos0, cfg):
    r = rng(t)
    q, kv, ring, rows, sink = _attn_inputs(r, 2, t, 4, 128, 8, 9)
    pos0 = jnp.asarray(pos0)
    o = CA.compressed_attention(q, kv, ring, pos0, sink, rows, ratio=4, config=cfg, interpret=True)
    _check_attention(o, q, kv, ring, pos0, sink, rows, ratio=4)


# (T, pos0, k, tiles): selected rows gathered per token; index blocks straddle k, fewer selected rows than k
# (-1 padding), selections holding rows not yet eligible (hidden by the kernel as by the reference),
# several tokens per block (H < bm).
SPARSE = [
    (11, [0, 5], 5, CA.AttnConfig(bm=4, bk=16)),
    (21, [3, 30], 20, CA.AttnConfig(bm=2, bk=16, splits=2)),
    (13, [0, 61], 20, CA.AttnConfig(bm=16, bk=32)),  # 4 tokens per block, gathered together
    (1, [281, 2], 40, CA.AttnConfig(bm=4, bk=16, splits=4)),
    (1, [281, 2], 40, CA.AttnConfig(bm=16, bk=16, splits=2)),
]


@pytest.mark.parametrize("t,pos0,k,cfg", SPARSE)
def test_selected_rows_equal_reference_interpret(t, pos0, k, cfg):
    r = rng(t + k)
    q, kv, ring, rows, sink = _attn_inputs(r, 2, t, 4, 128, 8, 70)
    pos0 = jnp.asarray(pos0)
    idx, sel = _selection(r, 2, t, 70, k)
    o = CA.compressed_attention(q, kv, ring, pos0, sink, rows, ratio=4, idx=idx, config=cfg, interpret=True)
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


def test_decode_splits_share_the_steps_with_the_window():
    """``split_blocks``: the splits' row blocks cover every block once, in order, and split 0, which also walks
    the window's blocks, takes that many fewer, so no split has more than its share of all the steps."""
    r = rng(5)
    for _ in range(200):
        blocks, extra, splits = int(r.integers(1, 300)), int(r.integers(0, 5)), int(r.integers(1, 40))
        ranges = [tuple(int(v) for v in CA.split_blocks(jnp.int32(s), splits, blocks, extra)) for s in range(splits)]
        covered = [c for lo, hi in ranges for c in range(lo, min(hi, blocks))]
        assert covered == list(range(blocks)), (blocks, extra, splits, ranges)
        steps = [max(0, min(hi, blocks) - lo) + (extra if s == 0 else 0) for s, (lo, hi) in enumerate(ranges)]
        assert max(steps) == -(-(blocks + extra) // splits) or max(steps) == extra, (blocks, extra, splits, steps)
    assert CA.window_blocks(1, 128, 64, 4) == 3 and CA.window_blocks(1, 128, 64, 1) == 0
    assert CA.window_blocks(2, 128, 64, 4) == 0


@pytest.mark.parametrize("h,d,t,k", [(3, 128, 9, 0), (6, 128, 1, 0), (12, 128, 7, 6), (3, 128, 1, 6),
                                     (4, 192, 9, 6), (4, 192, 1, 0), (6, 320, 1, 6)])
def test_head_counts_and_sizes_not_a_power_of_two_interpret(h, d, t, k):
    """Default tiles with 3, 6 or 12 heads or a head size of 192 or 320 (padded to a power of two inside):
    dense rows and a selection, prefill and decode."""
    r = rng(h + t + d)
    q, kv, ring, rows, sink = _attn_inputs(r, 2, t, h, d, 8, 30)
    pos0 = jnp.asarray([100, 4])
    idx, sel = _selection(r, 2, t, 30, k) if k else (None, None)
    o = CA.compressed_attention(q, kv, ring, pos0, sink, rows, ratio=4, idx=idx, interpret=True)
    _check_attention(o, q, kv, ring, pos0, sink, rows, ratio=4, sel=sel)


def test_dispatch_decode_selected_rows_interpret():
    """kernels.window_attention at T = 1 with the indexer's selection (default tiles) equals the reference's
    mask; kernels.index_select's reference path gives the same indices as the kernel."""
    r = rng(7)
    q, kv, ring, rows, sink = _attn_inputs(r, 2, 1, 4, 128, 8, 40)
    pos0 = jnp.asarray([150, 9])  # 37 and 2 eligible rows: more and fewer than top-k = 5
    scores = jnp.asarray(r.standard_normal((2, 1, 40)), jnp.float32)
    sel = select(scores, pos0[:, None], 4, 5)
    idx = IX.mask_to_indices(sel, 5)
    o = kernels.window_attention(q, kv, ring, pos0, rows, idx, sink, 4, jnp.bfloat16, interpret=True)
    _check_attention(o, q, kv, ring, pos0, sink, rows, ratio=4, sel=sel)
    ref = kernels.window_attention(q, kv, ring, pos0, rows, idx, sink, 4, jnp.bfloat16)
    assert rel(o, ref) < ATTN_TOL


def _index_inputs(r, b, t, h, d, n_rows):
    """Small integers: the bf16 matmul, ReLU, weighting and head sum are exact, with many tied scores."""
    q = jnp.asarray(r.integers(-2, 3, (b, t, h, d)), jnp.bfloat16)
    keys = jnp.asarray(r.integers(-2, 3, (b, n_rows, d)), jnp.bfloat16)
    w = jnp.asarray(r.integers(-2, 3, (b, t, h)) * 0.25, jnp.float32)
    return q, w, keys


# (B, T, rows, top-k, pos0, tiles): decode deep in a cache, prefill chunks straddling score blocks, fewer
# eligible rows than top-k, fewer rows than top-k, 8-bit radix digits.
INDEX = [
    (2, 1, 300, 5, [1199, 40], IX.IndexConfig(bt=1, bk=32, nk=2, chunk=128, bs=32)),
    (2, 7, 40, 5, [0, 100], IX.IndexConfig(bt=2, bk=16, nk=1, chunk=32, bs=16, bits=8)),
    (1, 3, 50, 64, [150], None),
]


@pytest.mark.parametrize("b,t,n_rows,k,pos0,cfg,h", [(*c, 16) for c in INDEX] + [(2, 5, 60, 7, [3, 90], None, 5)])
def test_indexer_selects_reference_rows_interpret(b, t, n_rows, k, pos0, cfg, h):
    """The last case has 5 heads (padded to 16 inside ``index_select``)."""
    r = rng(n_rows)
    q, w, keys = _index_inputs(r, b, t, h, 64, n_rows)
    pos0 = jnp.asarray(pos0)
    positions = pos0[:, None] + jnp.arange(t)
    if h == 16:
        s = IX.index_scores_kernel(q, w, keys, pos0, ratio=4, cfg=cfg or IX.default_config(t, n_rows),
                                   interpret=True)
        assert bool(jnp.all(s.astype(jnp.float32) == IX.index_scores_reference(q, w, keys, positions, 4)))
    idx = IX.index_select(q, w, keys, pos0, ratio=4, top_k=k, config=cfg, interpret=True)
    assert idx.shape == (b, t, k) and idx.dtype == jnp.int32
    assert bool(jnp.all(idx == IX.mask_to_indices(IX.index_select_reference(q, w, keys, positions, 4, k), k)))


@pytest.mark.parametrize("k,bits,limited", [(1, 4, False), (7, 8, False), (200, 4, False), (400, 4, False),
                                            (7, 4, True), (200, 4, True)])
def test_topk_indices_equal_lax_top_k_interpret(k, bits, limited):
    """Random bf16 scores with -inf tails, signed zeros and repeated values; ties go to the lower index; rows
    with fewer finite scores than k (and k > R) are padded with -1. ``limited``: each row's eligible length is
    passed as ``limit`` and the columns past it hold finite scores, which must be ignored."""
    r = rng(k)
    s = jnp.asarray(r.standard_normal((5, 300)), jnp.bfloat16).astype(jnp.float32)
    s = s.at[:, ::7].set(0.0).at[:, 3::11].set(-0.0).at[:, 5::13].set(1.0)
    positions = jnp.asarray([[1199], [40], [0], [600], [803]])
    eligible = jnp.arange(300) < (positions + 1) // 4
    cfg = IX.IndexConfig(chunk=128, bs=64, bits=bits)
    if limited:
        idx = IX.topk_indices(s + 10.0 * ~eligible, ((positions + 1) // 4)[:, 0], top_k=k, cfg=cfg, interpret=True)
    else:
        idx = IX.topk_indices(jnp.where(eligible, s, -jnp.inf), top_k=k, cfg=cfg, interpret=True)
    assert bool(jnp.all(idx == IX.mask_to_indices(select(s[:, None], positions, 4, k)[:, 0], k)))


def test_topk_counts_many_equal_keys_per_lane_interpret():
    """The count passes keep 8-bit bins per lane: 128 equal keys a lane (the most a power-of-two chunk allows)
    are counted exactly, and a chunk that would put more than 255 keys on a lane is refused."""
    s = jnp.full((2, 2048), 1.5, jnp.float32).at[1, 700].set(2.0).at[1, 1900].set(-jnp.inf)
    cfg = IX.IndexConfig(chunk=2048, bs=16)  # 16 lanes, 128 keys each
    idx = IX.topk_indices(s, top_k=6, cfg=cfg, interpret=True)
    assert idx.tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 700]]
    with pytest.raises(ValueError, match="255"):
        IX.topk_indices(s, top_k=6, cfg=IX.IndexConfig(chunk=4096, bs=8))


def test_indices_mask_round_trip():
    m = jnp.asarray(rng(0).random((3, 4, 50)) < 0.3)
    idx = IX.mask_to_indices(m, 50)
    assert bool(jnp.all(IX.indices_to_mask(idx, 50) == m))
    assert bool(jnp.all(jnp.diff(jnp.where(idx < 0, 50 + jnp.arange(50), idx), axis=-1) > 0))  # ascending, -1 last


def test_dispatch_reference_path_is_the_reference():
    """On the CPU, kernels.index_select / window_attention are the model's reference functions."""
    r = rng(3)
    q, w, keys = _index_inputs(r, 1, 4, 16, 64, 20)
    pos0 = jnp.asarray([60])
    ref = IX.index_select_reference(q, w, keys, pos0[:, None] + jnp.arange(4), 4, 5)
    assert bool(jnp.all(kernels.index_select(q, w, keys, pos0, 4, 5, jnp.bfloat16) == IX.mask_to_indices(ref, 5)))


@pytest.mark.gpu
@pytest.mark.parametrize("t,pos0,ratio,csa", [(1, [5000, 130000], 128, False), (1, [9000, 7], 4, True),
                                              (300, [0, 1000], 4, True), (300, [0, 513], 128, False)])
def test_gpu_attention_equals_reference(t, pos0, ratio, csa):
    r = rng(t)
    n_rows = 131072 // ratio if t == 1 else 1024 // ratio * 4
    q, kv, ring, rows, sink = _attn_inputs(r, 2, t, 64, 512, 128, n_rows)
    pos0 = jnp.asarray(pos0)
    sel = idx = None
    if csa:
        scores = jnp.asarray(r.standard_normal((2, t, n_rows)), jnp.float32)
        sel = select(scores, pos0[:, None] + jnp.arange(t), ratio, 512)
        idx = IX.mask_to_indices(sel, 512)
    o = kernels.window_attention(q, kv, ring, pos0, rows, idx, sink, ratio, jnp.bfloat16)
    _check_attention(o, q, kv, ring, pos0, sink, rows, fp32_reference=False, ratio=ratio, sel=sel)


def test_default_decode_tiles_avoid_unsplit_64_row_blocks():
    """On the H200 a decode block of 64 query rows x 512 whose rows are not split asks Triton for 256 KB of
    shared memory (227 KB available; measured): the default tiles never choose it, at any batch."""
    for b in (1, 2, 8, 31, 32, 33, 64, 128, 256):
        for r, k in ((0, 0), (1, 0), (64, 0), (1000, 0), (8192, 0), (100, 7), (32768, 512)):
            cfg = CA.default_config(1, 64, r, b, k)
            assert cfg.bm in (16, 32, 64) and cfg.splits >= 1
            assert not (cfg.bm == 64 and (cfg.splits == 1 or r == 0)), (b, r, k, cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("b,ratio,n_rows,csa", [(32, 0, 0, False), (40, 128, 64, False), (32, 128, 1024, False),
                                                (33, 4, 2048, True)])
def test_gpu_decode_of_large_batches_at_flash_dimensions(b, ratio, n_rows, csa):
    """The default decode tiles of large batches (64-row blocks where the rows are split) run and match."""
    r = rng(b)
    q, kv, ring, rows, sink = _attn_inputs(r, b, 1, 64, 512, 128, max(n_rows, 1))
    rows = rows if n_rows else None
    pos0 = jnp.asarray(r.integers(max(n_rows, 1) * max(ratio, 1), max(n_rows, 1) * max(ratio, 1) + 100, b))
    sel = idx = None
    if csa:
        scores = jnp.asarray(r.standard_normal((b, 1, n_rows)), jnp.float32)
        sel = select(scores, pos0[:, None], ratio, 512)
        idx = IX.mask_to_indices(sel, 512)
    o = kernels.window_attention(q, kv, ring, pos0, rows, idx, sink, ratio, jnp.bfloat16)
    _check_attention(o, q, kv, ring, pos0, sink, rows, fp32_reference=False, ratio=max(ratio, 1), sel=sel)


@pytest.mark.gpu
@pytest.mark.parametrize("t,pos0", [(1, [1048575, 4000]), (64, [0, 70000])])
def test_gpu_indexer_selects_reference_rows(t, pos0):
    r = rng(t)
    n_rows = 262144
    q, w, keys = _index_inputs(r, 2, t, 64, 128, n_rows)
    pos0 = jnp.asarray(pos0)
    positions = pos0[:, None] + jnp.arange(t)
    idx = kernels.index_select(q, w, keys, pos0, 4, 512, jnp.bfloat16, query_block=32)
    ref = IX.mask_to_indices(IX.index_select_reference(q, w, keys, positions, 4, 512), 512)
    assert bool(jnp.all(idx == ref))
