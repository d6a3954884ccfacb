"""Float64 numpy implementations written from the spec's formulas (ARCHITECTURE.md §2, §4.2, §5-§7, §10.2), one token
at a time where the spec describes a state machine: independent references for the attention-side modules,
including the FP8 / FP4 simulations that transformers does not implement."""

from __future__ import annotations

import math

import numpy as np
from test_quant import fp4_sim_ref, fp8_sim_ref, sylvester

from dsv4_jax.quant import dequantize_full


def W(x) -> np.ndarray:
    return np.asarray(dequantize_full(x), np.float64)


def rms(x, w=None, eps=1e-6):
    y = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    return y if w is None else y * W(w)


def sinkhorn(m0, iters, eps) -> np.ndarray:
    """§4.2 step 8 in float64: row softmax (+eps), column normalisation, ``iters - 1`` (row, column) rounds."""
    m0 = np.asarray(m0, np.float64)
    e = np.exp(m0 - m0.max(-1, keepdims=True))
    m = e / e.sum(-1, keepdims=True) + eps
    m = m / (m.sum(-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(-1, keepdims=True) + eps)
        m = m / (m.sum(-2, keepdims=True) + eps)
    return m


def freqs(c, compressed: bool) -> np.ndarray:
    """§2.2, computed in float64 from the formulas."""
    rd = c.qk_rope_head_dim
    theta = c.compress_rope_theta if compressed else c.rope_theta
    f = theta ** (-np.arange(0, rd, 2) / rd)
    if compressed and c.rope_scaling is not None:
        ys = c.rope_scaling

        def corr(n):
            return rd * math.log(ys.original_max_position_embeddings / (n * 2 * math.pi)) / (2 * math.log(theta))

        lo, hi = max(math.floor(corr(ys.beta_fast)), 0), min(math.ceil(corr(ys.beta_slow)), rd - 1)
        ramp = np.clip((np.arange(rd // 2) - lo) / (hi - lo), 0, 1)
        f = f * (1 - ramp) + f / ys.factor * ramp
    return f


def rope(v, pos, f, inverse=False):
    """Rotate the last 2*len(f) dims of v [..., d] at integer position(s) pos (broadcast over v[..., 0])."""
    rd = 2 * len(f)
    ang = np.asarray(pos, np.float64)[..., None] * f
    ang = ang.reshape(ang.shape[:-1] + (1,) * (v.ndim - 1 - np.ndim(pos)) + ang.shape[-1:])
    z = v[..., -rd:].reshape(*v.shape[:-1], rd // 2, 2)
    c = (z[..., 0] + 1j * z[..., 1]) * np.exp((-1j if inverse else 1j) * ang)
    out = v.copy()
    out[..., -rd:] = np.stack([c.real, c.imag], -1).reshape(*v.shape[:-1], rd)
    return out


def compressor_rows(p, x, m, c, kind, qat=True):
    """§10.2 state machine, token by token: pend (open block) and prev (first halves of the last block);
    then §6.4 finishing. x [T, D] -> rows [T // m, d_c]."""
    wkv, wg, ape = W(p.wkv), W(p.wgate), np.asarray(p.ape, np.float64)
    overlap = m == 4
    dc = wkv.shape[0] // (2 if overlap else 1)
    pend, prev, rows = [], None, []
    for t in range(x.shape[0]):
        a, s = x[t] @ wkv.T, x[t] @ wg.T + ape[t % m]
        pend.append((a, s))
        if (t + 1) % m:
            continue
        if overlap:
            slots = [(a[dc:], s[dc:]) for a, s in pend]
            if prev is not None:
                slots = prev + slots
            prev = [(a[:dc], s[:dc]) for a, s in pend]
        else:
            slots = pend
        A = np.stack([a for a, _ in slots])
        S = np.stack([s for _, s in slots])
        wts = np.exp(S - S.max(0)) / np.exp(S - S.max(0)).sum(0)
        rows.append((wts * A).sum(0))
        pend = []
    if not rows:
        return np.zeros((0, dc))
    r = rms(np.stack(rows), p.norm)
    r = rope(r, np.arange(len(rows)) * m, freqs(c, True))
    if not qat:
        return r
    if kind == "main":
        nope = c.head_dim - c.qk_rope_head_dim
        r[:, :nope] = fp8_sim_ref(r[:, :nope], 64)
        return r
    return fp4_sim_ref(r @ sylvester(r.shape[-1]) / math.sqrt(r.shape[-1]), 32)


def index_scores(ip, qr, x, krows, c, qat=True):
    """§7.2: score[t, c] = sum_h w_h ReLU(q_h . K_c)."""
    t = qr.shape[0]
    q = (qr @ W(ip.wq_b).T).reshape(t, c.index_n_heads, c.index_head_dim)
    q = rope(q, np.arange(t), freqs(c, True))
    if qat:
        q = fp4_sim_ref(q @ sylvester(c.index_head_dim) / math.sqrt(c.index_head_dim), 32)
    w = x @ W(ip.weights_proj).T * c.index_head_dim**-0.5 * c.index_n_heads**-0.5
    return np.einsum("th,thc->tc", w, np.maximum(np.einsum("thd,cd->thc", q, krows), 0))


def attention_layer(p, x, layer, c, qat=True):
    """§5 for one sequence x [T, D] from position 0, query by query over its key set (§5.3)."""
    T = x.shape[0]
    m = c.compress_ratios[layer]
    f = freqs(c, m > 0)
    qr = rms(x @ W(p.wq_a).T, p.q_norm)
    q = rms((qr @ W(p.wq_b).T).reshape(T, c.num_attention_heads, c.head_dim))
    q = rope(q, np.arange(T), f)
    kv = rope(rms(x @ W(p.wkv).T, p.kv_norm), np.arange(T), f)
    nope = c.head_dim - c.qk_rope_head_dim
    if qat:
        kv[:, :nope] = fp8_sim_ref(kv[:, :nope], 64)
    rows = compressor_rows(p.compressor, x, m, c, "main", qat) if m else np.zeros((0, c.head_dim))
    if p.indexer is not None:
        scores = index_scores(p.indexer, qr, x, compressor_rows(p.indexer.compressor, x, m, c, "indexer", qat), c,
                              qat)
    out = np.zeros((T, c.num_attention_heads, c.head_dim))
    sink = np.asarray(p.attn_sink, np.float64)
    for i in range(T):
        keys = [kv[j] for j in range(max(0, i - c.sliding_window + 1), i + 1)]
        eligible = list(range((i + 1) // m)) if m else []
        if p.indexer is not None and eligible:
            k = min(c.index_topk, len(rows))
            order = sorted(eligible, key=lambda r: -scores[i, r])
            eligible = order[:k]
        keys += [rows[r] for r in eligible]
        K = np.stack(keys)
        s = q[i] @ K.T * c.head_dim**-0.5  # [H, S]
        mx = np.maximum(s.max(-1), sink)
        e = np.exp(s - mx[:, None])
        prob = e / (e.sum(-1) + np.exp(sink - mx))[:, None]
        out[i] = prob @ K
    out = rope(out, np.arange(T), f, inverse=True)
    g = c.o_groups
    og = out.reshape(T, g, -1)
    wa = W(p.wo_a).reshape(g, c.o_lora_rank, -1)
    z = np.einsum("tgc,grc->tgr", og, wa).reshape(T, -1)
    return z @ W(p.wo_b).T
