"""Config: the Flash preset, reading config.json, and clear errors on missing or inconsistent keys."""

import json

import pytest

import dsv4_jax as d
from dsv4_jax.config import ConfigError

# ARCHITECTURE.md §1.1 / CHECKPOINT.md §3.2, as the real config.json spells it.
FLASH_JSON = {
    "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "torch_dtype": "bfloat16",
    "vocab_size": 129280, "hidden_size": 4096, "num_hidden_layers": 43, "num_nextn_predict_layers": 1,
    "num_attention_heads": 64, "num_key_value_heads": 1, "head_dim": 512, "qk_rope_head_dim": 64,
    "q_lora_rank": 1024, "o_groups": 8, "o_lora_rank": 1024, "n_routed_experts": 256, "n_shared_experts": 1,
    "num_experts_per_tok": 6, "moe_intermediate_size": 2048, "num_hash_layers": 3, "scoring_func": "sqrtsoftplus",
    "topk_method": "noaux_tc", "norm_topk_prob": True, "routed_scaling_factor": 1.5, "swiglu_limit": 10.0,
    "hidden_act": "silu", "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512, "sliding_window": 128,
    "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rope_theta": 10000, "compress_rope_theta": 160000,
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32,
                     "beta_slow": 1},
    "max_position_embeddings": 1048576, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "bos_token_id": 0,
    "eos_token_id": 1, "expert_dtype": "fp4",
    "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0],
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
}


def test_flash_json_gives_the_flash_preset(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(FLASH_JSON))
    c = d.Config.from_json(tmp_path)
    assert c == d.FLASH
    assert [c.layer_type(i) for i in range(4)] == ["swa", "swa", "csa", "hca"]
    assert c.layer_type(42) == "csa" and c.layer_type(43) == "swa"  # layer 42 is CSA; index 43 is MTP
    types = [c.layer_type(i) for i in range(43)]
    assert (types.count("swa"), types.count("csa"), types.count("hca")) == (2, 21, 20)
    assert [c.is_hash_layer(i) for i in range(4)] == [True, True, True, False]
    assert c.mix_hc == 24


def test_compress_ratios_may_leave_out_the_mtp_layers(tmp_path):
    """CHECKPOINT.md §7.2.3: ``len(compress_ratios)`` is the main layers' count or that plus the MTP layers';
    ``Config.from_json`` reads both (the MTP entry is 0), as ``load_model`` does."""
    (tmp_path / "config.json").write_text(json.dumps(dict(FLASH_JSON, compress_ratios=[0, 0] + [4, 128] * 20 + [4])))
    assert d.Config.from_json(tmp_path) == d.FLASH
    two = dict(FLASH_JSON, num_nextn_predict_layers=2, compress_ratios=[0, 0] + [4, 128] * 20 + [4])
    assert d.Config.from_dict(two).compress_ratios == d.FLASH.compress_ratios + (0,)
    with pytest.raises(ConfigError, match="compress_ratios"):  # any other length is still refused
        d.Config.from_dict(dict(FLASH_JSON, compress_ratios=[0, 0] + [4, 128] * 20))


def test_round_trip_through_dict():
    for c in (d.FLASH, d.tiny(), d.tiny(mtp=False, hca_ratio=32), d.tiny(eos_token_id=(1, 7))):
        assert d.Config.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_several_eos_ids_are_kept():
    """``eos_token_id`` may be a list in a config.json (transformers' schema): every id is kept (generation
    stops on any, test_generation.py), a one-element list is that id, an empty list is refused."""
    assert d.Config.from_dict(dict(FLASH_JSON, eos_token_id=[1, 7])).eos_token_id == (1, 7)
    assert d.Config.from_dict(dict(FLASH_JSON, eos_token_id=[3])).eos_token_id == 3
    with pytest.raises(d.ConfigError, match="eos_token_id"):
        d.Config.from_dict(dict(FLASH_JSON, eos_token_id=[]))


def test_missing_key_is_named():
    bad = dict(FLASH_JSON)
    del bad["index_topk"]
    with pytest.raises(ConfigError, match="'index_topk'"):
        d.Config.from_dict(bad)


@pytest.mark.parametrize("key,value,match", [
    ("compress_ratios", [0, 4], "compress_ratios"),
    ("compress_ratios", [0, 0] + [4, 128] * 20 + [4, 4], "MTP"),
    ("scoring_func", "softmax", "scoring_func"),
    ("num_experts_per_tok", 300, "num_experts_per_tok"),
    ("hidden_size", "4096x", "hidden_size"),
    ("norm_topk_prob", "yes", "norm_topk_prob"),
    ("num_attention_heads", 60, "o_groups"),
    ("rope_scaling", {"type": "linear", "factor": 2}, "rope_scaling"),
    ("head_dim", 500, "head_dim"),
    ("num_attention_heads", 4.7, "num_attention_heads.*fraction"),
    ("num_attention_heads", "64", "num_attention_heads.*integer"),
    ("hc_mult", True, "hc_mult.*integer"),
    ("n_routed_experts", 255.99, "n_routed_experts"),
    ("num_experts_per_tok", 2.9, "num_experts_per_tok"),
    ("sliding_window", 127.5, "sliding_window"),
    ("compress_ratios", [0, 0] + [4, 128.5] * 20 + [4, 0], "compress_ratios"),
    ("rope_theta", "10000", "rope_theta.*number"),
    ("scoring_func", 7, "scoring_func.*string"),
])
def test_inconsistent_key_is_named(key, value, match):
    bad = dict(FLASH_JSON, **{key: value})
    with pytest.raises(ConfigError, match=match):
        d.Config.from_dict(bad)


def test_integral_numbers_are_integers():
    """JSON writers may print an integer as 4096.0: an integral number is accepted for an integer key."""
    c = d.Config.from_dict(dict(FLASH_JSON, hidden_size=4096.0, compress_ratios=[float(r) for r in
                                                                                 FLASH_JSON["compress_ratios"]]))
    assert c == d.Config.from_dict(FLASH_JSON) and isinstance(c.hidden_size, int)


def test_unreadable_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        d.Config.from_json(tmp_path / "nope.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        d.Config.from_json(tmp_path / "config.json")


def test_tiny_has_flash_structure():
    c = d.tiny()
    types = [c.layer_type(i) for i in range(c.num_hidden_layers)]
    assert types[:2] == ["swa", "swa"] and "csa" in types and "hca" in types
    assert c.num_hash_layers >= 1 and c.num_hash_layers < c.num_hidden_layers
    assert c.num_nextn_predict_layers == 1 and c.layer_type(c.num_hidden_layers) == "swa"


def test_tiny_with_one_layer_hashes_that_layer_only():
    c = d.tiny(num_hidden_layers=1)
    assert (c.num_hidden_layers, c.num_hash_layers, c.compress_ratios) == (1, 1, (0, 0))
    with pytest.raises(d.ConfigError, match="num_hash_layers"):
        d.tiny(num_hidden_layers=1, num_hash_layers=2)


def test_transformers_config_schema_is_read():
    """transformers folds compress_ratios / num_hash_layers / qk_rope_head_dim / rope_scaling into layer_types,
    mlp_layer_types, partial_rotary_factor and rope_parameters; such a config.json reads to the same model
    (without the MTP layer, which transformers does not have)."""
    import dataclasses

    from hf_reference import hf_config

    c = d.tiny(hca_ratio=32, num_hash_layers=1)
    got = d.Config.from_dict(hf_config(c).to_dict())
    assert got == dataclasses.replace(c, num_nextn_predict_layers=0, compress_ratios=c.compress_ratios[:-1])
