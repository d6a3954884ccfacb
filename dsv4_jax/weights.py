"""The weight-mapping layer: the one place that knows checkpoint tensor names (CHECKPOINT.md §3, §5, §6).

Three layouts are read and written:

* **native**: DeepSeek's names (``layers.L.attn.wq_a.weight`` + ``.scale``, no prefix), used by Format N
  (the original release: FP8 linears, MXFP4 routed experts) and Format Q (the ModelOpt NVFP4 release: the
  same, with the routed experts of layers 0..L-1 as NVFP4 quartets and the MTP experts still MXFP4);
* **hf**: what transformers' ``DeepseekV4ForCausalLM.save_pretrained`` writes (checked with transformers 5.24:
  it applies its conversion mapping in reverse, so the names are native ones under ``model.``, except
  ``model.embed_tokens.weight``, ``head.weight``, ``model.norm.weight``, ``model.hc_head.hc_*`` and
  ``attn.norm.weight`` for ``attn.kv_norm``; experts split per expert; every tensor bf16 or fp32; no MTP).

The table is :func:`param_entries`: the parameter tree of a configuration with an :class:`Entry` in place of
every weight, naming its checkpoint tensor(s). The number format of each linear and of each expert is decided
from the keys and dtypes found (:func:`resolve`), never from the configuration: §5.7, MTP experts stay MXFP4.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Literal

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from . import quant
from .config import Config, ConfigError
from .params import Attention, Block, Compressor, Experts, Indexer, MoE, Mtp, Params
from .quant import Fp8Block, Mxfp4, Nvfp4
from .safetensors_io import (
    BadBlockGeometry,
    BadBlockScale,
    BadE8M0,
    BadGlobalScale,
    BadQuantManifest,
    CheckpointError,
    DtypeMismatch,
    ExpertEncodingDisagreesWithConfig,
    MissingScale,
    MissingTensor,
    MixedExpertEncoding,
    NaNWeight,
    ScaleShapeMismatch,
    ShapeMismatch,
    SwizzledScaleUnsupported,
    TensorInfo,
    UnfusedW13Scales,
    UnsupportedConfig,
    UnsupportedExpertDtype,
    UnsupportedMoeQuant,
)

Layout = Literal["native", "hf"]
Kind = Literal["float", "index", "linear", "experts"]
Format = Literal["tensor", "dense", "fp8", "mxfp4", "nvfp4"]

FLOATS = ("BF16", "F32", "F16")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One leaf of the parameter tree (an array or a quantised ``Weight``) and its checkpoint name.

    ``name`` is the native name: the full tensor name for ``float`` / ``index`` tensors, the base name without
    ``.weight`` for a ``linear``, and the base name with ``{}`` for the expert id for stacked ``experts``.
    ``shape`` is the logical shape (``[E, out, in]`` for experts)."""

    path: tuple[str | int, ...]
    name: str
    kind: Kind
    shape: tuple[int, ...]
    limit: int = 0  # index tensors: values lie in [0, limit)

    @property
    def label(self) -> str:
        """The parameter's place in the tree, e.g. ``layers[2].attn.wq_a``."""
        return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in self.path).lstrip(".")


# ---------------------------------------------------------------------------------------------------------
# The table: parameter tree <-> native names (CHECKPOINT.md §6)


def _compressor(c: Config, pre: str, path: tuple, ratio: int, d_c: int) -> Compressor:
    width = (2 if ratio == 4 else 1) * d_c
    return Compressor(
        wkv=Entry(path + ("wkv",), pre + "wkv.weight", "float", (width, c.hidden_size)),
        wgate=Entry(path + ("wgate",), pre + "wgate.weight", "float", (width, c.hidden_size)),
        ape=Entry(path + ("ape",), pre + "ape", "float", (ratio, width)),
        norm=Entry(path + ("norm",), pre + "norm.weight", "float", (d_c,)),
    )


