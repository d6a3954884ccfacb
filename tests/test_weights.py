"""The weight-mapping layer against the spec's tensor table (CHECKPOINT.md §6) and the number-format
conversions against ModelOpt's own code (nvidia-modelopt's NVFP4 quantiser and MXFP4 -> NVFP4 cast
helpers, on CPU)."""

import sys
import types

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import dsv4_jax as d
from dsv4_jax import quant, weights
from dsv4_jax.quant import Mxfp4
from dsv4_jax.safetensors_io import MixedExpertEncoding, TensorInfo, UnsupportedConfig


@pytest.fixture(scope="module")
def modelopt():
    """ModelOpt's NVFP4 tensor class and numeric helpers (``import modelopt.torch`` needs ``requests``, which
    only its dataset downloads use: a stub stands in when it is not installed)."""
    torch = pytest.importorskip("torch")
    if "requests" not in sys.modules:
        try:
            import requests  # noqa: F401
        except ImportError:
            sys.modules["requests"] = types.ModuleType("requests")
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor
    from modelopt.torch.quantization.utils import numeric_utils

    return torch, NVFP4QTensor, numeric_utils


def _count(config, expert_format):
    """Tensors of a checkpoint: FP8 linears are weight + scale; experts per format; MTP experts MXFP4."""
    n = 0
    for e in weights.entry_leaves(config):
        if e.kind in ("float", "index"):
            n += 1
        elif e.kind == "linear":
            n += 2
        else:
            fmt = expert_format if e.path[0] == "layers" else "mxfp4"
            n += e.shape[0] * (4 if fmt == "nvfp4" else 2)
    return n


def test_table_reproduces_the_flash_tensor_counts():
    """CHECKPOINT.md §3.1 / §5.7: 69,187 tensors in the native release, 135,235 in the NVFP4 one."""
    assert _count(d.FLASH, "mxfp4") == 69_187
    assert _count(d.FLASH, "nvfp4") == 135_235


def test_table_lines_up_with_the_parameter_tree():
    config = d.tiny()
    params = jax.eval_shape(lambda k: d.init_params(config, k), jax.random.key(0))
    leaves = jax.tree.leaves(params, is_leaf=weights.is_weight)
    entries = weights.entry_leaves(config)
    assert len(leaves) == len(entries)
    for e, leaf in zip(entries, leaves):
        shape = quant.logical_shape(leaf) if weights.is_weight(leaf) else leaf.shape
        assert tuple(shape) == e.shape, e.label
    names = {e.name for e in entries}
    assert {
        "embed.weight",
        "layers.2.attn.indexer.compressor.ape",
        "layers.0.ffn.gate.tid2eid",
        "mtp.0.ffn.experts.{}.w2",
        "mtp.0.e_proj",
        "layers.3.attn.compressor.norm.weight",
    } <= names


def test_hf_names():
    assert weights.tensor_name("embed.weight", "hf") == "model.embed_tokens.weight"
    assert weights.tensor_name("head.weight", "hf") == "head.weight"
    assert weights.tensor_name("layers.3.attn.kv_norm.weight", "hf") == "model.layers.3.attn.norm.weight"
    assert weights.tensor_name("layers.3.attn.compressor.norm.weight", "hf") == (
        "model.layers.3.attn.compressor.norm.weight"
    )
    assert (
        weights.tensor_name("layers.3.ffn.experts.7.w1.weight", "hf")
        == "model.layers.3.ffn.experts.7.w1.weight"
    )


def test_hf_config_round_trip():
    config = d.tiny(num_hidden_layers=6, hca_ratio=32, num_hash_layers=3)
    back = weights.config_from_hf(weights.hf_config(config), "config.json")
    want = d.Config(
        **{**config.__dict__, "num_nextn_predict_layers": 0, "compress_ratios": config.compress_ratios[:6]}
    )
    assert back == want


@pytest.mark.parametrize("key, value, match", [
    ("layer_types", 5, "'layer_types' must be a list of layer type names"),
    ("mlp_layer_types", ["moe", 3], "'mlp_layer_types' must be a list"),
    ("compress_rates", [4, 16], "'compress_rates' must be an object"),
    ("rope_parameters", "x", "'rope_parameters' must be an object"),
    ("rope_parameters", {"main": {}, "compress": []}, r"'rope_parameters.compress' must be an object"),
    ("rope_parameters", {"main": {}, "compress": {"rope_type": "linear", "rope_theta": 1e4}},
     "'rope_parameters.compress.rope_type' is 'linear'"),
    ("qk_rope_head_dim", 8, r"'qk_rope_head_dim' is 8 but 'head_dim' x 'partial_rotary_factor' = \d+"),
])
def test_hf_config_of_the_wrong_shape_is_refused_by_key(key, value, match):
    """A transformers config.json whose layer lists or rope parameters have the wrong JSON type, or a rope
    scaling the compressed layers do not take, is refused naming the key (not a TypeError, not ignored)."""
    hf = {**weights.hf_config(d.tiny(num_hidden_layers=4)), key: value}
    with pytest.raises(UnsupportedConfig, match=match):
        weights.config_from_hf(hf, "config.json")


