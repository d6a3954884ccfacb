"""Checkpoint loading and saving (CHECKPOINT.md): round trips in the three layouts, Format N vs Format Q,
files written by (and read by) Hugging Face transformers, every §7 failure, the orbax cache and
expert-parallel loading."""

import dataclasses
import json
import os
import runpy
import shutil
import struct
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

import dsv4_jax as d
from dsv4_jax import checkpoint as ck
from dsv4_jax import safetensors_io as st
from dsv4_jax.quant import Mxfp4, Nvfp4, dequantize_full
from dsv4_jax.weights import is_weight

ROOT = Path(__file__).resolve().parents[1]
CONFIG = d.tiny(num_hidden_layers=4)  # SWA, SWA, CSA, HCA; hash layers 0-1; one MTP block
SMALL_SHARDS = 192 << 10  # several shards


@pytest.fixture(scope="module")
def model_q():
    """NVFP4 routed experts in the main layers, MXFP4 in the MTP block (as the NVFP4 release)."""
    return d.random_model(CONFIG, seed=1, dtype="float32")


@pytest.fixture(scope="module")
def model_n():
    """MXFP4 routed experts everywhere (as the original release)."""
    return d.random_model(CONFIG, seed=2, dtype="float32", expert_format="mxfp4")


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(3).integers(0, CONFIG.vocab_size, (2, 37))


@pytest.fixture(scope="module")
def ckpt_q(model_q, tmp_path_factory):
    return ck.save_checkpoint(model_q, tmp_path_factory.mktemp("q") / "ckpt", max_shard_bytes=SMALL_SHARDS)


def _load(path, **kw):
    return ck.load_model(path, dtype="float32", progress=False, **kw)


def _bytes(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view(np.uint8) if a.dtype.itemsize == 1 else a


def assert_same_params(a, b):
    """Same tree, same number formats, same dtypes, same bits."""
    la, lb = jax.tree.leaves(a, is_leaf=is_weight), jax.tree.leaves(b, is_leaf=is_weight)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        assert type(x) is type(y)
        for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
            assert u.dtype == v.dtype and u.shape == v.shape
            np.testing.assert_array_equal(_bytes(u), _bytes(v))


def _snapshot(path: Path) -> dict:
    return {
        str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))
    }


def _headers(path: Path) -> dict[str, st.TensorInfo]:
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in st.read_header(f)[0].items()}


