"""The whole forward pass against Hugging Face transformers' DeepseekV4ForCausalLM (CPU, float32, same weights),
plus causality, MTP and dtype properties."""

import dataclasses

import numpy as np
import pytest
import torch
from hf_reference import block_state_dict, hf_like, hf_model

import dsv4_jax as d

CONFIGS = {
    # Flash's structure in miniature: SWA, SWA, CSA, HCA(16), CSA; 2 hash layers; YaRN ramp active.
    "tiny": (d.tiny(), 70),
    # ARCHITECTURE.md §14's second configuration: window 16, top-7, HCA ratio 32, T = 140 so HCA rows and the
    # window wrap-around occur several times.
    "wide": (d.tiny(num_hidden_layers=6, hca_ratio=32, sliding_window=16, index_topk=7, num_hash_layers=2), 140),
}


def _boundary_gap(model, tokens) -> float:
    """Smallest gap, relative to the largest score, between the k-th and (k+1)-th eligible indexer scores of any
    query in any CSA layer. Two fp32 implementations can only be expected to select the same rows when this is
    well above fp32 noise (ARCHITECTURE.md §13 row 6, KERNELS.md §11)."""
    import jax.numpy as jnp

    from dsv4_jax import attention, compressor, hc, indexer, norm
    from dsv4_jax.cache import init_cache
    from dsv4_jax.rope import rope_frequencies

    c = model.config
    b, t = tokens.shape
    streams = d.hidden_streams(model, tokens)
    gap = np.inf
    for layer in range(c.num_hidden_layers):
        if c.layer_type(layer) != "csa":
            continue
        p = model.params.layers[layer]
        x = norm.rms_norm(hc.hc_pre(streams[layer], p.hc_attn_fn, p.hc_attn_scale, p.hc_attn_base, c)[0],
                          p.attn_norm, c.rms_norm_eps)
        lc = init_cache(c, b, t, jnp.float32).layers[layer]
        rows, _ = compressor.compress_step(p.attn.indexer.compressor, lc.index_compressor, lc.index_rows, x,
                                           jnp.zeros(b, jnp.int32), jnp.full(b, t, jnp.int32), 4, c, jnp.float32,
                                           kind="indexer", qat=model.numerics.indexer_fp4)
        pos = jnp.broadcast_to(jnp.arange(t), (b, t))
        qr, _ = attention.queries(p.attn, x, pos, rope_frequencies(c, True), c, jnp.float32)
        q, w = indexer.index_queries(p.attn.indexer, qr, x, pos, c, jnp.float32, qat=model.numerics.indexer_fp4)
        scores = np.asarray(indexer.index_scores(q, w, rows, jnp.float32))
        for bi in range(b):
            for ti in range(t):
                s = np.sort(scores[bi, ti, : (ti + 1) // 4])[::-1]
                if len(s) > c.index_topk:
                    gap = min(gap, (s[c.index_topk - 1] - s[c.index_topk]) / np.abs(scores).max())
    return gap


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_every_layer_match_transformers(name):
    """float32 logits and the residual streams after every block agree with transformers to < 1e-4 (relative
    to the largest value). transformers has no KV FP8 and no indexer Hadamard/FP4 simulation (ARCHITECTURE.md
    §13 rows 2, 5): those two are switched off here and tested against the spec's formulas elsewhere."""
    config, t = CONFIGS[name]
    model = hf_like(d.random_model(config, seed=1))
    hf = hf_model(model)
    tokens = np.random.default_rng(3).integers(0, config.vocab_size, (2, t))
    assert _boundary_gap(model, tokens) > 1e-5, "inputs with an indexer near-tie: pick other random inputs"
    with torch.no_grad():
        out = hf(torch.from_numpy(tokens), use_cache=False, output_hidden_states=True)
    assert _rel(d.forward(model, tokens), out.logits.numpy()) < 1e-4
    ours = d.hidden_streams(model, tokens)
    # transformers records the embedding streams and the outputs of all blocks but the last.
    for layer in range(config.num_hidden_layers):
        assert _rel(ours[layer], out.hidden_states[layer].numpy()) < 1e-4, f"streams entering layer {layer}"


def test_prefix_lengths_match_transformers():
    """Every prefix length crosses a different mix of partial blocks, window wrap and indexer truncation."""
    config, _ = CONFIGS["tiny"]
    model = hf_like(d.random_model(config, seed=3))
    hf = hf_model(model)
    tokens = np.random.default_rng(4).integers(0, config.vocab_size, (1, 40))
    for t in (1, 3, 4, 5, 16, 17, 33, 40):
        with torch.no_grad():
            ref = hf(torch.from_numpy(tokens[:, :t]), use_cache=False).logits.numpy()
        assert _rel(d.forward(model, tokens[:, :t]), ref) < 1e-4, t


def test_simulations_change_the_output():
    """The KV FP8 and indexer FP4 simulations are live: turning either off changes the logits."""
    config, t = CONFIGS["tiny"]
    model = d.random_model(config, seed=5, dtype="float32")
    tokens = np.random.default_rng(6).integers(0, config.vocab_size, (1, t))
    full = np.asarray(d.forward(model, tokens))
    for numerics in (d.Numerics(kv_fp8=False), d.Numerics(indexer_fp4=False)):
        other = np.asarray(d.forward(dataclasses.replace(model, numerics=numerics), tokens))
        assert np.abs(other - full).max() > 1e-3, numerics


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_causality(dtype):
    """Logits at position t do not depend on tokens after t, with several 16-token HCA blocks and CSA rows."""
    config = d.tiny(num_hidden_layers=4, hca_ratio=16, sliding_window=8)
    model = d.random_model(config, seed=7, dtype=dtype)
    rng = np.random.default_rng(8)
    a = rng.integers(0, config.vocab_size, (1, 96))
    cut = 57
    b = a.copy()
    b[:, cut:] = rng.integers(0, config.vocab_size, (1, 96 - cut))
    la, lb = np.asarray(d.forward(model, a)), np.asarray(d.forward(model, b))
    np.testing.assert_array_equal(la[:, :cut], lb[:, :cut])
    assert np.abs(la[:, cut:] - lb[:, cut:]).max() > 0


def test_batch_rows_are_independent():
    config, _ = CONFIGS["tiny"]
    model = d.random_model(config, seed=9, dtype="float32")
    tokens = np.random.default_rng(10).integers(0, config.vocab_size, (3, 24))
    both = np.asarray(d.forward(model, tokens))
    for i in range(3):
        np.testing.assert_allclose(both[i], np.asarray(d.forward(model, tokens[i : i + 1]))[0], rtol=0, atol=1e-5)


def test_bfloat16_tracks_float32():
    """The bf16 compute mode stays close to exact fp32 arithmetic on the same weights (routing flips aside,
    most positions agree to bf16 precision)."""
    config, t = CONFIGS["tiny"]
    model = d.random_model(config, seed=11, dtype="float32")
    tokens = np.random.default_rng(12).integers(0, config.vocab_size, (1, t))
    f32 = np.asarray(d.forward(model, tokens))
    bf16 = np.asarray(d.forward(model.with_dtype("bfloat16"), tokens))
    assert bf16.dtype == np.float32 and bf16.shape == f32.shape
    per_pos = np.abs(bf16 - f32).max(-1) / np.abs(f32).max()
    assert np.median(per_pos) < 0.05


def test_mtp_matches_transformers_block():
    """The MTP head (ARCHITECTURE.md §9.2) against a composition of transformers' own pieces: its decoder-layer
    class (SWA attention, score-routed MoE) and hyper-connection head, with e_proj / h_proj as plain matmuls."""
    from hf_reference import _t, hf_config
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hfm

    config, _ = CONFIGS["tiny"]
    model = hf_like(d.random_model(config, seed=13))
    p, m = model.params, model.params.mtp[0]
    tokens = np.random.default_rng(14).integers(0, config.vocab_size, (2, 30))
    cfg = hf_config(dataclasses.replace(config, num_hidden_layers=config.num_hidden_layers + 1, num_hash_layers=0,
                                        num_nextn_predict_layers=0))
    layer = hfm.DeepseekV4DecoderLayer(cfg, config.num_hidden_layers).float().eval()
    layer.load_state_dict(block_state_dict(m.block, ""), strict=True)
    head = hfm.DeepseekV4HyperHead(cfg).float()
    head.load_state_dict({"hc_fn": _t(m.hc_head_fn), "hc_base": _t(m.hc_head_base), "hc_scale": _t(m.hc_head_scale)})
    rotary = hfm.DeepseekV4RotaryEmbedding(cfg)

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps) * w

    h = torch.from_numpy(np.asarray(d.hidden_streams(model, tokens)[-1]))[:, :-1]
    nxt = torch.from_numpy(tokens[:, 1:])
    e = rms(_t(p.embed)[nxt], _t(m.enorm))
    x = (e @ _t(m.e_proj).T)[:, :, None, :] + rms(h, _t(m.hnorm)) @ _t(m.h_proj).T
    pos = torch.arange(nxt.shape[1])[None]
    mask = hfm.create_sliding_window_causal_mask(config=cfg, inputs_embeds=x[:, :, 0], attention_mask=None,
                                                 cache=None, position_ids=pos)
    with torch.no_grad():
        y = layer(x, input_ids=nxt, position_embeddings={"main": rotary(x, pos, "main")}, position_ids=pos,
                  attention_mask=mask, cache=None)
        ref = rms(head(y), _t(m.norm)) @ _t(p.head).T
    assert _rel(d.forward_mtp(model, tokens), ref.numpy()) < 1e-4


def test_several_mtp_layers_chain_their_depths():
    """Beyond the spec's one MTP layer, DeepSeek-V3's sequential MTP: depth j combines depth j-1's output
    streams at position i with the embedding of token i+j+1. Depth 0 is the one-layer model's MTP; depth 1 has
    T-2 rows, and its row i changes with token i+2 but with no later token."""
    c1 = d.tiny(vocab_size=200)
    c2 = dataclasses.replace(c1, num_nextn_predict_layers=2, compress_ratios=c1.compress_ratios + (0,))
    m2 = d.random_model(c2, seed=3)
    m1 = dataclasses.replace(m2, config=c1, params=dataclasses.replace(m2.params, mtp=m2.params.mtp[:1]))
    tokens = np.random.default_rng(8).integers(0, 200, (2, 11))
    out = d.forward_mtp(m2, tokens)
    assert isinstance(out, tuple) and [o.shape for o in out] == [(2, 10, 200), (2, 9, 200)]
    assert _rel(out[0], np.asarray(d.forward_mtp(m1, tokens))) < 1e-6
    k = 6
    changed = tokens.copy()
    changed[:, k] = (changed[:, k] + 17) % 200
    deep, deep_changed = np.asarray(out[1]), np.asarray(d.forward_mtp(m2, changed)[1])
    assert _rel(deep_changed[:, : k - 2], deep[:, : k - 2]) < 1e-6  # rows before k - 2 see tokens < k only
    assert _rel(deep_changed[:, k - 2], deep[:, k - 2]) > 1e-3  # row k - 2 embeds token k
    with pytest.raises(ValueError, match="needs at least 3 tokens"):
        d.forward_mtp(m2, tokens[:, :2])


def test_flash_parameter_count():
    """ARCHITECTURE.md §1: 284.33B parameters without MTP and 6.61B in MTP, from abstract shapes only."""
    import jax

    shapes = jax.eval_shape(lambda k: d.init_params(d.FLASH, k), jax.random.key(0))
    assert round(d.count_params(shapes) / 1e9, 2) == 284.33
    assert round(d.count_params(shapes, mtp=True) / 1e9, 2) == 6.61


def test_bad_tokens_are_refused():
    config, _ = CONFIGS["tiny"]
    model = d.random_model(config, seed=0)
    with pytest.raises(ValueError, match="batch, time"):
        d.forward(model, np.zeros(5, np.int32) + 3)
    with pytest.raises(TypeError, match="integers"):
        d.forward(model, np.ones((1, 3), np.float32))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        d.forward(model, np.ones((1, config.max_position_embeddings + 1), np.int32))
    v = config.vocab_size
    for bad in ([[5, v]], [[-1, 5]]):  # the embedding lookup would clamp them silently
        with pytest.raises(ValueError, match=rf"token ids must be in \[0, {v}\)"):
            d.forward(model, bad)
        with pytest.raises(ValueError, match="token ids"):
            d.forward_mtp(model, bad)
    with pytest.raises(ValueError, match="at least one token"):
        d.forward(model, np.zeros((1, 0), np.int32))


def test_hidden_size_not_a_multiple_of_32_gets_nvfp4_mtp_experts():
    """MXFP4 has 32-wide blocks: with hidden_size 80 the MTP experts are NVFP4 (forward_mtp runs), an explicit
    MXFP4 request is refused, and Format Q (MXFP4 MTP experts by definition) refuses to save it."""
    config = d.tiny(hidden_size=80, vocab_size=200)
    model = d.random_model(config, seed=0)
    tokens = np.random.default_rng(0).integers(0, 200, (1, 12))
    assert np.isfinite(np.asarray(d.forward_mtp(model, tokens))).all()
    with pytest.raises(ValueError, match="multiple of 32"):
        d.random_model(config, seed=0, expert_format="mxfp4")
    with pytest.raises(ValueError, match="MXFP4 experts are required"):
        d.save_checkpoint(model, "/nonexistent-dsv4-dir/ck", format="modelopt-nvfp4")