def _block(c: Config, pre: str, path: tuple, layer: int) -> Block:
    d, h, hd, rq = c.hidden_size, c.num_attention_heads, c.head_dim, c.q_lora_rank
    e, i = c.n_routed_experts, c.moe_intermediate_size

    def f(field, name, shape, kind: Kind = "float", sub=()):
        return Entry(path + sub + (field,), pre + name, kind, shape)

    a = ("attn",)
    ratio = c.compress_ratio(layer)
    attn = Attention(
        wq_a=f("wq_a", "attn.wq_a", (rq, d), "linear", a),
        q_norm=f("q_norm", "attn.q_norm.weight", (rq,), sub=a),
        wq_b=f("wq_b", "attn.wq_b", (h * hd, rq), "linear", a),
        wkv=f("wkv", "attn.wkv", (hd, d), "linear", a),
        kv_norm=f("kv_norm", "attn.kv_norm.weight", (hd,), sub=a),
        wo_a=f("wo_a", "attn.wo_a", (c.o_groups * c.o_lora_rank, h * hd // c.o_groups), "linear", a),
        wo_b=f("wo_b", "attn.wo_b", (d, c.o_groups * c.o_lora_rank), "linear", a),
        attn_sink=f("attn_sink", "attn.attn_sink", (h,), sub=a),
        compressor=_compressor(c, pre + "attn.compressor.", path + a + ("compressor",), ratio, hd)
        if ratio
        else None,
        indexer=Indexer(
            wq_b=f(
                "wq_b",
                "attn.indexer.wq_b",
                (c.index_n_heads * c.index_head_dim, rq),
                "linear",
                a + ("indexer",),
            ),
            weights_proj=f(
                "weights_proj", "attn.indexer.weights_proj.weight", (c.index_n_heads, d), sub=a + ("indexer",)
            ),
            compressor=_compressor(
                c,
                pre + "attn.indexer.compressor.",
                path + a + ("indexer", "compressor"),
                ratio,
                c.index_head_dim,
            ),
        )
        if ratio == 4
        else None,
    )
    hashed = c.is_hash_layer(layer) and layer < c.num_hidden_layers
    m, x, s = ("ffn",), ("ffn", "experts"), ("ffn", "shared")
    ffn = MoE(
        gate=f("gate", "ffn.gate.weight", (e, d), sub=m),
        bias=None if hashed else f("bias", "ffn.gate.bias", (e,), sub=m),
        tid2eid=dataclasses.replace(
            f("tid2eid", "ffn.gate.tid2eid", (c.vocab_size, c.num_experts_per_tok), "index", m), limit=e
        )
        if hashed
        else None,
        experts=Experts(
            w1=f("w1", "ffn.experts.{}.w1", (e, i, d), "experts", x),
            w2=f("w2", "ffn.experts.{}.w2", (e, d, i), "experts", x),
            w3=f("w3", "ffn.experts.{}.w3", (e, i, d), "experts", x),
        ),
        shared=Experts(
            w1=f("w1", "ffn.shared_experts.w1", (i, d), "linear", s),
            w2=f("w2", "ffn.shared_experts.w2", (d, i), "linear", s),
            w3=f("w3", "ffn.shared_experts.w3", (i, d), "linear", s),
        ),
    )
    n = c.hc_mult * d
    return Block(
        hc_attn_fn=f("hc_attn_fn", "hc_attn_fn", (c.mix_hc, n)),
        hc_attn_base=f("hc_attn_base", "hc_attn_base", (c.mix_hc,)),
        hc_attn_scale=f("hc_attn_scale", "hc_attn_scale", (3,)),
        attn_norm=f("attn_norm", "attn_norm.weight", (d,)),
        attn=attn,
        hc_ffn_fn=f("hc_ffn_fn", "hc_ffn_fn", (c.mix_hc, n)),
        hc_ffn_base=f("hc_ffn_base", "hc_ffn_base", (c.mix_hc,)),
        hc_ffn_scale=f("hc_ffn_scale", "hc_ffn_scale", (3,)),
        ffn_norm=f("ffn_norm", "ffn_norm.weight", (d,)),
        ffn=ffn,
    )


def param_entries(config: Config) -> Params:
    """The parameter tree of ``config`` with an :class:`Entry` at every leaf (a quantised ``Weight`` is one
    leaf). ``jax.tree.leaves`` of it lines up with ``jax.tree.leaves(params, is_leaf=is_weight)``."""
    c = config
    d, n = c.hidden_size, c.hc_mult

    def top(field, name, shape):
        return Entry((field,), name, "float", shape)

    mtp = []
    for j in range(c.num_nextn_predict_layers):
        pre, path = f"mtp.{j}.", ("mtp", j)

        def f(field, name, shape, kind: Kind = "float"):
            return Entry(path + (field,), pre + name, kind, shape)  # noqa: B023 (used immediately)

        mtp.append(
            Mtp(
                enorm=f("enorm", "enorm.weight", (d,)),
                hnorm=f("hnorm", "hnorm.weight", (d,)),
                e_proj=f("e_proj", "e_proj", (d, d), "linear"),
                h_proj=f("h_proj", "h_proj", (d, d), "linear"),
                block=_block(c, pre, path + ("block",), c.num_hidden_layers + j),
                hc_head_fn=f("hc_head_fn", "hc_head_fn", (n, n * d)),
                hc_head_base=f("hc_head_base", "hc_head_base", (n,)),
                hc_head_scale=f("hc_head_scale", "hc_head_scale", (1,)),
                norm=f("norm", "norm.weight", (d,)),
            )
        )
    return Params(
        embed=top("embed", "embed.weight", (c.vocab_size, d)),
        layers=tuple(_block(c, f"layers.{i}.", ("layers", i), i) for i in range(c.num_hidden_layers)),
        hc_head_fn=top("hc_head_fn", "hc_head_fn", (n, n * d)),
        hc_head_base=top("hc_head_base", "hc_head_base", (n,)),
        hc_head_scale=top("hc_head_scale", "hc_head_scale", (1,)),
        norm=top("norm", "norm.weight", (d,)),
        head=top("head", "head.weight", (c.vocab_size, d)),
        mtp=tuple(mtp),
    )


def is_weight(x) -> bool:
    """Leaf predicate that keeps quantised weights whole."""
    return isinstance(x, quant.QUANTIZED)


def entry_leaves(config: Config) -> list[Entry]:
    return jax.tree.leaves(param_entries(config))


# transformers' save_pretrained names (its conversion mapping applied in reverse).
_HF_TOP = {
    "embed.weight": "model.embed_tokens.weight",
    "head.weight": "head.weight",
    "norm.weight": "model.norm.weight",
    "hc_head_fn": "model.hc_head.hc_fn",
    "hc_head_base": "model.hc_head.hc_base",
    "hc_head_scale": "model.hc_head.hc_scale",
}


def tensor_name(native: str, layout: Layout) -> str:
    """A native tensor name in ``layout``."""
    if layout == "native":
        return native
    if native in _HF_TOP:
        return _HF_TOP[native]
    if native.startswith("mtp."):
        raise ValueError(f"the transformers layout has no MTP tensors ({native})")
    return "model." + native.replace(".attn.kv_norm.", ".attn.norm.")


def detect_layout(names) -> Layout:
    """``"hf"`` when the tensor names are transformers' (most have the ``model.`` prefix), else ``"native"``.
    By majority, so that one stray tensor is reported as such rather than turning the whole checkpoint's
    layout."""
    names = list(names)
    return "hf" if 2 * sum(n.startswith("model.") for n in names) > len(names) else "native"


def module_name(entry: Entry) -> str:
    """The module a quantisation manifest names for routed experts, e.g. ``layers.3.ffn.experts``."""
    return entry.name.split(".{}")[0]


# ---------------------------------------------------------------------------------------------------------
# Resolving: which tensors hold each entry, in which format (CHECKPOINT.md §7.3)

_SUFFIXES: dict[str, tuple[str, ...]] = {
    "dense": ("weight",),
    "fp8": ("weight", "scale"),
    "mxfp4": ("weight", "scale"),
    "nvfp4": ("weight", "weight_scale", "weight_scale_2", "input_scale"),
}


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one entry lives: its format and, per component (``weight``, ``scale``, ...), the tensor name of
    every expert (one name for non-expert entries)."""

    entry: Entry
    format: Format
    parts: dict[str, tuple[str, ...]]

    def tensor_names(self) -> Iterator[str]:
        for names in self.parts.values():
            yield from names


def expected_parts(fmt: Format, out: int, inn: int) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """Stored (dtypes, shape) of each component of one ``[out, in]`` matrix in ``fmt``."""
    fp8s = (math.ceil(out / quant.FP8_BLOCK), math.ceil(inn / quant.FP8_BLOCK))
    return {
        "dense": {"weight": (FLOATS, (out, inn))},
        "fp8": {"weight": (("F8_E4M3",), (out, inn)), "scale": (("F8_E8M0",), fp8s)},
        "mxfp4": {
            "weight": (("I8", "U8"), (out, inn // 2)),
            "scale": (("F8_E8M0",), (out, inn // quant.MXFP4_BLOCK)),
        },
        "nvfp4": {
            "weight": (("U8",), (out, inn // 2)),
            "weight_scale": (("F8_E4M3",), (out, inn // quant.NVFP4_BLOCK)),
            "weight_scale_2": (("F32",), ()),
            "input_scale": (("F32",), ()),
        },
    }[fmt]


def _linear_format(
    base: str, entry: Entry, infos: Mapping[str, TensorInfo], where: Callable[[str], str]
) -> Format:
    """The format of the linear stored under ``base`` (``X`` of ``X.weight``), from its keys and dtypes."""
    w = infos.get(base + ".weight")
    if w is None:
        raise MissingTensor(
            f"{where(base + '.weight')}: tensor {base + '.weight'!r} is missing (parameter {entry.label})"
        )
    quartet = [base + s in infos for s in (".weight_scale", ".weight_scale_2", ".input_scale")]
    scale = infos.get(base + ".scale")
    if any(quartet):
        if scale is not None:
            raise MixedExpertEncoding(
                f"{where(base + '.scale')}: {base!r} has both NVFP4 scales and an MXFP4/FP8 '.scale'"
            )
        if not all(quartet):
            missing = [s for s, q in zip(("weight_scale", "weight_scale_2", "input_scale"), quartet) if not q]
            raise MixedExpertEncoding(
                f"{where(base + '.weight')}: {base!r} is a partial NVFP4 quartet, missing "
                f"{', '.join(missing)}"
            )
        fmt: Format = "nvfp4"
    elif scale is not None:
        if w.dtype == "F8_E4M3":
            fmt = "fp8"
        elif w.dtype in ("I8", "U8"):
            fmt = "mxfp4"
        else:
            raise DtypeMismatch(
                f"{where(base + '.weight')}: tensor {base + '.weight'!r} is {w.dtype} next to a "
                "'.scale'; expected F8_E4M3 (FP8 block) or I8/U8 (MXFP4)"
            )
    elif w.dtype in FLOATS:
        fmt = "dense"
    else:
        raise MissingScale(
            f"{where(base + '.weight')}: tensor {base + '.weight'!r} is {w.dtype} but has no '{base}.scale'"
        )
    allowed = ("nvfp4", "mxfp4", "fp8", "dense") if entry.kind == "experts" else ("fp8", "dense")
    if fmt not in allowed:
        raise DtypeMismatch(
            f"{where(base + '.weight')}: {base!r} is stored as {fmt.upper()}, which parameter "
            f"{entry.label} cannot hold (expected {' or '.join(a.upper() for a in allowed)})"
        )
    return fmt


def _check_parts(
    fmt: Format, base: str, entry: Entry, infos: Mapping[str, TensorInfo], where: Callable[[str], str]
) -> None:
    out, inn = entry.shape[-2:]
    block = {"nvfp4": quant.NVFP4_BLOCK, "mxfp4": quant.MXFP4_BLOCK}.get(fmt, 1)
    if inn % block:
        raise BadBlockGeometry(
            f"{where(base + '.weight')}: {base!r}: input dimension {inn} is not a multiple of "
            f"the {fmt.upper()} block {block}"
        )
    for part, (dtypes, shape) in expected_parts(fmt, out, inn).items():
        name = f"{base}.{part}"
        t = infos[name]
        if part == "weight_scale" and t.dtype == "U8" and len(t.shape) == 1:
            raise SwizzledScaleUnsupported(
                f"{where(name)}: tensor {name!r} is a 1-D uint8 (TensorRT-LLM swizzled) "
                "block scale; only the plain 2-D float8_e4m3fn layout is supported"
            )
        if t.dtype not in dtypes:
            if part == "scale" and fmt == "fp8" and entry.kind == "experts" and t.dtype == "F32":
                raise UnsupportedExpertDtype(
                    f"{where(name)}: tensor {name!r}: FP8 experts with F32 block scales "
                    "(DeepSeek-V4-Flash-Base) are not supported"
                )
            raise DtypeMismatch(
                f"{where(name)}: tensor {name!r} is {t.dtype}, expected {' or '.join(dtypes)}"
            )
        if part in ("weight_scale_2", "input_scale"):
            if math.prod(t.shape) != 1 or len(t.shape) > 1:
                raise ShapeMismatch(
                    f"{where(name)}: tensor {name!r} has shape {list(t.shape)}, expected a scalar ([] or [1])"
                )
        elif t.shape != shape:
            err = ShapeMismatch if part == "weight" else ScaleShapeMismatch
            raise err(
                f"{where(name)}: tensor {name!r} has shape {list(t.shape)}, expected {list(shape)} "
                f"(parameter {entry.label} is [{out}, {inn}] in {fmt.upper()})"
            )


def resolve(
    entry: Entry, infos: Mapping[str, TensorInfo], layout: Layout, where: Callable[[str], str]
) -> Source:
    """Find ``entry``'s tensors among ``infos`` (name -> header entry) and validate their format, dtypes and
    shapes. ``where(name)`` names the file that holds (or should hold) a tensor, for messages."""
    if entry.kind in ("float", "index"):
        name = tensor_name(entry.name, layout)
        t = infos.get(name)
        if t is None:
            raise MissingTensor(f"{where(name)}: tensor {name!r} is missing (parameter {entry.label})")
        dtypes = FLOATS if entry.kind == "float" else ("I64", "I32")
        if t.dtype not in dtypes:
            raise DtypeMismatch(
                f"{where(name)}: tensor {name!r} is {t.dtype}, expected {' or '.join(dtypes)}"
            )
        if t.shape != entry.shape:
            raise ShapeMismatch(
                f"{where(name)}: tensor {name!r} has shape {list(t.shape)}, expected {list(entry.shape)}"
            )
        return Source(entry, "tensor", {"value": (name,)})
    if entry.kind == "linear":
        base = tensor_name(entry.name + ".weight", layout)[: -len(".weight")]
        fmt = _linear_format(base, entry, infos, where)
        _check_parts(fmt, base, entry, infos, where)
        return Source(entry, fmt, {p: (f"{base}.{p}",) for p in _SUFFIXES[fmt]})
    bases = [
        tensor_name(entry.name.format(e) + ".weight", layout)[: -len(".weight")]
        for e in range(entry.shape[0])
    ]
    formats = [_linear_format(b, entry, infos, where) for b in bases]
    if len(set(formats)) > 1:
        first = formats[0]
        odd = next(e for e, f in enumerate(formats) if f != first)
        raise MixedExpertEncoding(
            f"{where(bases[odd] + '.weight')}: experts of {module_name(entry)!r} mix "
            f"formats: expert 0 is {first.upper()}, expert {odd} is {formats[odd].upper()}"
        )
    for b in bases:
        _check_parts(formats[0], b, entry, infos, where)
    return Source(entry, formats[0], {p: tuple(f"{b}.{p}" for b in bases) for p in _SUFFIXES[formats[0]]})


def check_expert_encodings(sources: list[Source], quantized: set[str] | None, source: str) -> None:
    """§7.3.7: warn (``ExpertEncodingDisagreesWithConfig``) where the experts' observed encoding differs from
    the manifest's list of NVFP4 modules (``None``: no manifest, nothing announced)."""
    if quantized is None:
        return
    for s in sources:
        if s.entry.kind != "experts":
            continue
        mod = module_name(s.entry)
        if (s.format == "nvfp4") != (mod in quantized):
            announced = "NVFP4" if mod in quantized else "not NVFP4"
            warnings.warn(
                f"{source}: {mod!r} is announced {announced} but stored as {s.format.upper()}",
                ExpertEncodingDisagreesWithConfig,
                stacklevel=3,
            )


# ---------------------------------------------------------------------------------------------------------
# Reading values (host side); §7.4 value checks


def _u8(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint8)


def _check_values(part: str, fmt: Format, a: np.ndarray, name: str, where: Callable[[str], str]) -> None:
    if fmt == "nvfp4" and part in ("weight_scale_2", "input_scale"):
        if not (np.all(np.isfinite(a)) and np.all(a > 0)):
            raise BadGlobalScale(
                f"{where(name)}: tensor {name!r} = {a.reshape(-1)[:4]}: must be finite and > 0"
            )
    elif fmt == "nvfp4" and part == "weight_scale":
        b = _u8(a)
        if np.any((b & 0x7F) == 0x7F) or np.any(b & 0x80):
            raise BadBlockScale(f"{where(name)}: tensor {name!r} has NaN or negative e4m3 block scales")
    elif part == "scale":  # fp8 and mxfp4 scales are UE8M0
        if np.any(_u8(a) == 0xFF):
            raise BadE8M0(f"{where(name)}: tensor {name!r} has a UE8M0 byte 0xFF (NaN)")
    elif fmt == "fp8" and part == "weight" and np.any((_u8(a) & 0x7F) == 0x7F):
        raise NaNWeight(f"{where(name)}: tensor {name!r} has NaN e4m3 bytes (0x7F / 0xFF)")


def read_leaf(
    src: Source, read: Callable[[str], np.ndarray], where: Callable[[str], str], experts: slice = slice(None)
):
    """The host value of one entry (numpy arrays in the parameter tree's formats), reading only the experts
    in ``experts`` for stacked entries (the slice a device owns)."""
    e = src.entry
    if src.format == "tensor":
        (name,) = src.parts["value"]
        a = read(name)
        _check_values("value", "tensor", a, name, where)
        if e.kind == "index":
            if a.size and (a.min() < 0 or a.max() >= e.limit):
                raise CheckpointError(
                    f"{where(name)}: tensor {name!r} holds expert ids outside [0, {e.limit})"
                )
            return np.asarray(a, np.int32)
        return np.array(a)
    parts = {}
    for part, names in src.parts.items():
        names = names[experts] if e.kind == "experts" else names
        arrays = []
        for name in names:
            a = read(name)
            _check_values(part, src.format, a, name, where)
            if part == "weight" and src.format in ("mxfp4", "nvfp4"):
                a = _u8(a)  # packed codes: I8 or U8 per tensor (§7.3); stacking the two would widen to int16
            arrays.append(a.reshape(()) if part in ("weight_scale_2", "input_scale") else a)
        parts[part] = np.stack(arrays) if e.kind == "experts" else np.array(arrays[0])
    if src.format == "dense":
        return parts["weight"]
    if src.format == "fp8":
        return Fp8Block(parts["weight"], parts["scale"])
    if src.format == "mxfp4":
        return Mxfp4(_u8(parts["weight"]), parts["scale"])
    return Nvfp4(parts["weight"], parts["weight_scale"], parts["weight_scale_2"], parts["input_scale"])


def check_w13(w1: Source, s1: dict[str, np.ndarray], s3: dict[str, np.ndarray], where: Callable[[str], str]):
    """§7.4.14: within an NVFP4 expert w1 and w3 share ``weight_scale_2`` and ``input_scale`` (a warning).
    ``s1``, ``s3``: those scales ``[E]`` of w1 and w3 (the experts read by this process)."""
    for part in ("weight_scale_2", "input_scale"):
        a, b = s1[part], s3[part]
        if a.shape == b.shape and not np.array_equal(a, b):
            e = int(np.argmax(a != b))
            name = w1.parts[part][min(e, len(w1.parts[part]) - 1)]
            warnings.warn(
                f"{where(name)}: {name!r} differs from its w3 twin; kernels use one GEMM1 scale",
                UnfusedW13Scales,
                stacklevel=3,
            )


def leaf_nbytes(src: Source, infos: Mapping[str, TensorInfo]) -> int:
    """Bytes of one entry in memory (as stored; hash tables shrink from int64 to int32)."""
    n = sum(infos[name].nbytes for name in src.tensor_names())
    return n // 2 if src.entry.kind == "index" and infos[next(src.tensor_names())].dtype == "I64" else n


# ---------------------------------------------------------------------------------------------------------
# Writing: target formats per checkpoint format and conversions

CheckpointFormat = Literal["modelopt-nvfp4", "native", "hf"]


def target_format(entry: Entry, fmt: CheckpointFormat, config: Config) -> Format:
    """The stored format of ``entry`` in a checkpoint of ``fmt`` (CHECKPOINT.md §3, §5.2, §5.7)."""
    if entry.kind in ("float", "index"):
        return "tensor"
    if fmt == "hf":
        return "dense"
    if entry.kind == "linear":
        return "fp8"
    main = entry.path[0] == "layers"
    return "nvfp4" if fmt == "modelopt-nvfp4" and main else "mxfp4"


def cast_mxfp4_to_nvfp4(*ws: Mxfp4, input_scale=1.0) -> tuple[Nvfp4, ...]:
    """The lossless MXFP4 -> NVFP4 cast of CHECKPOINT.md §5.4, byte for byte as ModelOpt's
    ``--cast_mxfp4_to_nvfp4`` Python path, with one ``k_max`` shared by all ``ws`` (w1 and w3 of the same
    experts; ``[..., out, in/2]`` each, one global scale per matrix).

    ``k_j = e8m0_j - 127``; ``k_max`` over non-zero blocks (0 if there are none); ``m = k_max - 8``;
    ``weight_scale_2 = 2^m``; both NVFP4 halves of MXFP4 block j get ``weight_scale = 2^(k_j - m)``, which is
    exact in e4m3 when ``k_j - m >= -9``, so the nibbles are the source's (-0 re-encoded as +0). Blocks
    further below ``k_max`` (and all-zero blocks) get the clamped ``2^-9`` and are re-rounded (lossy, and
    warned, unless all-zero)."""
    e8 = [np.asarray(w.scale).view(np.uint8) for w in ws]
    k_all = [e.astype(np.int32) - 127 for e in e8]
    kmax = np.max([np.max(np.where(e > 0, k, -(1 << 20)), axis=(-2, -1)) for e, k in zip(e8, k_all)], axis=0)
    kmax = np.where(kmax < -1000, 0, kmax)
    m = (kmax - 8)[..., None, None]
    out = []
    for w, e, k in zip(ws, e8, k_all):
        d = k - m
        lossless = d >= -9
        lossy = int(np.sum(~lossless & (e > 0)))  # all-zero blocks stay zero whatever their scale
        if lossy:
            warnings.warn(
                f"MXFP4 -> NVFP4 cast: {lossy} blocks are more than 2^17 below their matrix's largest "
                "block and are re-rounded",
                stacklevel=2,
            )
        bs = np.ldexp(np.float32(1), np.where(lossless, d, -9)).astype(ml_dtypes.float8_e4m3fn)
        codes = np.asarray(quant.unpack_nibbles(jnp.asarray(w.weight)))
        # value / (weight_scale * 2^m) = E2M1(code) * 2^(k - log2(weight_scale) - m), rounded once to fp32.
        shift = np.repeat(k - m - np.where(lossless, d, -9), quant.MXFP4_BLOCK, axis=-1)
        x = (quant.E2M1_VALUES[codes].astype(np.float64) * np.exp2(shift.astype(np.float64))).astype(
            np.float32
        )
        new = quant._e2m1_codes_np(x)
        packed = (new[..., 1::2] << 4) | new[..., 0::2]
        g = np.exp2(m[..., 0, 0].astype(np.float64)).astype(np.float32)
        bs16 = np.repeat(bs, quant.MXFP4_BLOCK // quant.NVFP4_BLOCK, axis=-1)
        out.append(Nvfp4(packed, bs16, g, np.broadcast_to(np.float32(input_scale), g.shape).copy()))
    return tuple(out)


def _np(a) -> np.ndarray:
    return np.asarray(jax.device_get(a))


def to_format(value, fmt: Format, entry: Entry):
    """One leaf converted to the stored format ``fmt`` (host numpy arrays). Exact except where a dense or
    FP8 / NVFP4 value must be re-quantised into FP8 or NVFP4 (requantise mode, CHECKPOINT.md §8.3); dense ->
    MXFP4 is refused (the native release has no requantiser)."""
    if fmt == "tensor":
        a = _np(value)
        return a.astype(np.int64) if entry.kind == "index" else a
    if fmt == "dense":
        return _np(value) if not is_weight(value) else _np(quant.dequantize_full(value))
    if fmt == "fp8":
        return jax.tree.map(
            _np,
            value
            if isinstance(value, Fp8Block)
            else quant.quantize_fp8_block(
                quant.dequantize_full(value) if is_weight(value) else jnp.asarray(value)
            ),
        )
    if fmt == "mxfp4":
        if not isinstance(value, Mxfp4):
            raise ValueError(
                f"{entry.label}: MXFP4 experts are required here (native release / MTP block, "
                f"CHECKPOINT.md §5.7), got {type(value).__name__}; no lossless conversion exists"
            )
        return jax.tree.map(_np, value)
    if isinstance(value, Nvfp4):
        return jax.tree.map(_np, value)
    raise AssertionError("NVFP4 conversions go through experts_to_nvfp4 (w1/w3 share scales)")


def experts_to_nvfp4(w1, w3):
    """w1 and w3 of the routed experts in NVFP4 with shared global scales (CHECKPOINT.md §5.2): Nvfp4 kept
    as is, MXFP4 cast losslessly (§5.4), anything else quantised with ModelOpt's quantiser from the joint
    amax (§4.2), ``input_scale = 1`` (no calibration data)."""
    if isinstance(w1, Nvfp4) and isinstance(w3, Nvfp4):
        return jax.tree.map(_np, w1), jax.tree.map(_np, w3)
    if isinstance(w1, Mxfp4) and isinstance(w3, Mxfp4):
        return cast_mxfp4_to_nvfp4(jax.tree.map(_np, w1), jax.tree.map(_np, w3))
    d1 = _np(quant.dequantize_full(w1)) if is_weight(w1) else _np(w1).astype(np.float32)
    d3 = _np(quant.dequantize_full(w3)) if is_weight(w3) else _np(w3).astype(np.float32)
    g = quant.nvfp4_global_scale(d1, d3)
    return tuple(jax.tree.map(_np, quant.quantize_nvfp4(d, g)) for d in (d1, d3))


def to_nvfp4(w):
    """One expert projection (w2) in NVFP4: see :func:`experts_to_nvfp4`."""
    if isinstance(w, Nvfp4):
        return jax.tree.map(_np, w)
    if isinstance(w, Mxfp4):
        return cast_mxfp4_to_nvfp4(jax.tree.map(_np, w))[0]
    d = _np(quant.dequantize_full(w)) if is_weight(w) else _np(w).astype(np.float32)
    return jax.tree.map(_np, quant.quantize_nvfp4(d))


def leaf_tensors(entry: Entry, value, fmt: Format, layout: Layout) -> Iterator[tuple[str, np.ndarray]]:
    """The checkpoint tensors of one leaf already in format ``fmt`` (numpy): names in ``layout``, MXFP4
    codes as I8 (as the native release stores them), NVFP4 global and input scales as 0-d F32."""
    if fmt == "tensor":
        yield tensor_name(entry.name, layout), value
        return
    per_expert = entry.kind == "experts"
    count = entry.shape[0] if per_expert else 1
    for e in range(count):
        base = tensor_name((entry.name.format(e) if per_expert else entry.name) + ".weight", layout)[
            : -len(".weight")
        ]
        pick = (lambda a, e=e: a[e]) if per_expert else (lambda a: a)
        if fmt == "dense":
            yield base + ".weight", pick(value)
        elif fmt == "fp8":
            yield base + ".weight", pick(value.weight)
            yield base + ".scale", pick(value.scale)
        elif fmt == "mxfp4":
            yield base + ".weight", pick(value.weight).view(np.int8)
            yield base + ".scale", pick(value.scale)
        else:
            yield base + ".weight", pick(value.weight)
            yield base + ".weight_scale", pick(value.weight_scale)
            yield base + ".weight_scale_2", np.asarray(pick(value.weight_scale_2), np.float32).reshape(())
            yield base + ".input_scale", np.asarray(pick(value.input_scale), np.float32).reshape(())


def checkpoint_tensors(
    params: Params, config: Config, fmt: CheckpointFormat
) -> Iterator[tuple[str, np.ndarray]]:
    """Every tensor of ``params`` as a checkpoint of ``fmt`` stores it, leaf by leaf (one layer's
    conversion at a time on the host). The transformers layout drops the MTP block."""
    layout: Layout = "hf" if fmt == "hf" else "native"
    entries = entry_leaves(config)
    values = jax.tree.leaves(params, is_leaf=is_weight)
    if len(entries) != len(values):
        raise ValueError(
            f"the parameters do not have the structure of the configuration ({len(values)} leaves, "
            f"expected {len(entries)})"
        )
    by_path = dict(zip((e.path for e in entries), values))
    pending: dict[tuple, object] = {}
    for entry, value in zip(entries, values):
        if layout == "hf" and entry.path[0] == "mtp":
            continue
        tf = target_format(entry, fmt, config)
        if tf == "nvfp4":
            if entry.path[-1] in ("w1", "w3"):
                if entry.path not in pending:
                    p1, p3 = entry.path[:-1] + ("w1",), entry.path[:-1] + ("w3",)
                    pending[p1], pending[p3] = experts_to_nvfp4(by_path[p1], by_path[p3])
                value = pending.pop(entry.path)
            else:
                value = to_nvfp4(value)
        else:
            value = to_format(value, tf, entry)
        yield from leaf_tensors(entry, value, tf, layout)


# ---------------------------------------------------------------------------------------------------------
# Configuration files of each layout


def quantized_modules(config: Config) -> list[str]:
    """Format Q's NVFP4 modules: the routed experts of every main layer, sorted as strings (§5.5)."""
    return sorted(f"layers.{i}.ffn.experts" for i in range(config.num_hidden_layers))


EXCLUDE_MODULES = ["*.attn.*", "*.ffn.shared_experts.*", "head", "mtp.*"]
PRODUCER = {"name": "modelopt", "version": "dsv4-nvfp4-experts"}
FP8_QUANT = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "scale_fmt": "ue8m0",
    "weight_block_size": [128, 128],
}


def hf_quant_config(config: Config) -> dict:
    """Format Q's ``hf_quant_config.json`` (CHECKPOINT.md §5.5), key order as shipped."""
    return {
        "producer": dict(PRODUCER),
        "quantization": {
            "quant_algo": "MIXED_PRECISION",
            "kv_cache_quant_algo": None,
            "group_size": 16,
            "quantized_layers": {
                m: {"quant_algo": "NVFP4", "group_size": 16} for m in quantized_modules(config)
            },
            "exclude_modules": list(EXCLUDE_MODULES),
        },
    }


def native_config(config: Config, fmt: CheckpointFormat) -> dict:
    """``config.json`` of Format N or Q (§3.2, §5.6): the model keys, ``expert_dtype`` and the FP8
    ``quantization_config`` (Format Q adds the NVFP4 MoE keys)."""
    d = config.to_dict()
    d["expert_dtype"] = "fp4"
    q = dict(FP8_QUANT)
    if fmt == "modelopt-nvfp4":
        mq = hf_quant_config(config)["quantization"]
        q.update(
            moe_quant_algo="NVFP4",
            producer=dict(PRODUCER),
            quant_algo=mq["quant_algo"],
            kv_cache_quant_algo=None,
            group_size=16,
            config_groups={
                "group_0": {
                    "input_activations": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16},
                    "weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16},
                    "targets": ["Linear"],
                }
            },
            quantized_layers=mq["quantized_layers"],
            ignore=list(EXCLUDE_MODULES),
        )
    d["quantization_config"] = q
    return d


_HF_TYPES = {0: "sliding_attention", 4: "compressed_sparse_attention"}


def hf_config(config: Config) -> dict:
    """``config.json`` as transformers 5.24 writes it for ``DeepseekV4ForCausalLM`` (no MTP block)."""
    c = config
    hca = sorted({r for r in c.compress_ratios[: c.num_hidden_layers] if r not in (0, 4)})
    if len(hca) > 1:
        raise ValueError(f"transformers has one HCA compression rate per model; this configuration has {hca}")
    prf = c.qk_rope_head_dim / c.head_dim
    compress = {"rope_theta": c.compress_rope_theta, "partial_rotary_factor": prf, "rope_type": "default"}
    if c.rope_scaling is not None:
        r = c.rope_scaling
        compress = {
            "attention_factor": 1.0,
            "beta_fast": r.beta_fast,
            "beta_slow": r.beta_slow,
            "factor": r.factor,
            "original_max_position_embeddings": r.original_max_position_embeddings,
            "partial_rotary_factor": prf,
            "rope_theta": c.compress_rope_theta,
            "rope_type": "yarn",
        }
    keys = (
        "vocab_size",
        "hidden_size",
        "moe_intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "q_lora_rank",
        "o_groups",
        "o_lora_rank",
        "n_routed_experts",
        "n_shared_experts",
        "num_experts_per_tok",
        "routed_scaling_factor",
        "norm_topk_prob",
        "scoring_func",
        "swiglu_limit",
        "hidden_act",
        "sliding_window",
        "index_n_heads",
        "index_head_dim",
        "index_topk",
        "hc_mult",
        "hc_sinkhorn_iters",
        "hc_eps",
        "rms_norm_eps",
        "max_position_embeddings",
        "rope_theta",
        "compress_rope_theta",
        "bos_token_id",
        "eos_token_id",
        "tie_word_embeddings",
        "attention_bias",
        "qk_rope_head_dim",
    )
    d = {k: getattr(c, k) for k in keys}
    d.update(
        architectures=["DeepseekV4ForCausalLM"],
        model_type="deepseek_v4",
        dtype="float32",
        layer_types=[
            _HF_TYPES.get(r, "heavily_compressed_attention") for r in c.compress_ratios[: c.num_hidden_layers]
        ],
        mlp_layer_types=["hash_moe" if c.is_hash_layer(i) else "moe" for i in range(c.num_hidden_layers)],
        compress_rates={
            "compressed_sparse_attention": 4,
            "heavily_compressed_attention": hca[0] if hca else 128,
        },
        partial_rotary_factor=prf,
        num_nextn_predict_layers=0,
        rope_parameters={
            "main": {"partial_rotary_factor": prf, "rope_theta": c.rope_theta, "rope_type": "default"},
            "compress": compress,
        },
    )
    return dict(sorted(d.items()))


def config_from_hf(d: dict, source: str) -> Config:
    """A ``Config`` from transformers' ``config.json`` (``layer_types`` / ``mlp_layer_types`` /
    ``compress_rates`` / ``rope_parameters``; legacy native keys are honoured as transformers does). The
    transformers layout has no MTP weights, so ``num_nextn_predict_layers`` becomes 0."""
    d = dict(d)
    n = d.get("num_hidden_layers")
    if not isinstance(n, int):
        raise UnsupportedConfig(f"{source}: missing key 'num_hidden_layers'")
    for key in ("layer_types", "mlp_layer_types"):
        v = d.get(key)
        if v is not None and not (isinstance(v, list) and all(isinstance(t, str) for t in v)):
            raise UnsupportedConfig(f"{source}: key {key!r} must be a list of layer type names, got {v!r}")
    for key in ("compress_rates", "rope_parameters"):
        if d.get(key) is not None and not isinstance(d[key], dict):
            raise UnsupportedConfig(f"{source}: key {key!r} must be an object, got {d[key]!r}")
    rp = d.get("rope_parameters") or {}
    for part in ("main", "compress"):
        if rp.get(part) is not None and not isinstance(rp[part], dict):
            raise UnsupportedConfig(f"{source}: key 'rope_parameters.{part}' must be an object, "
                                    f"got {rp[part]!r}")
    kind = (rp.get("compress") or {}).get("rope_type", "default")
    if kind not in ("default", "yarn"):
        raise UnsupportedConfig(f"{source}: key 'rope_parameters.compress.rope_type' is {kind!r}; the "
                                "compressed layers take 'default' or 'yarn'")
    if "layer_types" not in d and "compress_ratios" not in d:
        raise UnsupportedConfig(f"{source}: missing key 'layer_types' (each layer's attention type; the native "
                                "layout's 'compress_ratios' is not there either)")
    try:
        if "layer_types" in d and "compress_ratios" not in d:
            rates = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128} | (
                d.get("compress_rates") or {}
            )
            d["compress_ratios"] = [0 if t == "sliding_attention" else rates[t] for t in d["layer_types"][:n]]
        if "mlp_layer_types" in d and "num_hash_layers" not in d:
            types = d["mlp_layer_types"][:n]
            k = next((i for i, t in enumerate(types) if t != "hash_moe"), len(types))
            if any(t == "hash_moe" for t in types[k:]):
                raise UnsupportedConfig(f"{source}: key 'mlp_layer_types': hash layers must come first")
            d["num_hash_layers"] = k
    except KeyError as e:
        raise UnsupportedConfig(f"{source}: key 'layer_types' has an unknown type {e}") from None
    numbers = all(isinstance(d.get(k), (int, float)) and not isinstance(d.get(k), bool)
                  for k in ("head_dim", "partial_rotary_factor"))
    if numbers:
        width = d["head_dim"] * d["partial_rotary_factor"]
        if not float(width).is_integer():
            raise UnsupportedConfig(f"{source}: keys 'head_dim' x 'partial_rotary_factor' = {width!r} rotary "
                                    "dimensions, not an integer")
        if d.setdefault("qk_rope_head_dim", int(width)) != int(width):
            raise UnsupportedConfig(f"{source}: key 'qk_rope_head_dim' is {d['qk_rope_head_dim']!r} but 'head_dim' x "
                                    f"'partial_rotary_factor' = {int(width)} rotary dimensions")
    main, comp = rp.get("main") or {}, rp.get("compress") or {}
    d.setdefault("rope_theta", main.get("rope_theta"))
    d.setdefault("compress_rope_theta", comp.get("rope_theta"))
    if "rope_scaling" not in d:
        if comp.get("rope_type") == "yarn":
            d["rope_scaling"] = {
                k: comp[k]
                for k in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow")
                if k in comp
            } | {"type": "yarn"}
        else:
            d["rope_scaling"] = None
    d["num_nextn_predict_layers"] = 0
    d["compress_ratios"] = list(d.get("compress_ratios", []))[:n]
    return config_from_native(d, source)