def test_modelopt_nvfp4_round_trip(model_q, ckpt_q, tokens):
    """Format Q as CHECKPOINT.md §5 specifies it, and back: identical parameters and float32 logits."""
    files = sorted(os.listdir(ckpt_q))
    n = len([f for f in files if f.endswith(".safetensors")])
    assert n > 1 and files == ["config.json", "hf_quant_config.json"] + [
        f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)
    ] + ["model.safetensors.index.json"]
    manifest = (ckpt_q / "hf_quant_config.json").read_text()
    layers = sorted(f"layers.{i}.ffn.experts" for i in range(CONFIG.num_hidden_layers))
    assert manifest == json.dumps(
        {
            "producer": {"name": "modelopt", "version": "dsv4-nvfp4-experts"},
            "quantization": {
                "quant_algo": "MIXED_PRECISION",
                "kv_cache_quant_algo": None,
                "group_size": 16,
                "quantized_layers": {m: {"quant_algo": "NVFP4", "group_size": 16} for m in layers},
                "exclude_modules": ["*.attn.*", "*.ffn.shared_experts.*", "head", "mtp.*"],
            },
        },
        indent=2,
    )
    text = (ckpt_q / "config.json").read_text()
    cfg = json.loads(text)
    assert text == json.dumps(cfg, indent=2, sort_keys=True) + "\n"
    q = cfg["quantization_config"]
    assert (q["quant_method"], q["fmt"], q["scale_fmt"], q["weight_block_size"]) == (
        "fp8",
        "e4m3",
        "ue8m0",
        [128, 128],
    )
    assert (q["moe_quant_algo"], q["quant_algo"], q["group_size"]) == ("NVFP4", "MIXED_PRECISION", 16)
    assert (
        q["ignore"] == ["*.attn.*", "*.ffn.shared_experts.*", "head", "mtp.*"] and "exclude_modules" not in q
    )
    assert cfg["expert_dtype"] == "fp4" and cfg["compress_ratios"] == list(CONFIG.compress_ratios)
    h = _headers(ckpt_q)
    index = json.loads((ckpt_q / st.INDEX).read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in h.values()) and set(
        index["weight_map"]
    ) == set(h)
    i, dim = CONFIG.moe_intermediate_size, CONFIG.hidden_size
    got = {
        k: (h[k].dtype, list(h[k].shape))
        for k in h
        if k.startswith(("layers.3.ffn.experts.5.w1", "mtp.0.ffn.experts.5.w2", "layers.3.attn.wq_a"))
    }
    assert got == {
        "layers.3.ffn.experts.5.w1.weight": ("U8", [i, dim // 2]),
        "layers.3.ffn.experts.5.w1.weight_scale": ("F8_E4M3", [i, dim // 16]),
        "layers.3.ffn.experts.5.w1.weight_scale_2": ("F32", []),
        "layers.3.ffn.experts.5.w1.input_scale": ("F32", []),
        "mtp.0.ffn.experts.5.w2.weight": ("I8", [dim, i // 2]),
        "mtp.0.ffn.experts.5.w2.scale": ("F8_E8M0", [dim, i // 32]),
        "layers.3.attn.wq_a.weight": ("F8_E4M3", [CONFIG.q_lora_rank, dim]),
        "layers.3.attn.wq_a.scale": ("F8_E8M0", [1, 1]),
    }
    assert (
        h["layers.0.ffn.gate.tid2eid"].dtype == "I64"
        and h["layers.2.attn.indexer.compressor.ape"].dtype == "F32"
    )
    loaded = _load(ckpt_q)
    assert loaded.config == CONFIG
    assert_same_params(loaded.params, model_q.params)
    np.testing.assert_array_equal(
        np.asarray(d.forward(loaded, tokens)), np.asarray(d.forward(model_q, tokens))
    )
    np.testing.assert_array_equal(
        np.asarray(d.forward_mtp(loaded, tokens)), np.asarray(d.forward_mtp(model_q, tokens))
    )


def test_native_round_trip_and_format_n_vs_q_logits(model_n, tokens, tmp_path):
    """Format N round-trips exactly; the same weights written as Format Q (MXFP4 cast losslessly to NVFP4,
    §5.4; MTP experts left MXFP4) give the same dequantised experts and identical float32 logits."""
    n = ck.save_checkpoint(model_n, tmp_path / "n", "native", max_shard_bytes=SMALL_SHARDS)
    assert not (n / "hf_quant_config.json").exists()
    assert "moe_quant_algo" not in json.loads((n / "config.json").read_text())["quantization_config"]
    assert _headers(n)["layers.1.ffn.experts.0.w3.weight"].dtype == "I8"
    from_n = _load(n)
    assert_same_params(from_n.params, model_n.params)
    q = ck.save_checkpoint(model_n, tmp_path / "q", max_shard_bytes=SMALL_SHARDS)
    from_q = _load(q)
    for a, b in zip(from_q.params.layers, from_n.params.layers):
        for w in ("w1", "w2", "w3"):
            qa, nb = getattr(a.ffn.experts, w), getattr(b.ffn.experts, w)
            assert isinstance(qa, Nvfp4) and isinstance(nb, Mxfp4)
            np.testing.assert_array_equal(np.asarray(dequantize_full(qa)), np.asarray(dequantize_full(nb)))
        np.testing.assert_array_equal(
            np.asarray(a.ffn.experts.w1.weight_scale_2), np.asarray(a.ffn.experts.w3.weight_scale_2)
        )
    assert isinstance(from_q.params.mtp[0].block.ffn.experts.w1, Mxfp4)
    np.testing.assert_array_equal(
        np.asarray(d.forward(from_q, tokens)), np.asarray(d.forward(from_n, tokens))
    )


def test_hf_layout_round_trip(model_q, tokens, tmp_path):
    """transformers' layout: quantised weights come back dequantised (exactly, fp32), the rest as stored, no
    MTP; float32 logits identical to the quantised model's."""
    p = ck.save_checkpoint(model_q, tmp_path / "hf", "hf")
    assert sorted(os.listdir(p)) == ["config.json", "model.safetensors"]
    loaded = _load(p)
    assert loaded.config == dataclasses.replace(
        CONFIG, num_nextn_predict_layers=0, compress_ratios=CONFIG.compress_ratios[:-1]
    )
    want = jax.tree.map(
        lambda w: dequantize_full(w) if is_weight(w) else w,
        dataclasses.replace(model_q.params, mtp=()),
        is_leaf=is_weight,
    )
    assert_same_params(loaded.params, want)
    np.testing.assert_array_equal(
        np.asarray(d.forward(loaded, tokens)), np.asarray(d.forward(model_q, tokens))
    )


def test_transformers_interoperability(model_q, tokens, tmp_path):
    """A transformers DeepseekV4ForCausalLM saved with save_pretrained loads and reproduces transformers'
    logits; the "hf" writer produces exactly save_pretrained's tensor names, and transformers' from_pretrained
    reads it back to the same logits."""
    torch = pytest.importorskip("torch")
    from hf_reference import hf_like, hf_model
    from transformers import DeepseekV4ForCausalLM

    ref_model = hf_like(model_q)
    hf = hf_model(ref_model)
    with torch.no_grad():
        want = hf(torch.from_numpy(tokens), use_cache=False).logits.numpy()
    hf.save_pretrained(tmp_path / "by_transformers")
    loaded = _load(tmp_path / "by_transformers")
    assert loaded.config == dataclasses.replace(
        CONFIG, num_nextn_predict_layers=0, compress_ratios=CONFIG.compress_ratios[:-1]
    )
    got = np.asarray(d.forward(dataclasses.replace(loaded, numerics=ref_model.numerics), tokens))
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
    np.testing.assert_array_equal(got, np.asarray(d.forward(ref_model, tokens)))

    ours = ck.save_checkpoint(model_q, tmp_path / "by_us", "hf")
    assert set(_headers(ours)) == set(_headers(tmp_path / "by_transformers"))
    back = DeepseekV4ForCausalLM.from_pretrained(ours, dtype=torch.float32).eval()
    back.config._attn_implementation = "eager"
    with torch.no_grad():
        again = back(torch.from_numpy(tokens), use_cache=False).logits.numpy()
    assert np.abs(again - want).max() / np.abs(want).max() < 1e-5


def test_native_experts_mixing_i8_and_u8_codes_load_exactly(model_n, tokens, tmp_path):
    """§7.3: each packed MXFP4 weight may be I8 or U8; one expert's codes relabelled U8 among I8 siblings
    load to the same parameters (not a widened stack)."""
    n = ck.save_checkpoint(model_n, tmp_path / "n", "native", max_shard_bytes=SMALL_SHARDS)
    name = "layers.1.ffn.experts.3.w1.weight"
    assert _headers(n)[name].dtype == "I8"
    _rewrite_shard(n, name, lambda t: t.__setitem__(name, t[name].view(np.uint8)))
    assert _headers(n)[name].dtype == "U8" and _headers(n)["layers.1.ffn.experts.2.w1.weight"].dtype == "I8"
    loaded = _load(n)
    assert_same_params(loaded.params, model_n.params)
    np.testing.assert_array_equal(np.asarray(d.forward(loaded, tokens)), np.asarray(d.forward(model_n, tokens)))


# ---------------------------------------------------------------------------------------------------------
# §7 failures


def _rewrite_shard(path: Path, name: str, fn):
    """Apply ``fn(tensors)`` (a dict name -> array, mutated in place) to the shard holding ``name`` and
    keep the index in step."""
    index = json.loads((path / st.INDEX).read_text())
    shard = path / index["weight_map"][name]
    s = st.Shard(shard)
    tensors = {k: np.array(s.read(k)) for k in s.tensors}
    s.close()
    fn(tensors)
    st.write_shard(shard, tensors.items())
    wm = {k: v for k, v in index["weight_map"].items() if v != shard.name or k in tensors}
    wm.update({k: shard.name for k in tensors})
    index["weight_map"] = wm
    index["metadata"]["total_size"] = sum(t.nbytes for t in _headers(path).values())
    (path / st.INDEX).write_text(json.dumps(index))
    return shard.name


def _duplicate_into_other_shard(path: Path, name: str):
    """Copy tensor ``name`` into a second shard without telling the index."""
    index = json.loads((path / st.INDEX).read_text())
    home = index["weight_map"][name]
    other = min(set(index["weight_map"].values()) - {home})
    src, dst = st.Shard(path / home), st.Shard(path / other)
    tensors = {k: np.array(dst.read(k)) for k in dst.tensors}
    tensors[name] = np.array(src.read(name))
    src.close()
    dst.close()
    st.write_shard(path / other, tensors.items())


def _edit_json(path: Path, fn):
    d_ = json.loads(path.read_text())
    fn(d_)
    path.write_text(json.dumps(d_))


def _setitem(name, value):
    return lambda t: t.__setitem__(name, value)


def _poke(name, flat_index, byte):
    def fn(t):
        a = t[name].copy()
        a.reshape(-1).view(np.uint8)[flat_index] = byte
        t[name] = a

    return fn


def _truncate(p):
    f = max(p.glob("*.safetensors"))
    os.truncate(f, f.stat().st_size - 100)
    return f.name


def _damage_header(p):
    f = min(p.glob("*.safetensors"))
    with open(f, "r+b") as fh:
        fh.seek(12)
        fh.write(b"\x00\xff{{")
    return f.name


def _drop_shard(p):
    f = sorted(p.glob("*.safetensors"))[1]
    f.unlink()
    return f.name


def _edit_header(p, fn, shift=0):
    """Rewrite the first shard's header: ``fn(header dict)``, then padded with 8 spaces and the declared length
    ``shift`` bytes short of it (the JSON still parses, every tensor is read ``shift`` bytes early)."""
    f = min(p.glob("*.safetensors"))
    b = f.read_bytes()
    (n,) = struct.unpack("<Q", b[:8])
    header = json.loads(b[8:8 + n])
    fn(header)
    raw = json.dumps(header).encode() + b" " * 8
    f.write_bytes(struct.pack("<Q", len(raw) - shift) + raw + b[8 + n:])
    return f.name


def _append(p):
    f = max(p.glob("*.safetensors"))
    with open(f, "ab") as fh:
        fh.write(bytes(range(64)))
    return f.name


def _as_directory(name):
    def fn(p):
        (p / name).unlink()
        (p / name).mkdir()
        return name

    return fn


def _first_tensor(header):
    return next(k for k in header if k != "__metadata__")


E1 = "layers.2.ffn.experts.3.w2"
CASES = {
    "truncated shard": (_truncate, st.CorruptShard, r"{file}.*'[^']+'.*truncated"),
    "damaged header": (_damage_header, st.CorruptShard, r"{file}.*header"),
    "missing tensor": (
        lambda p: _rewrite_shard(
            p, "layers.1.attn_norm.weight", lambda t: t.pop("layers.1.attn_norm.weight")
        ),
        st.MissingTensor,
        r"model.safetensors.index.json.*'layers.1.attn_norm.weight' is missing",
    ),
    "missing scale": (
        lambda p: _rewrite_shard(p, "layers.1.attn.wkv.scale", lambda t: t.pop("layers.1.attn.wkv.scale")),
        st.MissingScale,
        r"{file}.*'layers.1.attn.wkv.weight'",
    ),
    "wrong shape": (
        lambda p: _rewrite_shard(
            p,
            "layers.0.attn.q_norm.weight",
            _setitem("layers.0.attn.q_norm.weight", np.ones(65, ml_dtypes.bfloat16)),
        ),
        st.ShapeMismatch,
        r"{file}.*'layers.0.attn.q_norm.weight'.*\[65\].*\[64\]",
    ),
    "wrong dtype": (
        lambda p: _rewrite_shard(
            p, "layers.0.hc_attn_base", _setitem("layers.0.hc_attn_base", np.ones(CONFIG.mix_hc, np.int32))
        ),
        st.DtypeMismatch,
        r"{file}.*'layers.0.hc_attn_base'.*I32",
    ),
    "wrong scale shape": (
        lambda p: _rewrite_shard(
            p,
            "mtp.0.ffn.experts.1.w1.scale",
            _setitem("mtp.0.ffn.experts.1.w1.scale", np.ones((64, 8), ml_dtypes.float8_e8m0fnu)),
        ),
        st.ScaleShapeMismatch,
        r"{file}.*'mtp.0.ffn.experts.1.w1.scale'",
    ),
    "missing config key": (
        lambda p: _edit_json(p / "config.json", lambda c: c.pop("hidden_size")),
        st.UnsupportedConfig,
        r"config.json.*'hidden_size'",
    ),
    "wrong model type": (
        lambda p: _edit_json(p / "config.json", lambda c: c.update(model_type="llama")),
        st.UnsupportedConfig,
        r"config.json.*'model_type'",
    ),
    "fp8 experts": (
        lambda p: _edit_json(p / "config.json", lambda c: c.update(expert_dtype="fp8")),
        st.UnsupportedExpertDtype,
        r"config.json.*'expert_dtype'",
    ),
    "bad quantization_config": (
        lambda p: _edit_json(p / "config.json", lambda c: c["quantization_config"].update(scale_fmt="fp32")),
        st.UnsupportedQuantConfig,
        r"config.json.*'quantization_config.scale_fmt'",
    ),
    "bad moe_quant_algo": (
        lambda p: _edit_json(
            p / "config.json", lambda c: c["quantization_config"].update(moe_quant_algo="MXFP8")
        ),
        st.UnsupportedMoeQuant,
        r"config.json.*'quantization_config.moe_quant_algo'",
    ),
    "bad manifest": (
        lambda p: _edit_json(p / "hf_quant_config.json", lambda c: c["producer"].update(name="other")),
        st.BadQuantManifest,
        r"hf_quant_config.json.*'producer.name'",
    ),
    "index names a missing file": (_drop_shard, st.MissingShard, r"model.safetensors.index.json.*'{file}'"),
    # the safetensors format: the tensors cover the payload exactly (a header length that lost a byte of its
    # padding still parses, and would shift every tensor by one byte), JSON of any depth, dtype names
    "header length a byte short": (lambda p: _edit_header(p, lambda h: None, shift=1), st.CorruptShard,
                                   r"{file}: the last 1 bytes of the file belong to no tensor"),
    "bytes appended to a shard": (_append, st.CorruptShard, r"{file}: the last 64 bytes .* belong to no tensor"),
    "header dtype not a string": (
        lambda p: _edit_header(p, lambda h: h[_first_tensor(h)].update(dtype=["BF16"])),
        st.CorruptShard,
        r"{file}: tensor '[^']+': unknown dtype \['BF16'\]",
    ),
    "index nested too deep": (
        lambda p: (p / st.INDEX).write_text("[" * 100000 + "]" * 100000),
        st.CorruptShard,
        r"model.safetensors.index.json: not valid JSON \(RecursionError",
    ),
    "config.json a directory": (_as_directory("config.json"), st.UnsupportedConfig, r"config.json: a directory"),
    "index a directory": (_as_directory(st.INDEX), st.CorruptShard, r"{file}: not a regular file"),
    "rope_scaling not an object": (
        lambda p: _edit_json(p / "config.json", lambda c: c.update(rope_scaling="yarn")),
        st.UnsupportedConfig,
        r"config.json.*'rope_scaling'",
    ),
    "quantized_layers not an object": (
        lambda p: _edit_json(p / "config.json", lambda c: c["quantization_config"].update(quantized_layers=[])),
        st.UnsupportedMoeQuant,
        r"config.json.*'quantization_config.quantized_layers' is not an object",
    ),
    "unsafe shard path": (
        lambda p: _edit_json(p / st.INDEX, lambda i: i["weight_map"].update(norm__weight="../x")),
        st.UnsafeShardPath,
        r"model.safetensors.index.json.*'../x'",
    ),
    "tensor not in index": (
        lambda p: (
            _rewrite_shard(p, "norm.weight", _setitem("extra", np.ones(3, np.float32)))
            and _edit_json(p / st.INDEX, lambda i: i["weight_map"].pop("extra"))
        ),
        st.UnexpectedTensor,
        r"{file}.*'extra'",
    ),
    "tensor held by two shards": (
        lambda p: _duplicate_into_other_shard(p, "norm.weight"),
        st.UnexpectedTensor,
        r"{file}.*'norm.weight', which model.safetensors.index.json lists in .* \(a tensor held twice\)",
    ),
    "stray tensor named as transformers would": (
        lambda p: _rewrite_shard(p, "norm.weight", _setitem("model.extra", np.ones(3, np.float32))),
        st.UnexpectedTensor,
        r"{file}.*'model.extra' is not a parameter",
    ),
    "tensor of no parameter": (
        lambda p: _rewrite_shard(p, "norm.weight", _setitem("extra", np.ones(3, np.float32))),
        st.UnexpectedTensor,
        r"{file}.*'extra' is not a parameter",
    ),
    "NaN global scale": (
        lambda p: _rewrite_shard(
            p, E1 + ".weight_scale_2", _setitem(E1 + ".weight_scale_2", np.array(np.nan, np.float32))
        ),
        st.BadGlobalScale,
        r"{file}.*'" + E1 + r".weight_scale_2'",
    ),
    "zero input scale": (
        lambda p: _rewrite_shard(
            p, E1 + ".input_scale", _setitem(E1 + ".input_scale", np.array(0.0, np.float32))
        ),
        st.BadGlobalScale,
        r"{file}.*'" + E1 + r".input_scale'",
    ),
    "NaN block scale": (
        lambda p: _rewrite_shard(p, E1 + ".weight_scale", _poke(E1 + ".weight_scale", 5, 0x7F)),
        st.BadBlockScale,
        r"{file}.*'" + E1 + r".weight_scale'",
    ),
    "NaN UE8M0 scale": (
        lambda p: _rewrite_shard(
            p, "mtp.0.ffn.experts.2.w3.scale", _poke("mtp.0.ffn.experts.2.w3.scale", 7, 0xFF)
        ),
        st.BadE8M0,
        r"{file}.*'mtp.0.ffn.experts.2.w3.scale'",
    ),
    "NaN FP8 weight": (
        lambda p: _rewrite_shard(
            p, "layers.0.attn.wq_b.weight", _poke("layers.0.attn.wq_b.weight", 11, 0xFF)
        ),
        st.NaNWeight,
        r"{file}.*'layers.0.attn.wq_b.weight'",
    ),
    "partial NVFP4 quartet": (
        lambda p: _rewrite_shard(p, E1 + ".input_scale", lambda t: t.pop(E1 + ".input_scale")),
        st.MixedExpertEncoding,
        r"{file}.*'" + E1 + r"'.*input_scale",
    ),
    "swizzled block scale": (
        lambda p: _rewrite_shard(
            p,
            E1 + ".weight_scale",
            lambda t: t.__setitem__(E1 + ".weight_scale", np.zeros(128 * 4, np.uint8)),
        ),
        st.SwizzledScaleUnsupported,
        r"{file}.*'" + E1 + r".weight_scale'",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_failure_names_the_file_and_the_tensor_or_key(ckpt_q, tmp_path, case):
    """CHECKPOINT.md §7: each failure raises its error, naming the file and the tensor or key; loading writes
    nothing into the checkpoint directory, even when it fails."""
    mutate, err, pattern = CASES[case]
    p = Path(shutil.copytree(ckpt_q, tmp_path / "ckpt"))
    file = mutate(p)
    before = _snapshot(p)
    with pytest.raises(err, match=pattern.format(file=file if isinstance(file, str) else "")):
        _load(p)
    assert issubclass(err, st.CheckpointError)
    assert _snapshot(p) == before


def test_stale_total_size_only_warns(ckpt_q, model_q, tmp_path):
    p = Path(shutil.copytree(ckpt_q, tmp_path / "ckpt"))
    _edit_json(p / st.INDEX, lambda i: i["metadata"].update(total_size=12345))
    with pytest.warns(st.StaleIndexTotalSize, match=r"model.safetensors.index.json.*12345"):
        loaded = _load(p)
    assert_same_params(loaded.params, model_q.params)


WARNINGS = {
    "unfused w1/w3 scales": (
        lambda p: _rewrite_shard(
            p,
            "layers.3.ffn.experts.6.w3.weight_scale_2",
            _setitem("layers.3.ffn.experts.6.w3.weight_scale_2", np.array(0.125, np.float32)),
        ),
        st.UnfusedW13Scales,
        r"'layers.3.ffn.experts.6.w1.weight_scale_2' differs",
    ),
    "manifests disagree": (
        lambda p: _edit_json(
            p / "config.json",
            lambda c: c["quantization_config"]["quantized_layers"].pop("layers.1.ffn.experts"),
        ),
        st.InconsistentQuantManifest,
        r"hf_quant_config.json.*'layers.1.ffn.experts'",
    ),
    "exclusion lists disagree": (
        lambda p: _edit_json(p / "config.json", lambda c: c["quantization_config"]["ignore"].append("mtp.extra")),
        st.InconsistentQuantManifest,
        r"hf_quant_config.json: key 'quantization.exclude_modules' differs .*'mtp.extra'",
    ),
    "index total_size not a number": (
        lambda p: _edit_json(p / st.INDEX, lambda i: i["metadata"].update(total_size="abc")),
        st.StaleIndexTotalSize,
        r"model.safetensors.index.json: metadata.total_size 'abc' is not a number",
    ),
    "index metadata not an object": (
        lambda p: _edit_json(p / st.INDEX, lambda i: i.update(metadata=["total_size", 1])),
        st.StaleIndexTotalSize,
        r"model.safetensors.index.json: 'metadata' is list, not a JSON object",
    ),
}


@pytest.mark.parametrize("case", list(WARNINGS))
def test_tolerated_defects_warn(ckpt_q, tmp_path, case):
    """§7.2.5 / §7.4.14: defects a reader tolerates load with a warning naming the file and tensor or key."""
    mutate, warning, pattern = WARNINGS[case]
    p = Path(shutil.copytree(ckpt_q, tmp_path / "ckpt"))
    mutate(p)
    with pytest.warns(warning, match=pattern):
        _load(p)


def test_legacy_manifest_schema_loads(ckpt_q, model_q, tmp_path):
    """The older revision's hf_quant_config.json (null quant_algo, per-projection keys, awq_block_size) and a
    config.json without quantization_config (CHECKPOINT.md §5.5)."""
    p = Path(shutil.copytree(ckpt_q, tmp_path / "ckpt"))
    legacy = {
        f"layers.{i}.ffn.experts.{e}.{w}": {"quant_algo": "NVFP4", "awq_block_size": 16}
        for i in range(CONFIG.num_hidden_layers)
        for e in range(CONFIG.n_routed_experts)
        for w in ("w1", "w2", "w3")
    }
    (p / "hf_quant_config.json").write_text(
        json.dumps(
            {
                "producer": {"name": "modelopt", "version": "0.27"},
                "quantization": {"quant_algo": None, "quantized_layers": legacy},
            }
        )
    )
    _edit_json(p / "config.json", lambda c: c.pop("quantization_config"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = _load(p)
    assert_same_params(loaded.params, model_q.params)


def test_nvfp4_mtp_experts_load_with_a_warning(model_q, tmp_path):
    """§5.7's residual doubt: NVFP4 experts under mtp.* load (the format is read from the tensors) but
    disagree with the manifest's 'mtp.*' exclusion."""
    m = dataclasses.replace(
        model_q,
        params=dataclasses.replace(
            model_q.params, mtp=(dataclasses.replace(model_q.params.mtp[0], block=model_q.params.layers[1]),)
        ),
    )
    q = ck.save_checkpoint(model_q, tmp_path / "q")
    for e in range(CONFIG.n_routed_experts):
        for w, a in (
            ("w1", m.params.mtp[0].block.ffn.experts.w1),
            ("w2", m.params.mtp[0].block.ffn.experts.w2),
            ("w3", m.params.mtp[0].block.ffn.experts.w3),
        ):
            name = f"mtp.0.ffn.experts.{e}.{w}"

            def swap(t, name=name, a=a, e=e):
                t.pop(name + ".scale")
                t[name + ".weight"] = np.asarray(a.weight[e])
                t[name + ".weight_scale"] = np.asarray(a.weight_scale[e])
                t[name + ".weight_scale_2"] = np.asarray(a.weight_scale_2[e]).reshape(())
                t[name + ".input_scale"] = np.asarray(a.input_scale[e]).reshape(())

            _rewrite_shard(q, name + ".weight", swap)
    with pytest.warns(
        st.ExpertEncodingDisagreesWithConfig, match=r"'mtp.0.ffn.experts' is announced not NVFP4"
    ):
        loaded = _load(q)
    assert isinstance(loaded.params.mtp[0].block.ffn.experts.w2, Nvfp4)


def test_placement_that_cannot_fit_is_refused(ckpt_q):
    with pytest.raises(st.InsufficientMemory, match=r"needs 0\.\d+ GiB per device.*only 0\.00 GiB is free"):
        _load(ckpt_q, device_memory=1000)


def test_writer_is_atomic_and_never_overwrites(model_q, ckpt_q, tmp_path):
    """A failing write leaves nothing behind (no directory, no temporary folder); an existing path is
    refused."""
    with pytest.raises(ValueError, match="MXFP4 experts are required"):
        ck.save_checkpoint(
            model_q, tmp_path / "native", "native"
        )  # NVFP4 experts have no lossless MXFP4 form
    assert os.listdir(tmp_path) == []
    with pytest.raises(FileExistsError):
        ck.save_checkpoint(model_q, ckpt_q)


def test_scripts_make_tiny_checkpoint_and_convert_to_orbax_cache(tmp_path):
    """make_tiny_checkpoint.py writes a loadable checkpoint; convert.py turns it into an orbax cache that
    load_model restores to identical parameters."""
    runpy.run_path(str(ROOT / "scripts/make_tiny_checkpoint.py"))["main"](
        [str(tmp_path / "n"), "--format", "native", "--layers", "3", "--seed", "4"]
    )
    runpy.run_path(str(ROOT / "scripts/convert.py"))["main"]([str(tmp_path / "n"), str(tmp_path / "cache")])
    a, b = _load(tmp_path / "n"), _load(tmp_path / "cache")
    assert a.config == b.config == d.tiny(num_hidden_layers=3)
    assert isinstance(b.params.layers[0].ffn.experts.w1, Mxfp4)
    assert_same_params(a.params, b.params)


_MESH_SCRIPT = textwrap.dedent("""
    import collections, sys
    import jax, numpy as np
    from jax.sharding import Mesh
    import dsv4_jax as d
    from dsv4_jax import checkpoint as ck, safetensors_io as st
    from dsv4_jax.weights import is_weight
    path, cache = sys.argv[1], sys.argv[2]
    reads = collections.Counter()
    read = st.Shard.read
    st.Shard.read = lambda self, name: (reads.update([name]), read(self, name))[1]
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "expert"))
    m = ck.load_model(path, mesh=mesh, progress=False)
    experts = [k for k in reads if ".experts." in k]
    assert experts and all(reads[k] == 1 for k in experts), "each expert tensor is read by one device pair"
    single = ck.load_model(path, progress=False)
    ck.save_cache(single, cache)
    r = ck.load_model(cache, mesh=mesh, progress=False)
    for model in (m, r):
        w = model.params.layers[2].ffn.experts.w1
        assert w.weight.sharding.spec == jax.sharding.PartitionSpec("expert"), w.weight.sharding
        assert {s.data.shape[0] for s in w.weight.addressable_shards} == {w.weight.shape[0] // 2}
        assert model.params.layers[2].attn.wq_a.weight.sharding.is_fully_replicated
        for x, y in zip(jax.tree.leaves(model.params), jax.tree.leaves(single.params)):
            np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))
    print("ok", len(experts))
""")


def test_expert_parallel_loading_reads_only_owned_experts(ckpt_q, tmp_path):
    """With a mesh ("data" 2 x "expert" 2, four CPU devices) routed experts are sharded over "expert" and each
    expert tensor is read once (by the devices that own it); the rest is replicated. The orbax cache restores
    into the same shardings."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",  # (keeping conftest.py's XLA flags)
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4")
    out = subprocess.run(
        [sys.executable, "-c", _MESH_SCRIPT, str(ckpt_q), str(tmp_path / "cache")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok")


def test_kernel_layout_at_load_is_exact_and_saves_the_checkpoint_bytes(ckpt_q, model_q, tokens, tmp_path):
    """``kernel_layout=True`` (what load_model does on GPUs) repacks the NVFP4 experts once at load: the model
    computes the same logits, counts the same parameters, and saving it (checkpoint or orbax cache) writes the
    checkpoint's bytes, not the kernel layout."""
    from dsv4_jax import kernels
    from pallas_kernels import Nvfp4Packed

    plain = _load(ckpt_q)
    packed = _load(ckpt_q, kernel_layout=True)
    assert isinstance(packed.params.layers[2].ffn.experts.w1, Nvfp4Packed)
    assert not isinstance(plain.params.layers[2].ffn.experts.w1, Nvfp4Packed)
    assert d.count_params(packed.params) == d.count_params(plain.params)
    np.testing.assert_array_equal(np.asarray(d.forward(packed, tokens)), np.asarray(d.forward(plain, tokens)))
    assert_same_params(kernels.checkpoint_layout(packed.params), plain.params)
    ck.save_checkpoint(packed, tmp_path / "q", max_shard_bytes=SMALL_SHARDS)
    files = sorted(p.name for p in ckpt_q.iterdir())
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == files
    for name in files:
        assert (tmp_path / "q" / name).read_bytes() == (ckpt_q / name).read_bytes(), name
    ck.save_cache(packed, tmp_path / "cache")
    assert_same_params(_load(tmp_path / "cache", kernel_layout=False).params, plain.params)


def test_orbax_cache_and_config_that_do_not_belong_together_are_refused(tmp_path):
    """An orbax cache is checked against its config.json before anything is read (the cache records each leaf's
    shapes): a config edited after the cache was written is refused, naming the parameter; damaged data is
    refused naming the cache, not with a bare orbax / TensorStore error."""
    model = d.random_model(d.tiny(num_hidden_layers=4, mtp=False), seed=3)
    cache = ck.save_cache(model, tmp_path / "cache")
    base = json.loads((cache / "config.json").read_text())
    ratios = list(base["compress_ratios"])
    ratios[3] = 8 if ratios[3] != 8 else 16
    for change, param in (
        ({"vocab_size": base["vocab_size"] + 44}, "embed"),
        ({"num_attention_heads": 2 * base["num_attention_heads"]}, "layers[0].attn"),
        ({"n_routed_experts": 2 * base["n_routed_experts"]}, "experts"),
        ({"compress_ratios": ratios}, "layers[3].attn"),
    ):
        bad = tmp_path / f"bad_{next(iter(change))}"
        shutil.copytree(cache, bad)
        (bad / "config.json").write_text(json.dumps({**base, **change}))
        with pytest.raises(ck.CheckpointError, match="do not match") as err:
            _load(bad)
        assert param in str(err.value) and "config.json" in str(err.value), err.value
    damaged = tmp_path / "damaged"
    shutil.copytree(cache, damaged)
    data = max((p for p in (damaged / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 3])
    with pytest.raises(ck.CheckpointError, match="could not be read"):
        _load(damaged)
    shutil.rmtree(damaged / "params")
    with pytest.raises(ck.CheckpointError, match="no parameter data"):
        _load(damaged)
    manifest = json.loads((cache / ck.CACHE_MANIFEST).read_text())
    leaf0 = {**manifest["leaves"][0], "arrays": [[manifest["leaves"][0]["arrays"][0][0], "bogus"]]}
    for name, text, match in (
        (ck.CACHE_MANIFEST, "[]", "not a cache manifest"),
        (ck.CACHE_MANIFEST, json.dumps({**manifest, "leaves": [leaf0, *manifest["leaves"][1:]]}),
         "the record of parameter embed is damaged"),
        ("config.json", "[]", "config.json: not a JSON object"),
    ):
        bad = tmp_path / "bad_json"
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(cache, bad)
        (bad / name).write_text(text)
        with pytest.raises(ck.CheckpointError, match=match):
            _load(bad)
    assert_same_params(_load(cache).params, model.params)  # the original still loads
