"""Hugging Face transformers' ``DeepseekV4ForCausalLM`` (CPU, float32) loaded with the same weights as a
dsv4_jax model: the independent reference for the model tests.

Where transformers departs from the official model (ARCHITECTURE.md §13) the dsv4_jax side is switched to
match it, and only there: no FP8 simulation of stored KV rows (row 2), no Hadamard/FP4 simulation in the
indexer (row 5); transformers drops the MTP block (row 12), which is tested through its decoder-layer class.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from dsv4_jax import Config, Model, Numerics
from dsv4_jax.quant import dequantize_full

HF_NUMERICS = Numerics(kv_fp8=False, indexer_fp4=False)


def hf_config(c: Config):
    from transformers import DeepseekV4Config

    types = {"swa": "sliding_attention", "csa": "compressed_sparse_attention", "hca": "heavily_compressed_attention"}
    hca = {r for r in c.compress_ratios if r not in (0, 4)}
    assert len(hca) <= 1, "transformers has one HCA ratio per model"
    rope = None
    if c.rope_scaling is not None:
        ys = c.rope_scaling
        rope = {"rope_type": "yarn", "factor": ys.factor, "beta_fast": ys.beta_fast, "beta_slow": ys.beta_slow,
                "original_max_position_embeddings": ys.original_max_position_embeddings}
    cfg = DeepseekV4Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, moe_intermediate_size=c.moe_intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads, head_dim=c.head_dim,
        q_lora_rank=c.q_lora_rank, num_experts_per_tok=c.num_experts_per_tok, n_routed_experts=c.n_routed_experts,
        routed_scaling_factor=c.routed_scaling_factor, max_position_embeddings=c.max_position_embeddings,
        rope_theta=c.rope_theta, compress_rope_theta=c.compress_rope_theta, hc_mult=c.hc_mult,
        hc_sinkhorn_iters=c.hc_sinkhorn_iters, hc_eps=c.hc_eps, swiglu_limit=c.swiglu_limit,
        sliding_window=c.sliding_window, o_groups=c.o_groups, o_lora_rank=c.o_lora_rank,
        index_n_heads=c.index_n_heads, index_head_dim=c.index_head_dim, index_topk=c.index_topk,
        rms_norm_eps=c.rms_norm_eps,
        layer_types=[types[c.layer_type(i)] for i in range(c.num_hidden_layers)],
        mlp_layer_types=["hash_moe" if c.is_hash_layer(i) else "moe" for i in range(c.num_hidden_layers)],
        compress_rates={"compressed_sparse_attention": 4,
                        "heavily_compressed_attention": hca.pop() if hca else 128},
        partial_rotary_factor=c.qk_rope_head_dim / c.head_dim,
        rope_parameters=rope,
        num_nextn_predict_layers=c.num_nextn_predict_layers,
    )
    cfg._attn_implementation = "eager"
    return cfg


def _t(x) -> torch.Tensor:
    return torch.from_numpy(np.asarray(dequantize_full(x), np.float32).copy())


def _compressor(sd, prefix, p):
    sd[prefix + "kv_proj.weight"] = _t(p.wkv)
    sd[prefix + "gate_proj.weight"] = _t(p.wgate)
    sd[prefix + "position_bias"] = _t(p.ape)
    sd[prefix + "kv_norm.weight"] = _t(p.norm)


def block_state_dict(b, prefix: str) -> dict[str, torch.Tensor]:
    """HF ``DeepseekV4DecoderLayer`` weights of one dsv4_jax ``Block``."""
    sd = {}
    a, f = b.attn, b.ffn
    sd[prefix + "input_layernorm.weight"] = _t(b.attn_norm)
    sd[prefix + "post_attention_layernorm.weight"] = _t(b.ffn_norm)
    for hf, ours in (("attn_hc", "hc_attn"), ("ffn_hc", "hc_ffn")):
        for k in ("fn", "base", "scale"):
            sd[f"{prefix}{hf}.{k}"] = _t(getattr(b, f"{ours}_{k}"))
    s = prefix + "self_attn."
    for hf, w in (("q_a_proj", a.wq_a), ("q_a_norm", a.q_norm), ("q_b_proj", a.wq_b), ("kv_proj", a.wkv),
                  ("kv_norm", a.kv_norm), ("o_a_proj", a.wo_a), ("o_b_proj", a.wo_b)):
        sd[f"{s}{hf}.weight"] = _t(w)
    sd[s + "sinks"] = _t(a.attn_sink)
    if a.compressor is not None:
        _compressor(sd, s + "compressor.", a.compressor)
    if a.indexer is not None:
        i = s + "compressor.indexer."
        _compressor(sd, i, a.indexer.compressor)
        sd[i + "q_b_proj.weight"] = _t(a.indexer.wq_b)
        sd[i + "scorer.weights_proj.weight"] = _t(a.indexer.weights_proj)
    m = prefix + "mlp."
    sd[m + "gate.weight"] = _t(f.gate)
    if f.tid2eid is not None:
        sd[m + "gate.tid2eid"] = torch.from_numpy(np.asarray(f.tid2eid).astype(np.int64))
    else:
        sd[m + "gate.e_score_correction_bias"] = _t(f.bias)
    sd[m + "experts.gate_up_proj"] = torch.cat([_t(f.experts.w1), _t(f.experts.w3)], dim=1)
    sd[m + "experts.down_proj"] = _t(f.experts.w2)
    for hf, w in (("gate_proj", f.shared.w1), ("up_proj", f.shared.w3), ("down_proj", f.shared.w2)):
        sd[f"{m}shared_experts.{hf}.weight"] = _t(w)
    return sd


def hf_model(model: Model):
    """A float32 transformers model holding exactly ``model``'s (dequantised) weights. transformers' config has
    one HCA ratio per model: a configuration with several gets each HCA layer's compressor rebuilt at its own
    ratio (without a cache the ratio only matters inside the compressor)."""
    from transformers import DeepseekV4ForCausalLM
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hfm

    c = model.config
    hca = sorted({r for r in c.compress_ratios[: c.num_hidden_layers] if r not in (0, 4)})

    def with_hca(r):
        return dataclasses.replace(c, compress_ratios=tuple(x if x in (0, 4) else r for x in c.compress_ratios))

    torch.manual_seed(0)
    hf = DeepseekV4ForCausalLM(hf_config(with_hca(hca[0]) if hca else c)).float().eval()
    for i, r in enumerate(c.compress_ratios[: c.num_hidden_layers]):
        if hca and r not in (0, 4, hca[0]):
            hf.model.layers[i].self_attn.compressor = hfm.DeepseekV4HCACompressor(hf_config(with_hca(r))).float()
    p = model.params
    sd = {"model.embed_tokens.weight": _t(p.embed), "lm_head.weight": _t(p.head), "model.norm.weight": _t(p.norm),
          "model.hc_head.hc_fn": _t(p.hc_head_fn), "model.hc_head.hc_base": _t(p.hc_head_base),
          "model.hc_head.hc_scale": _t(p.hc_head_scale)}
    for i, b in enumerate(p.layers):
        sd.update(block_state_dict(b, f"model.layers.{i}."))
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    assert not missing and not unexpected, (missing, unexpected)
    return hf


def hf_like(model: Model) -> Model:
    """``model`` in float32 with the simulations transformers does not have switched off."""
    return dataclasses.replace(model, dtype="float32", numerics=HF_NUMERICS)
