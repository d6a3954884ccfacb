"""Router and experts (ARCHITECTURE.md §8)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import dsv4_jax as d
from dsv4_jax import moe, quant

C = d.tiny()
MODEL = d.random_model(C, seed=0, dtype="float32")


def _np(x):
    return np.asarray(quant.dequantize_full(x), np.float64)


def test_router_formula_and_bias_only_selects():
    p = MODEL.params.layers[3].ffn  # score-routed
    x = np.random.default_rng(0).standard_normal((7, C.hidden_size)).astype(np.float32)
    ids, w = moe.route(p, jnp.asarray(x), jnp.zeros(7, jnp.int32), C)
    s = np.sqrt(np.log1p(np.exp(x.astype(np.float64) @ _np(p.gate).T)))
    want_ids = np.argsort(-(s + np.asarray(p.bias)), axis=-1, kind="stable")[:, :C.num_experts_per_tok]
    np.testing.assert_array_equal(np.sort(np.asarray(ids), -1), np.sort(want_ids, -1))
    sel = np.take_along_axis(s, np.asarray(ids), -1)
    np.testing.assert_allclose(np.asarray(w), sel / sel.sum(-1, keepdims=True) * 1.5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(w).sum(-1), C.routed_scaling_factor, rtol=1e-6)


def test_router_ties_go_to_the_lower_expert_id():
    p = MODEL.params.layers[3].ffn
    p = dataclasses.replace(p, gate=jnp.zeros_like(p.gate), bias=jnp.zeros_like(p.bias))  # all scores equal
    ids, w = moe.route(p, jnp.ones((2, C.hidden_size)), jnp.zeros(2, jnp.int32), C)
    np.testing.assert_array_equal(np.asarray(ids), [[0, 1], [0, 1]])
    np.testing.assert_allclose(np.asarray(w), 0.75)


def test_hash_routing_uses_the_token_and_learned_weights():
    p = MODEL.params.layers[0].ffn
    assert p.tid2eid is not None and p.bias is None
    tokens = jnp.asarray([3, 200, 3])
    x = np.random.default_rng(1).standard_normal((3, C.hidden_size)).astype(np.float32)
    ids, w = moe.route(p, jnp.asarray(x), tokens, C)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(p.tid2eid)[[3, 200, 3]])
    s = np.sqrt(np.log1p(np.exp(x.astype(np.float64) @ _np(p.gate).T)))
    sel = np.take_along_axis(s, np.asarray(ids), -1)
    np.testing.assert_allclose(np.asarray(w), sel / sel.sum(-1, keepdims=True) * 1.5, rtol=1e-5)


def swiglu_np(x, w1, w2, w3, lim=10.0):
    a = np.minimum(x @ w1.T, lim)
    u = np.clip(x @ w3.T, -lim, lim)
    return (a / (1 + np.exp(-a)) * u) @ w2.T


def test_moe_layer_with_clipped_shared_expert():
    """Large inputs drive the SwiGLU clip in routed and shared experts; the layer equals the formula."""
    p = MODEL.params.layers[3].ffn
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((2, 9, C.hidden_size)) * 8).astype(np.float32)
    got = np.asarray(moe.moe(p, jnp.asarray(x), jnp.zeros((2, 9), jnp.int32), C, jnp.float32))
    ids, w = (np.asarray(a) for a in moe.route(p, jnp.asarray(x), jnp.zeros((2, 9), jnp.int32), C))
    e = p.experts
    xs = x.reshape(-1, C.hidden_size).astype(np.float64)
    shared = swiglu_np(xs, _np(p.shared.w1), _np(p.shared.w2), _np(p.shared.w3))
    routed = np.zeros_like(xs)
    for t in range(xs.shape[0]):
        for j, eid in enumerate(ids.reshape(-1, 2)[t]):
            we = [_np(jax.tree.map(lambda a, eid=eid: a[eid], getattr(e, k))) for k in ("w1", "w2", "w3")]
            a = np.minimum(xs[t] @ we[0].T, 10)
            u = np.clip(xs[t] @ we[2].T, -10, 10)
            routed[t] += (w.reshape(-1, 2)[t, j] * a / (1 + np.exp(-a)) * u) @ we[1].T
    np.testing.assert_allclose(got.reshape(-1, C.hidden_size), routed + shared, rtol=1e-4, atol=1e-4)
    # The clip is active: without it the shared expert's output would differ.
    a = xs @ _np(p.shared.w1).T
    assert (a > 10).any()
    unclipped = ((a / (1 + np.exp(-a))) * (xs @ _np(p.shared.w3).T)) @ _np(p.shared.w2).T
    assert np.abs(unclipped - shared).max() > 1e-2


def test_swiglu_limit_zero_means_no_clip():
    """The official ``Expert`` clips only ``if self.swiglu_limit > 0`` (its ``ModelArgs`` default is 0): a limit
    of 0 (or below) leaves the SwiGLU unclipped, not every hidden at zero."""
    e = MODEL.params.layers[3].ffn.shared
    x = np.random.default_rng(4).standard_normal((5, C.hidden_size)).astype(np.float32) * 8
    a, u = x @ _np(e.w1).T, x @ _np(e.w3).T
    assert (a > 10).any() or (np.abs(u) > 10).any()  # the default limit would bind
    want = a / (1 + np.exp(-a)) * u
    for lim in (0.0, -1.0):
        got = np.asarray(moe.swiglu(e, jnp.asarray(x), dataclasses.replace(C, swiglu_limit=lim), jnp.float32))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_both_expert_evaluation_orders_agree():
    """Few tokens gather their experts; many tokens visit the experts one by one: the same numbers."""
    p = MODEL.params.layers[3].ffn
    x = jnp.asarray(np.random.default_rng(3).standard_normal((6, C.hidden_size)), jnp.float32)
    ids, w = moe.route(p, x, jnp.zeros(6, jnp.int32), C)
    few = [moe.routed_experts(p.experts, x[i:i + 1], ids[i:i + 1], w[i:i + 1], C, jnp.float32) for i in range(6)]
    many = moe.routed_experts(p.experts, x, ids, w, C, jnp.float32)
    np.testing.assert_allclose(np.concatenate(few), np.asarray(many), rtol=1e-5, atol=1e-5)


def test_w4a4_quantises_each_expert_input_with_its_input_scale():
    """``Numerics.w4a4``: every NVFP4 routed-expert product sees its input (x for w1 and w3, the weighted hidden
    for w2) quantised to NVFP4 with that weight's own ``input_scale`` (different per expert here): the layer
    equals the pair-by-pair formula built from ``w4a4_matmul_reference``; the shared expert (FP8) is
    unchanged; and the result differs from W4A16."""
    from dsv4_jax import kernels
    from pallas_kernels.nvfp4_act import w4a4_matmul_reference

    p = MODEL.params.layers[3].ffn
    rng = np.random.default_rng(4)
    e = p.experts
    n_e = moe.n_experts(e)
    scales = {k: jnp.asarray(rng.uniform(0.002, 0.02, n_e), jnp.float32) for k in ("w1", "w2", "w3")}
    e = moe.Experts(*(dataclasses.replace(getattr(e, k), input_scale=scales[k]) for k in ("w1", "w2", "w3")))
    x = jnp.asarray(rng.standard_normal((7, C.hidden_size)), jnp.float32)
    ids, w = moe.route(p, x, jnp.zeros(7, jnp.int32), C)
    got = np.asarray(kernels.routed_experts(e, x, ids, w, C, jnp.float32, w4a4=True))
    want = np.zeros_like(got)
    for t in range(7):
        for j in range(ids.shape[1]):
            ex = jax.tree.map(lambda a, i=int(ids[t, j]): a[i], e)
            xt = x[t:t + 1]
            a = np.minimum(np.asarray(w4a4_matmul_reference(xt, ex.w1, jnp.float32)), C.swiglu_limit)
            u = np.clip(np.asarray(w4a4_matmul_reference(xt, ex.w3, jnp.float32)), -C.swiglu_limit, C.swiglu_limit)
            h = jnp.asarray(a / (1 + np.exp(-a)) * u * np.asarray(w[t, j]), jnp.float32)
            want[t] += np.asarray(w4a4_matmul_reference(h, ex.w2, jnp.float32))[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    w4a16 = np.asarray(moe.routed_experts(e, x, ids, w, C, jnp.float32))
    assert np.abs(w4a16 - got).max() > 1e-3 * np.abs(w4a16).max()


def test_numerics_w4a4_reaches_the_model():
    """``Model.numerics.w4a4`` switches the model's routed experts to W4A4 (the random model's input_scale of 1
    makes the difference large; a checkpoint's calibrated scales make it small)."""
    tokens = np.random.default_rng(5).integers(0, C.vocab_size, (2, 30))
    a = np.asarray(d.forward(MODEL, tokens))
    b = np.asarray(d.forward(dataclasses.replace(MODEL, numerics=d.Numerics(w4a4=True)), tokens))
    assert np.isfinite(b).all() and np.abs(a - b).max() > 1e-2 * np.abs(a).max()


def test_an_expert_row_does_not_depend_on_its_batch_on_the_cpu():
    """float32 on the CPU: a row of one expert (SwiGLU, routing weight, w2) has the same bits whether 30 or 90
    rows share the call; fused into w2's product the SwiGLU changed a row's last bit with the row count, which
    the model's FP8/FP4 simulations then grew into visible decode-vs-forward differences."""
    r = np.random.default_rng()
    e = moe._slice(MODEL.params.layers[3].ffn.experts, int(r.integers(C.n_routed_experts)))
    x = jnp.asarray(r.standard_normal((90, C.hidden_size)), jnp.float32)
    w = jnp.asarray(r.random(90), jnp.float32)
    f = jax.jit(lambda x, w: moe.expert_ffn(e, x, w, C, jnp.float32))
    np.testing.assert_array_equal(np.asarray(f(x, w))[60:], np.asarray(f(x[60:], w[60:])))
