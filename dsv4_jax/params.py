"""The parameter tree: one dataclass per module, names from ARCHITECTURE.md, and random initialisation of a
model of any configuration directly in the stored number formats (no bf16 copy of a quantised weight is
ever made).

Formats follow the NVIDIA NVFP4 release (CHECKPOINT.md §5): FP8 128x128-block attention, shared-expert,
indexer ``wq_b`` and MTP projection weights; NVFP4 routed experts in the main layers; MXFP4 routed experts in
the MTP block; bf16 norms, compressors, router weights, embedding and head; fp32 hyper-connection
parameters, sinks, position biases and router biases; int32 hash tables.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from . import quant
from .config import Config
from .pytree import pytree_dataclass
from .quant import Weight


@pytree_dataclass
class Compressor:
    """KV compressor (§6.1): ``c = 2`` for overlapping (ratio 4) compressors, else 1; ``d_c`` row width."""

    wkv: jax.Array  # [c*d_c, D] bf16
    wgate: jax.Array  # [c*d_c, D] bf16
    ape: jax.Array  # [m, c*d_c] fp32
    norm: jax.Array  # [d_c] bf16


@pytree_dataclass
class Indexer:
    """Lightning Indexer (§7.1)."""

    wq_b: Weight  # [H_I*d_I, r_q] FP8
    weights_proj: jax.Array  # [H_I, D] bf16
    compressor: Compressor  # d_c = d_I, overlapping


@pytree_dataclass
class Attention:
    """Attention (§5): low-rank queries, one shared K=V latent, sinks, grouped output projection."""

    wq_a: Weight  # [r_q, D]
    q_norm: jax.Array  # [r_q]
    wq_b: Weight  # [H*d, r_q]
    wkv: Weight  # [d, D]
    kv_norm: jax.Array  # [d]
    wo_a: Weight  # [G*r_o, H*d/G]
    wo_b: Weight  # [D, G*r_o]
    attn_sink: jax.Array  # [H] fp32
    compressor: Compressor | None = None  # CSA and HCA layers
    indexer: Indexer | None = None  # CSA layers


@pytree_dataclass
class Experts:
    """SwiGLU experts; routed: stacked ``[E, ...]``."""

    w1: Weight  # gate [(E,) I, D]
    w2: Weight  # down [(E,) D, I]
    w3: Weight  # up   [(E,) I, D]


@pytree_dataclass
class MoE:
    """Router, routed experts and the shared expert (§8)."""

    gate: jax.Array  # [E, D] bf16
    bias: jax.Array | None  # [E] fp32 (score-routed layers)
    tid2eid: jax.Array | None  # [V, k] int32 (hash layers)
    experts: Experts
    shared: Experts


@pytree_dataclass
class Block:
    """One decoder block (§3): mHC around attention and MoE."""

    hc_attn_fn: jax.Array  # [mix, n*D] fp32
    hc_attn_base: jax.Array  # [mix]
    hc_attn_scale: jax.Array  # [3]
    attn_norm: jax.Array  # [D]
    attn: Attention
    hc_ffn_fn: jax.Array
    hc_ffn_base: jax.Array
    hc_ffn_scale: jax.Array
    ffn_norm: jax.Array
    ffn: MoE


@pytree_dataclass
class Mtp:
    """Multi-token-prediction block (§9.2); shares ``embed`` and ``head`` with the main model."""

    enorm: jax.Array  # [D]
    hnorm: jax.Array  # [D]
    e_proj: Weight  # [D, D] FP8
    h_proj: Weight  # [D, D] FP8
    block: Block
    hc_head_fn: jax.Array  # [n, n*D]
    hc_head_base: jax.Array  # [n]
    hc_head_scale: jax.Array  # [1]
    norm: jax.Array  # [D]


@pytree_dataclass
class Params:
    embed: jax.Array  # [V, D] bf16
    layers: tuple[Block, ...]
    hc_head_fn: jax.Array  # [n, n*D] fp32
    hc_head_base: jax.Array  # [n]
    hc_head_scale: jax.Array  # [1]
    norm: jax.Array  # [D]
    head: jax.Array  # [V, D] bf16
    mtp: tuple[Mtp, ...] = ()


# ---------------------------------------------------------------------------------------------------------
# Random initialisation in the stored formats

ExpertFormat = Literal["nvfp4", "mxfp4", "fp8", "bf16"]


class _Keys:
    def __init__(self, key):
        self.key = key

    def __call__(self):
        self.key, k = jax.random.split(self.key)
        return k


# The helpers below are jitted per shape: run op by op, every primitive of every new shape compiles on its own,
# which made a new configuration's first random_model take ~25 s on a 2-core CPU. Same bits either way.
@functools.partial(jax.jit, static_argnames=("shape", "std", "dtype", "mean"))
def _normal(k, shape, std, dtype=jnp.float32, mean=0.0):
    return (mean + std * jax.random.normal(k, shape, jnp.float32)).astype(dtype)


@functools.partial(jax.jit, static_argnames=("out", "inn"))
def _fp8(k, out: int, inn: int) -> quant.Fp8Block:
    return quant.quantize_fp8_block(_normal(k, (out, inn), inn**-0.5))


def _fp4_codes(k, shape) -> jax.Array:
    """Random packed E2M1 codes (every code equally likely), built from random bits: no float copy."""
    return jax.random.bits(k, shape, jnp.uint8)


_E2M1_RMS = float(np.sqrt(np.mean(quant.E2M1_VALUES**2)))


@functools.partial(jax.jit, static_argnames=("shape",))
def _nvfp4_codes_scales(k_scales, k_codes, shape):
    """Packed codes and block scales of random NVFP4 weights ``shape = (e, out, in)``: block scales vary by a
    factor of up to 4 around 1 (the global scale sets the RMS)."""
    e, out, inn = shape
    bs = (2.0 ** jax.random.randint(k_scales, (e, out, inn // 16), -1, 2)).astype(jnp.float8_e4m3fn)
    return _fp4_codes(k_codes, (e, out, inn // 2)), bs


@functools.partial(jax.jit, static_argnames=("shape", "k0"))
def _mxfp4_scales(k, shape, k0: int):
    e, out, inn = shape
    exps = jax.random.randint(k, (e, out, inn // 32), k0 - 1, k0 + 2) + 127
    return jax.lax.bitcast_convert_type(exps.astype(jnp.uint8), jnp.float8_e8m0fnu)


def _expert_weight(keys: _Keys, e: int, out: int, inn: int, fmt: ExpertFormat, gscale=None) -> Weight:
    """Random expert weights ``[e, out, in]`` with RMS about ``in^-1/2``, generated in the stored format."""
    std = inn**-0.5
    if fmt == "nvfp4":
        k_scales, k_codes = keys(), keys()
        codes, bs = _nvfp4_codes_scales(k_scales, k_codes, (e, out, inn))
        g = jnp.full((e,), std / _E2M1_RMS / 1.25, jnp.float32) if gscale is None else gscale
        return quant.Nvfp4(codes, bs, g, jnp.ones((e,), jnp.float32))
    if fmt == "mxfp4":
        k0 = int(np.round(np.log2(std / _E2M1_RMS)))
        scale = _mxfp4_scales(keys(), (e, out, inn), k0)
        return quant.Mxfp4(_fp4_codes(keys(), (e, out, inn // 2)), scale)
    if fmt == "fp8":
        return jax.vmap(lambda k: _fp8(k, out, inn))(jax.random.split(keys(), e))
    return _normal(keys(), (e, out, inn), std, jnp.bfloat16)


def _experts(keys: _Keys, c: Config, fmt: ExpertFormat) -> Experts:
    e, d, i = c.n_routed_experts, c.hidden_size, c.moe_intermediate_size
    w1 = _expert_weight(keys, e, i, d, fmt)
    # ModelOpt shares one global scale (and input scale) between w1 and w3 of an expert (CHECKPOINT.md §5.2).
    w3 = _expert_weight(keys, e, i, d, fmt, gscale=w1.weight_scale_2 if fmt == "nvfp4" else None)
    return Experts(w1=w1, w2=_expert_weight(keys, e, d, i, fmt), w3=w3)


def _compressor(keys: _Keys, c: Config, ratio: int, d_c: int) -> Compressor:
    width = (2 if ratio == 4 else 1) * d_c
    d = c.hidden_size
    return Compressor(
        wkv=_normal(keys(), (width, d), d**-0.5, jnp.bfloat16),
        wgate=_normal(keys(), (width, d), d**-0.5, jnp.bfloat16),
        ape=_normal(keys(), (ratio, width), 0.5),
        norm=_normal(keys(), (d_c,), 0.1, jnp.bfloat16, mean=1.0),
    )


def _hc(keys: _Keys, c: Config, rows: int):
    nd = c.hc_mult * c.hidden_size
    fn = _normal(keys(), (rows, nd), nd**-0.5)
    base = _normal(keys(), (rows,), 0.5)
    scale = jax.random.uniform(keys(), (3 if rows == c.mix_hc else 1,), jnp.float32, 0.5, 1.5)
    return fn, base, scale


def _block(keys: _Keys, c: Config, layer: int, expert_format: ExpertFormat) -> Block:
    d, h, hd, rq = c.hidden_size, c.num_attention_heads, c.head_dim, c.q_lora_rank
    ratio = c.compress_ratio(layer)
    compressor = indexer = None
    if ratio:
        compressor = _compressor(keys, c, ratio, hd)
    if ratio == 4:
        indexer = Indexer(
            wq_b=_fp8(keys(), c.index_n_heads * c.index_head_dim, rq),
            weights_proj=_normal(keys(), (c.index_n_heads, d), d**-0.5, jnp.bfloat16),
            compressor=_compressor(keys, c, ratio, c.index_head_dim),
        )
    attn = Attention(
        wq_a=_fp8(keys(), rq, d),
        q_norm=_normal(keys(), (rq,), 0.1, jnp.bfloat16, mean=1.0),
        wq_b=_fp8(keys(), h * hd, rq),
        wkv=_fp8(keys(), hd, d),
        kv_norm=_normal(keys(), (hd,), 0.1, jnp.bfloat16, mean=1.0),
        wo_a=_fp8(keys(), c.o_groups * c.o_lora_rank, h * hd // c.o_groups),
        wo_b=_fp8(keys(), d, c.o_groups * c.o_lora_rank),
        attn_sink=_normal(keys(), (h,), 1.0),
        compressor=compressor,
        indexer=indexer,
    )
    e, k, i, v = c.n_routed_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.vocab_size
    hashed = c.is_hash_layer(layer) and layer < c.num_hidden_layers
    tid2eid = None
    if hashed:  # k distinct experts per token id
        tid2eid = jnp.argsort(jax.random.uniform(keys(), (v, e)), axis=-1)[:, :k].astype(jnp.int32)
    ffn = MoE(
        gate=_normal(keys(), (e, d), d**-0.5, jnp.bfloat16),
        bias=None if hashed else _normal(keys(), (e,), 0.1),
        tid2eid=tid2eid,
        experts=_experts(keys, c, expert_format),
        shared=Experts(w1=_fp8(keys(), i, d), w2=_fp8(keys(), d, i), w3=_fp8(keys(), i, d)),
    )
    fa, ba, sa = _hc(keys, c, c.mix_hc)
    ff, bf, sf = _hc(keys, c, c.mix_hc)
    return Block(
        hc_attn_fn=fa, hc_attn_base=ba, hc_attn_scale=sa,
        attn_norm=_normal(keys(), (d,), 0.1, jnp.bfloat16, mean=1.0), attn=attn,
        hc_ffn_fn=ff, hc_ffn_base=bf, hc_ffn_scale=sf,
        ffn_norm=_normal(keys(), (d,), 0.1, jnp.bfloat16, mean=1.0), ffn=ffn,
    )


def init_params(
    config: Config,
    key: jax.Array,
    *,
    expert_format: ExpertFormat = "nvfp4",
    mtp_expert_format: ExpertFormat | None = None,
) -> Params:
    """Random parameters of ``config`` in the stored formats of the NVFP4 release.

    Every tensor is random (norm weights around 1, biases and sinks non-zero) so that tests exercise every
    term. ``expert_format`` picks the routed experts' format of the main layers (``"mxfp4"`` gives the native
    DeepSeek release); ``mtp_expert_format`` that of the MTP block (default ``"mxfp4"``, as in both releases, or
    ``"nvfp4"`` when ``hidden_size`` is not a multiple of MXFP4's 32-wide blocks). Works under ``jax.eval_shape``.
    """
    keys = _Keys(key)
    c = config
    if mtp_expert_format is None:
        mtp_expert_format = "mxfp4" if c.hidden_size % 32 == 0 else "nvfp4"
    for name, fmt in (("expert_format", expert_format), ("mtp_expert_format", mtp_expert_format)):
        if fmt == "mxfp4" and c.hidden_size % 32:
            raise ValueError(f"{name}='mxfp4' needs hidden_size to be a multiple of 32 (the MXFP4 block), got "
                             f"{c.hidden_size}")
    d, v = c.hidden_size, c.vocab_size
    layers = tuple(_block(keys, c, i, expert_format) for i in range(c.num_hidden_layers))
    hf, hb, hs = _hc(keys, c, c.hc_mult)
    mtp = []
    for j in range(c.num_nextn_predict_layers):
        mf, mb, ms = _hc(keys, c, c.hc_mult)
        mtp.append(Mtp(
            enorm=_normal(keys(), (d,), 0.1, jnp.bfloat16, mean=1.0),
            hnorm=_normal(keys(), (d,), 0.1, jnp.bfloat16, mean=1.0),
            e_proj=_fp8(keys(), d, d), h_proj=_fp8(keys(), d, d),
            block=_block(keys, c, c.num_hidden_layers + j, mtp_expert_format),
            hc_head_fn=mf, hc_head_base=mb, hc_head_scale=ms,
            norm=_normal(keys(), (d,), 0.1, jnp.bfloat16, mean=1.0),
        ))
    return Params(
        embed=_normal(keys(), (v, d), 1.0, jnp.bfloat16),
        layers=layers,
        hc_head_fn=hf, hc_head_base=hb, hc_head_scale=hs,
        norm=_normal(keys(), (d,), 0.1, jnp.bfloat16, mean=1.0),
        head=_normal(keys(), (v, d), d**-0.5, jnp.bfloat16),
        mtp=tuple(mtp),
    )


# ---------------------------------------------------------------------------------------------------------
# Counting


def _is_leaf(x) -> bool:
    return isinstance(x, quant.QUANTIZED)


def count_params(params: Params, *, mtp: bool = False) -> int:
    """Number of model parameters (logical weight elements; scales and the hash tables are not counted).

    Works on abstract trees (``jax.eval_shape(init_params, ...)``): nothing is allocated."""
    from pallas_kernels.nvfp4_layout import Nvfp4Packed  # weights repacked for the GPU kernels count as NVFP4

    tree = params.mtp if mtp else dataclasses.replace(params, mtp=())
    total = 0
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: _is_leaf(x) or isinstance(x, Nvfp4Packed))
    for path, leaf in leaves[0]:
        if any(getattr(p, "name", None) == "tid2eid" for p in path):
            continue
        total += int(np.prod(quant.logical_shape(leaf)))
    return total
