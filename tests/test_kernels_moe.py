"""Grouped NVFP4 routed experts (pallas_kernels.nvfp4_moe) against the reference, in interpret mode; the same
checks natively under ``-m gpu``."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from kernel_utils import bf16, nvfp4, random_routing, rel, rng

from pallas_kernels import nvfp4_layout as L
from pallas_kernels import nvfp4_moe as MO

E, D, I, K = 6, 48, 80, 2
SMALL = MO.MoeConfig(bm=16, bn13=32, bn2=32, bk=64, decode="int")
# The hidden is rounded to bf16 before w2 in kernel and reference alike; a different fp32 accumulation order
# can move a value across a bf16 rounding boundary, so the tolerance is a bf16 rounding of the hidden.
TOL = 2.0**-8


def experts(r, e=E, d=D, i=I):
    w1, w3, w2 = nvfp4(r, e, i, d), nvfp4(r, e, i, d), nvfp4(r, e, d, i)
    return (w1, w2, w3), tuple(L.pack_nvfp4(w) for w in (w1, w2, w3))


def routing(r, t, kind):
    if kind == "one_expert":
        ids = np.tile([[3, 1]], (t, 1))  # every token's first choice is expert 3
    else:
        # Expert E-1 never chosen: an empty group.
        ids = np.stack([r.choice(E - 1, K, replace=False) for _ in range(t)])
    return jnp.asarray(ids, jnp.int32), jnp.asarray(r.random((t, K)), jnp.float32)


# t * K <= PAIRWISE_MAX: the decode schedule (one tile per pair, split K); above it the sorted schedule.
@pytest.mark.parametrize("t,kind", [(1, "random"), (3, "random"), (2, "one_expert"), (40, "random"),
                                    (24, "one_expert")])
def test_grouped_kernels_equal_reference_interpret(t, kind):
    r = rng()
    ws, ps = experts(r)
    ids, wts = routing(r, t, kind)
    x = bf16(r, t, D, scale=2.0)
    cfg = dataclasses.replace(SMALL, schedule="pairs" if t * K <= MO.PAIRWISE_MAX else "sorted")
    y = MO.nvfp4_moe(x, ids, wts, *ps, 10.0, config=cfg, interpret=True)
    assert y.shape == (t, D) and y.dtype == jnp.float32
    assert rel(y, MO.nvfp4_moe_reference(x, ids, wts, *ws, 10.0)) < TOL


@pytest.mark.parametrize("split13,split2,fma", [(1, 1, False), (2, 4, False), (2, 1, True), (1, 2, True)])
def test_decode_schedule_split_k_equals_reference_interpret(split13, split2, fma):
    """The decode schedule with tensor-core tiles and with CUDA-core rows (``fma``)."""
    r = rng()
    ws, ps = experts(r)
    ids, wts = routing(r, 2, "random")
    x = bf16(r, 2, D, scale=2.0)
    cfg = dataclasses.replace(SMALL, split13=split13, split2=split2, schedule="pairs", fma=fma)
    y = MO.nvfp4_moe(x, ids, wts, *ps, 10.0, config=cfg, interpret=True)
    assert rel(y, MO.nvfp4_moe_reference(x, ids, wts, *ws, 10.0)) < TOL


def test_default_decode_config_fits_padded_sizes_its_long_step_does_not_divide_interpret():
    """The default decode step (1024 codes) is shortened to divide padded inputs of 768 and 512 codes."""
    r = rng()
    ws, ps = experts(r, 4, 704, 304)
    assert (ps[0].kp, ps[1].kp) == (768, 512)
    ids = jnp.asarray([[0, 2], [3, 1]], jnp.int32)
    wts = jnp.asarray(r.random((2, K)), jnp.float32)
    x = bf16(r, 2, 704, scale=2.0)
    cfg = dataclasses.replace(MO.default_config(2 * K, mgpu=False), decode="int")
    assert cfg.bk == 1024 and cfg.schedule == "pairs"
    y = MO.nvfp4_moe(x, ids, wts, *ps, 10.0, config=cfg, interpret=True)
    assert rel(y, MO.nvfp4_moe_reference(x, ids, wts, *ws, 10.0)) < TOL


@pytest.mark.parametrize("t,schedule,fma", [(20, "sorted", False), (3, "pairs", False), (3, "pairs", True)])
def test_swiglu_clip_is_active_interpret(t, schedule, fma):
    """Inputs large enough that min(a, L) and clamp(u, -L, L) bind."""
    r = rng()
    ws, ps = experts(r)
    ids, wts = routing(r, t, "random")
    x = bf16(r, t, D, scale=40.0)
    cfg = dataclasses.replace(SMALL, schedule=schedule, fma=fma)
    y = MO.nvfp4_moe(x, ids, wts, *ps, 1.0, config=cfg, interpret=True)
    assert rel(y, MO.nvfp4_moe_reference(x, ids, wts, *ws, 1.0)) < TOL


@pytest.mark.parametrize("t,schedule", [(3, "pairs"), (20, "sorted")])
def test_swiglu_limit_zero_means_no_clip_interpret(t, schedule):
    """``swiglu_limit <= 0`` is no clip (the official code's meaning): the kernels equal the reference with a
    limit far above every activation, and differ from the clipped result."""
    r = rng()
    ws, ps = experts(r)
    ids, wts = routing(r, t, "random")
    x = bf16(r, t, D, scale=40.0)
    cfg = dataclasses.replace(SMALL, schedule=schedule)
    y = MO.nvfp4_moe(x, ids, wts, *ps, 0.0, config=cfg, interpret=True)
    free = MO.nvfp4_moe_reference(x, ids, wts, *ws, 1e30)
    assert rel(y, free) < TOL and rel(MO.nvfp4_moe_reference(x, ids, wts, *ws, 0.0), free) == 0.0
    assert rel(y, MO.nvfp4_moe_reference(x, ids, wts, *ws, 1.0)) > 0.1


def _skip_some(r, ids, wts):
    """Mark about a third of the pairs -1 (another shard's expert) and give the independent check the same
    routing with those pairs' weights at zero instead."""
    skip = r.random(ids.shape) < 0.35
    return (jnp.where(skip, -1, ids), jnp.where(skip, 0.0, wts),
            jnp.where(skip, 0, ids), jnp.where(skip, 0.0, wts))


@pytest.mark.parametrize("t,schedule,fma", [(2, "pairs", False), (2, "pairs", True), (30, "sorted", False)])
def test_skipped_pairs_contribute_nothing_interpret(t, schedule, fma):
    """Expert parallelism passes pairs of other devices' experts as id -1: they add nothing (the result equals
    zero routing weights on those pairs), in both schedules."""
    r = rng()
    ws, ps = experts(r)
    ids, wts = routing(r, t, "random")
    sk_ids, sk_w, ref_ids, ref_w = _skip_some(r, ids, wts)
    x = bf16(r, t, D, scale=2.0)
    cfg = dataclasses.replace(SMALL, schedule=schedule, fma=fma)
    y = MO.nvfp4_moe(x, sk_ids, sk_w, *ps, 10.0, config=cfg, interpret=True)
    want = MO.nvfp4_moe_reference(x, ref_ids, ref_w, *ws, 10.0)
    assert rel(y, want) < TOL
    assert rel(MO.nvfp4_moe_reference(x, sk_ids, sk_w, *ws, 10.0), want) < 1e-6
    all_skipped = MO.nvfp4_moe(x, jnp.full_like(ids, -1), wts, *ps, 10.0, config=cfg, interpret=True)
    assert float(jnp.abs(all_skipped).max()) == 0.0


def test_schedule_pads_each_expert_to_whole_tiles_and_skips_empty_experts():
    r = rng()
    ids, wts = routing(r, 40, "random")
    bm = 16
    s = MO.make_schedule(ids, wts, E, bm)
    te = np.asarray(s.tile_expert)
    tok = np.asarray(s.row_token).reshape(-1, bm)
    used = te >= 0
    assert (E - 1) not in te  # the empty expert owns no tile
    for tile in np.nonzero(used)[0]:
        assert all(te[tile] in np.asarray(ids)[t] for t in tok[tile][tok[tile] >= 0])
    assert (tok[~used] < 0).all()
    slots = np.asarray(s.pair_slot)
    assert len(set(slots.tolist())) == slots.size
    np.testing.assert_array_equal(np.asarray(s.row_token)[slots], np.repeat(np.arange(40), K))
    np.testing.assert_allclose(np.asarray(s.row_weight)[slots], np.asarray(wts).reshape(-1))


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 4, 40, 700])
@pytest.mark.parametrize("decode,fma", [("asm", False), ("int", False), ("asm", True)])
def test_gpu_grouped_equals_reference(t, decode, fma):
    r = rng()
    e, d, i, k = 32, 512, 256, 6
    ws, ps = experts(r, e, d, i)
    ids, wts = random_routing(r, t, e - 2, k)
    x = bf16(r, t, d)
    cfg = MO.default_config(t * k, mgpu=False)  # the Triton kernels (Mosaic GPU: test_kernels_nvfp4_mgpu)
    cfg = dataclasses.replace(cfg, decode=decode, fma=fma and cfg.schedule == "pairs")
    y = MO.nvfp4_moe(x, ids, wts, *ps, 10.0, config=cfg)
    assert rel(y, MO.nvfp4_moe_reference(x, ids, wts, *ws, 10.0)) < TOL
    one = jnp.full((t, k), 5, jnp.int32).at[:, 1:].set(jnp.arange(1, k))
    y = MO.nvfp4_moe(x, one, wts, *ps, 10.0, config=cfg)
    assert rel(y, MO.nvfp4_moe_reference(x, one, wts, *ws, 10.0)) < TOL
    sk_ids, sk_w, ref_ids, ref_w = _skip_some(r, ids, wts)
    y = MO.nvfp4_moe(x, sk_ids, sk_w, *ps, 10.0, config=cfg)
    assert rel(y, MO.nvfp4_moe_reference(x, ref_ids, ref_w, *ws, 10.0)) < TOL