def _info(name, dtype, shape):
    return name, TensorInfo(name, dtype, tuple(shape), 0, 0)


def test_hf_config_without_layer_types_is_refused_by_key():
    hf = {k: v for k, v in weights.hf_config(d.tiny(num_hidden_layers=4)).items()
          if k not in ("layer_types", "compress_ratios")}
    with pytest.raises(UnsupportedConfig, match="config.json: missing key 'layer_types'"):
        weights.config_from_hf(hf, "config.json")


def test_expert_format_is_decided_per_tensor_from_keys_and_dtypes():
    """Main-layer experts as NVFP4 quartets and MTP experts as MXFP4 pairs in one checkpoint (§5.7); a
    partial quartet or a quartet plus '.scale' is refused."""
    config = d.tiny(num_hidden_layers=1, n_routed_experts=2, num_hash_layers=0)
    i, dim = config.moe_intermediate_size, config.hidden_size
    by = {e.name: e for e in weights.entry_leaves(config)}
    infos = {}
    for e in range(2):
        infos.update(
            [
                _info(f"layers.0.ffn.experts.{e}.w1.weight", "U8", (i, dim // 2)),
                _info(f"layers.0.ffn.experts.{e}.w1.weight_scale", "F8_E4M3", (i, dim // 16)),
                _info(f"layers.0.ffn.experts.{e}.w1.weight_scale_2", "F32", ()),
                _info(f"layers.0.ffn.experts.{e}.w1.input_scale", "F32", (1,)),
                _info(f"mtp.0.ffn.experts.{e}.w1.weight", "I8", (i, dim // 2)),
                _info(f"mtp.0.ffn.experts.{e}.w1.scale", "F8_E8M0", (i, dim // 32)),
            ]
        )
    where = str
    assert weights.resolve(by["layers.0.ffn.experts.{}.w1"], infos, "native", where).format == "nvfp4"
    assert weights.resolve(by["mtp.0.ffn.experts.{}.w1"], infos, "native", where).format == "mxfp4"
    bad = dict(infos)
    del bad["layers.0.ffn.experts.1.w1.input_scale"]
    with pytest.raises(MixedExpertEncoding, match=r"layers\.0\.ffn\.experts\.1\.w1.*input_scale"):
        weights.resolve(by["layers.0.ffn.experts.{}.w1"], bad, "native", where)
    bad = dict(infos)
    bad.update([_info("layers.0.ffn.experts.0.w1.scale", "F8_E8M0", (i, dim // 32))])
    with pytest.raises(MixedExpertEncoding, match=r"layers\.0\.ffn\.experts\.0\.w1"):
        weights.resolve(by["layers.0.ffn.experts.{}.w1"], bad, "native", where)


def _hard_matrix(rng, shape, dtype=np.float32):
    """Random rows whose 16-blocks span 1e-30 .. 1e30 relative to each other, with all-zero blocks, a block of
    fp32 subnormals, exact E2M1 ties after scaling and negative zeros."""
    w = rng.standard_normal(shape).astype(np.float32)
    mag = 10.0 ** rng.uniform(-30, 30, (*shape[:-1], shape[-1] // 16))
    w *= np.repeat(mag, 16, axis=-1).astype(np.float32)
    w[rng.random(mag.shape).repeat(16, -1) < 0.1] = 0
    w[..., 0, :16] = 0
    w[..., 0, 16] = -0.0
    w[..., 1, 16:32] = 1e-39
    return w.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_nvfp4_quantiser_matches_modelopt_bit_for_bit(modelopt, dtype):
    """quantize_nvfp4 == NVFP4QTensor.quantize (codes, e4m3 block scales, global scale), for ordinary normal
    weights and for matrices with zero blocks, tiny and huge blocks; and with a global scale shared by w1/w3
    (ModelOpt given the fused amax's scale)."""
    torch, NVFP4QTensor, _ = modelopt
    rng = np.random.default_rng(0)
    cases = [(rng.standard_normal((64, 256)) * 0.02).astype(dtype)] + [
        _hard_matrix(rng, (32, 256), dtype) for _ in range(6)
    ]
    for w in cases:
        t = torch.from_numpy(w.astype(np.float32)).to(
            torch.bfloat16 if dtype != np.float32 else torch.float32
        )
        ref, ref_s, ref_g = NVFP4QTensor.quantize(t, 16)
        got = quant.quantize_nvfp4(w)
        np.testing.assert_array_equal(np.asarray(got.weight), ref._quantized_data.numpy())
        np.testing.assert_array_equal(
            np.asarray(got.weight_scale).view(np.uint8), ref_s.view(torch.uint8).numpy()
        )
        assert np.asarray(got.weight_scale_2).tobytes() == ref_g.numpy().astype(np.float32).tobytes()
    w1, w3 = (rng.standard_normal((2, 32, 128)).astype(np.float32) * s for s in (1.0, 3.0))
    g = quant.nvfp4_global_scale(w1, w3)
    q1, q3 = quant.quantize_nvfp4(w1, g), quant.quantize_nvfp4(w3, g)
    np.testing.assert_array_equal(np.asarray(q1.weight_scale_2), np.asarray(q3.weight_scale_2))
    for e in range(2):
        fused = torch.tensor(max(np.abs(w1[e]).max(), np.abs(w3[e]).max())) / 2688.0
        for w, q in ((w1, q1), (w3, q3)):
            ref, ref_s, ref_g = NVFP4QTensor.quantize(
                torch.from_numpy(w[e]), 16, weights_scaling_factor_2=fused
            )
            np.testing.assert_array_equal(np.asarray(q.weight[e]), ref._quantized_data.numpy())
            np.testing.assert_array_equal(
                np.asarray(q.weight_scale[e]).view(np.uint8), ref_s.view(torch.uint8).numpy()
            )
            assert np.asarray(q.weight_scale_2[e]) == ref_g.numpy()


def test_nvfp4_quantiser_all_zero_matrix_encodes_zeros():
    """The one deliberate departure from ModelOpt (which yields NaN block scales): finite, zero codes."""
    q = quant.quantize_nvfp4(np.zeros((4, 32), np.float32))
    assert float(q.weight_scale_2) == 1.0
    assert not np.asarray(q.weight).any()
    np.testing.assert_array_equal(np.asarray(quant.dequantize_full(q)), 0)


def _random_mxfp4(rng, shape, k_spread):
    """Random MXFP4 ``[..., out, in]``: random codes (including -0), exponents 127-k_spread..127+3, and some
    all-zero blocks (byte 0, zero codes) as MXFP4 quantisers emit them."""
    inn = shape[-1]
    codes = rng.integers(0, 16, shape, dtype=np.uint8)
    scale = rng.integers(127 - k_spread, 131, (*shape[:-1], inn // 32)).astype(np.uint8)
    zero = rng.random(scale.shape) < 0.1
    scale[zero] = 0
    codes[np.repeat(zero, 32, axis=-1)] = 0
    packed = np.asarray(quant.pack_nibbles(jnp.asarray(codes)))
    return Mxfp4(packed, scale.view(ml_dtypes.float8_e8m0fnu))


def test_mxfp4_to_nvfp4_cast_is_lossless_and_matches_modelopt(modelopt):
    """CHECKPOINT.md §5.4: the cast keeps every value (float32 dequantisation identical), w1/w3 share 2^m, and
    the bytes equal ModelOpt's cast (numeric_utils' closed-form amax + NVFP4QTensor.quantize with those
    scales), including all-zero blocks (block scale 2^-9) and -0 codes (re-encoded +0)."""
    torch, NVFP4QTensor, nu = modelopt
    rng = np.random.default_rng(3)
    w1, w3 = _random_mxfp4(rng, (3, 32, 256), 6), _random_mxfp4(rng, (3, 32, 256), 12)
    q1, q3 = weights.cast_mxfp4_to_nvfp4(w1, w3)
    np.testing.assert_array_equal(np.asarray(q1.weight_scale_2), np.asarray(q3.weight_scale_2))
    for w, q in ((w1, q1), (w3, q3)):
        np.testing.assert_array_equal(
            np.asarray(quant.dequantize_full(q)), np.asarray(quant.dequantize_full(w))
        )
    for e in range(3):
        e8 = [torch.from_numpy(np.asarray(w.scale[e]).view(np.uint8).copy()) for w in (w1, w3)]
        k_max = max(nu.mxfp4_to_nvfp4_global_amax(s)[1]["k_max"] for s in e8)
        g = torch.tensor(2.0 ** (k_max - 8), dtype=torch.float32)
        for w, q, s in ((w1, q1, e8[0]), (w3, q3, e8[1])):
            blocks = torch.from_numpy(np.asarray(w.weight[e]).reshape(32, -1, 16).copy())
            amax = nu.mxfp4_to_nvfp4_per_block_amax(blocks, s)
            bs = (amax / (6.0 * g)).clamp(min=2**-9, max=448.0).to(torch.float8_e4m3fn)
            x = torch.from_numpy(
                np.array(quant.dequantize_full(jax.tree.map(lambda a, e=e: a[e], w)))
            ).bfloat16()
            ref, ref_s, _ = NVFP4QTensor.quantize(x, 16, bs, g)
            np.testing.assert_array_equal(np.asarray(q.weight[e]), ref._quantized_data.numpy())
            np.testing.assert_array_equal(
                np.asarray(q.weight_scale[e]).view(np.uint8), ref_s.view(torch.uint8).numpy()
            )
            assert float(q.weight_scale_2[e]) == float(g)
