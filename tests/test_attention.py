"""Attention, compressor and indexer with the FP8 / FP4 simulations on, against float64 numpy written from the
spec (tests/spec_reference.py: the compressor as the token-by-token state machine of ARCHITECTURE.md §10.2,
attention query by query over the key set of §5.3)."""

import jax.numpy as jnp
import numpy as np
import pytest
import spec_reference as ref

import dsv4_jax as d
from dsv4_jax import attention, compressor, indexer
from dsv4_jax.cache import init_cache

C = d.tiny(hca_ratio=16, sliding_window=8, index_topk=5)
MODEL = d.random_model(C, seed=0, dtype="float32")
T = 45  # 11 CSA rows (6 beyond the top-5), 2 HCA rows, a trailing partial block


def _x(seed, t=T):
    return np.random.default_rng(seed).standard_normal((1, t, C.hidden_size)).astype(np.float32)


def _empty(layer):
    return init_cache(C, 1, T, jnp.float32).layers[layer]


def _rows(layer, kind, x):
    """All rows of a whole sequence, through the compressor's state machine from an empty state."""
    p, lc = MODEL.params.layers[layer].attn, _empty(layer)
    cp, state, rows = ((p.compressor, lc.compressor, lc.rows) if kind == "main"
                       else (p.indexer.compressor, lc.index_compressor, lc.index_rows))
    m = C.compress_ratios[layer]
    rows, _ = compressor.compress_step(cp, state, rows, jnp.asarray(x), jnp.zeros(1, jnp.int32),
                                       jnp.full(1, x.shape[1], jnp.int32), m, C, jnp.float32, kind=kind)
    return rows[:, : x.shape[1] // m]


def _rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.mark.parametrize("layer,kind", [(2, "main"), (3, "main"), (2, "indexer")])
def test_compressor_matches_the_state_machine(layer, kind):
    p = MODEL.params.layers[layer].attn
    cp = p.compressor if kind == "main" else p.indexer.compressor
    x = _x(1)
    m = C.compress_ratios[layer]
    got = _rows(layer, kind, x)
    want = ref.compressor_rows(cp, x[0].astype(np.float64), m, C, kind)
    assert got.shape == (1, T // m, want.shape[-1])
    # FP8/FP4 rounding can flip a value at a rounding boundary; all but a handful must agree closely.
    close = np.abs(np.asarray(got[0]) - want) <= 1e-4 * np.abs(want).max()
    assert close.mean() > 0.995


def test_indexer_selects_the_reference_rows():
    p = MODEL.params.layers[2].attn
    x = _x(2)
    xj = jnp.asarray(x)
    pos = jnp.arange(T)[None]
    qr = np.asarray(attention.queries(p, xj, pos, ref.freqs(C, True).astype(np.float32), C, jnp.float32)[0])
    keys = _rows(2, "indexer", x)
    q, w = indexer.index_queries(p.indexer, jnp.asarray(qr), xj, pos, C, jnp.float32)
    got_scores = np.asarray(indexer.index_scores(q, w, keys, jnp.float32))[0]
    want_scores = ref.index_scores(p.indexer, qr[0].astype(np.float64), x[0].astype(np.float64),
                                   np.asarray(keys[0], np.float64), C)
    assert _rel(got_scores, want_scores) < 1e-4
    sel = np.asarray(indexer.select(jnp.asarray(got_scores[None]), pos, 4, C.index_topk))[0]
    for t in range(T):
        eligible = (t + 1) // 4
        want = set(np.argsort(-want_scores[t, :eligible], kind="stable")[:C.index_topk])
        assert set(np.flatnonzero(sel[t])) == want, t
    assert sel.sum(-1).max() == C.index_topk  # selection is truncated once more rows exist


@pytest.mark.parametrize("layer", [0, 2, 3])
def test_attention_layer_matches_the_spec(layer):
    """SWA, CSA and HCA layers with every simulation on: outputs agree except where an FP4/FP8 rounding
    boundary flips (rare, isolated positions, ARCHITECTURE.md §14)."""
    p = MODEL.params.layers[layer].attn
    x = _x(3 + layer)
    got, _ = attention.attention(p, jnp.asarray(x), _empty(layer), jnp.zeros(1, jnp.int32), jnp.full(1, T, jnp.int32),
                                 layer, C, jnp.float32)
    got = np.asarray(got)[0]
    want = ref.attention_layer(p, x[0].astype(np.float64), layer, C)
    per_pos = np.abs(got - want).max(-1) / np.abs(want).max()
    assert np.median(per_pos) < 1e-5
    assert (per_pos < 1e-4).mean() >= 0.95