def config_from_native(d: dict, source: str) -> Config:
    """A ``Config`` from a native ``config.json`` with the checks of CHECKPOINT.md §7.2.3."""
    if d.get("model_type") != "deepseek_v4":
        raise UnsupportedConfig(
            f"{source}: key 'model_type' is {d.get('model_type')!r}, expected 'deepseek_v4'"
        )
    ed = d.get("expert_dtype", "fp4")
    if ed != "fp4":
        raise UnsupportedExpertDtype(
            f"{source}: key 'expert_dtype' is {ed!r}; only 'fp4' (MXFP4 / NVFP4 routed experts) is supported"
        )
    try:  # (Config.from_dict pads compress_ratios listing the main layers only, §7.2.3)
        return Config.from_dict(d, source=source)
    except ConfigError as e:
        raise UnsupportedConfig(str(e)) from None


_MODULE_RE = re.compile(r"^layers\.(\d+)\.ffn\.experts$")
_LEGACY_RE = re.compile(r"^layers\.(\d+)\.ffn\.experts\.\d+\.w[123]$")


def parse_manifest(d: dict, source: str) -> set[str]:
    """The NVFP4 expert modules of ``hf_quant_config.json`` (§5.5 current and legacy schemas, checks of
    §7.2.5; ``BadQuantManifest``)."""
    prod = d.get("producer") if isinstance(d, dict) else None
    if not isinstance(prod, dict) or prod.get("name") != "modelopt":
        raise BadQuantManifest(
            f"{source}: key 'producer.name' must be 'modelopt', got "
            f"{prod.get('name') if isinstance(prod, dict) else prod!r}"
        )
    q = d.get("quantization")
    if not isinstance(q, dict):
        raise BadQuantManifest(f"{source}: key 'quantization' is missing")
    if q.get("quant_algo") not in ("MIXED_PRECISION", None):
        raise BadQuantManifest(
            f"{source}: key 'quantization.quant_algo' is {q.get('quant_algo')!r}, expected "
            "'MIXED_PRECISION' or null"
        )
    layers = q.get("quantized_layers") or {}
    if not isinstance(layers, dict):
        raise BadQuantManifest(f"{source}: key 'quantization.quantized_layers' is not an object")
    return _quantized_set(layers, source, BadQuantManifest)


def _quantized_set(layers: dict, source: str, err: type[CheckpointError]) -> set[str]:
    mods = set()
    for k, v in layers.items():
        if (
            not isinstance(v, dict)
            or v.get("quant_algo") != "NVFP4"
            or v.get("group_size", v.get("awq_block_size")) != 16
        ):
            raise err(
                f"{source}: quantized layer {k!r}: expected quant_algo 'NVFP4' with group size 16, got {v!r}"
            )
        m = _MODULE_RE.match(k) or _LEGACY_RE.match(k)
        if m is None:
            raise err(
                f"{source}: quantized layer key {k!r} is not 'layers.N.ffn.experts' (or the legacy "
                "'layers.N.ffn.experts.E.wK')"
            )
        mods.add(f"layers.{m.group(1)}.ffn.experts")
    return mods


def config_quantized_set(q: dict, source: str) -> set[str] | None:
    """The NVFP4 modules ``config.json``'s ``quantization_config`` announces (None if it has no list)."""
    layers = q.get("quantized_layers")
    if layers is None:
        return None
    if not isinstance(layers, dict):
        raise UnsupportedMoeQuant(f"{source}: key 'quantization_config.quantized_layers' is not an object")
    return _quantized_set(layers, source, UnsupportedMoeQuant)
