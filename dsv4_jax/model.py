"""The whole model (ARCHITECTURE.md §3, §9): embedding, 43 blocks of mHC-wrapped attention and MoE, the
hyper-connection head and the LM head; and the MTP block.

``Model`` couples a ``Config`` with its parameters and the compute dtype. ``forward`` and ``forward_mtp`` are
pure, jit-compiled functions of a model and token ids.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from . import kernels, quant, sharding
from .attention import attention
from .cache import Cache, LayerCache, init_cache
from .config import Config
from .hc import hc_head, hc_post, hc_pre
from .moe import moe
from .norm import rms_norm
from .params import Block, Params, init_params

DType = Literal["bfloat16", "float32"]


def check_dtype(dtype) -> None:
    """Refuse a compute dtype other than the two the model runs in."""
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"dtype must be 'bfloat16' or 'float32', got {dtype!r}")


@dataclasses.dataclass(frozen=True)
class Numerics:
    """Switches for the quantisation simulations that are part of the trained graph (ARCHITECTURE.md §2.3).

    Both are on in the model; turning one off reproduces ports that skip it (e.g. Hugging Face transformers
    skips both, ARCHITECTURE.md §13 rows 2 and 5) or measures its effect. ``w4a4`` (off) is an experiment
    outside the model: ``dataclasses.replace(model, numerics=Numerics(w4a4=True))``."""

    kv_fp8: bool = True  # FP8_SIM of the non-rotary dims of every stored KV row (raw and compressed)
    indexer_fp4: bool = True  # Hadamard rotation + FP4_SIM of the indexer's queries and keys
    # Not part of the model: Blackwell's FP4 x FP4 numerics for the NVFP4 routed experts, whose inputs are then
    # quantised to NVFP4 with each weight's input_scale (CHECKPOINT.md §4.2), to compare W4A4 with W4A16.
    w4a4: bool = False


@dataclasses.dataclass(frozen=True)
class Model:
    """A configuration, its parameters (in their stored formats) and the compute dtype.

    ``dtype="bfloat16"`` (default) follows the reference's dtype map (§11.1); ``"float32"`` dequantises exactly
    and computes everything in fp32 (for checking exactness)."""

    config: Config
    params: Params
    dtype: DType = "bfloat16"
    numerics: Numerics = Numerics()
    mesh: Mesh | None = None  # set by load_model(mesh=...) / on_mesh: routed experts run expert-parallel

    def __post_init__(self):
        check_dtype(self.dtype)

    def with_dtype(self, dtype: DType) -> Model:
        return dataclasses.replace(self, dtype=dtype)

    def on_mesh(self, mesh: Mesh | None) -> Model:
        """The same model placed on ``mesh``: routed experts sharded over its ``"expert"`` axis (forward, prefill
        and decode then run them expert-parallel), every other parameter replicated; ``None``: one device."""
        sharding.check_mesh(mesh, self.config.n_routed_experts)
        params = jax.device_put(self.params, sharding.param_shardings(self.params, mesh))
        return dataclasses.replace(self, params=params, mesh=mesh)


jax.tree_util.register_dataclass(Model, data_fields=["params"], meta_fields=["config", "dtype", "numerics", "mesh"])


def random_model(config: Config, seed: int = 0, *, dtype: DType = "bfloat16", kernel_layout: bool | None = None,
                 **init_kwargs) -> Model:
    """A model with random parameters in the stored formats (see ``params.init_params``). ``kernel_layout``:
    repack the NVFP4 weights for the GPU kernels (default: when they will run them, as ``load_model``)."""
    model = Model(config=config, params=init_params(config, jax.random.key(seed), **init_kwargs), dtype=dtype)
    if kernel_layout if kernel_layout is not None else kernels.use_kernel_layout(dtype):
        model = dataclasses.replace(model, params=kernels.prepare_weights(model.params, donate=True))
    return model


def block(p: Block, h: jax.Array, tokens: jax.Array, cache: LayerCache, pos0: jax.Array, n: jax.Array, layer: int,
          model: Model) -> tuple[jax.Array, LayerCache]:
    """§3 ``Block_l``: streams ``h [B, T, n, D]`` of tokens at positions ``pos0[b] + t`` (``n[b]`` real ones)
    continuing ``cache`` -> ``([B, T, n, D], new LayerCache)``."""
    c, dt = model.config, model.dtype
    x, post, comb = hc_pre(h, p.hc_attn_fn, p.hc_attn_scale, p.hc_attn_base, c)
    x = rms_norm(x, p.attn_norm, c.rms_norm_eps)
    a, cache = attention(p.attn, x, cache, pos0, n, layer, c, dt, kv_qat=model.numerics.kv_fp8,
                         indexer_qat=model.numerics.indexer_fp4)
    h = hc_post(a, h, post, comb)
    x, post, comb = hc_pre(h, p.hc_ffn_fn, p.hc_ffn_scale, p.hc_ffn_base, c)
    x = rms_norm(x, p.ffn_norm, c.rms_norm_eps)
    f = moe(p.ffn, x, tokens, c, dt, mesh=model.mesh, w4a4=model.numerics.w4a4)
    return hc_post(f, h, post, comb), cache


def token_matrix(tokens):
    """``tokens`` as an integer ``[batch, time]`` array (numpy or jax, as given; lists become numpy), or a clear
    error. Shared by every public entry point that takes token ids."""
    tokens = tokens if hasattr(tokens, "dtype") else np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, time], got shape {tokens.shape}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise TypeError(f"tokens must be integers, got {tokens.dtype}")
    if tokens.shape[0] < 1:
        raise ValueError(f"tokens must hold at least one sequence, got shape {tokens.shape}")
    return tokens


def _check_tokens(model: Model, tokens) -> jax.Array:
    """Token ids for ``forward`` and its relatives: ``[batch, time]`` integers, at least one token, at most the
    context, and (when concrete) each in the vocabulary (an id outside would silently be clamped by the
    embedding lookup)."""
    tokens = token_matrix(tokens)
    if tokens.shape[1] < 1:
        raise ValueError(f"tokens must hold at least one token per sequence, got shape {tokens.shape}")
    if tokens.shape[1] > model.config.max_position_embeddings:
        raise ValueError(f"{tokens.shape[1]} tokens exceed max_position_embeddings = "
                         f"{model.config.max_position_embeddings}")
    if not isinstance(tokens, jax.core.Tracer):
        check_vocab(model, tokens)
    return jnp.asarray(tokens, jnp.int32)


def check_vocab(model: Model, tokens) -> None:
    """Refuse concrete token ids outside ``[0, vocab_size)`` (the embedding lookup would clamp them)."""
    if tokens.size:
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= model.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {model.config.vocab_size}), got [{lo}, {hi}]")


def _embed(model: Model, tokens: jax.Array) -> jax.Array:
    """Embedding lookup, repeated into ``hc_mult`` identical streams: ``[B, T, n, D]``."""
    e = model.params.embed[tokens].astype(model.dtype)
    return jnp.repeat(e[:, :, None, :], model.config.hc_mult, axis=2)


def _head(model: Model, h: jax.Array, fn, scale, base, norm) -> jax.Array:
    """§9.1: HCHead, final RMSNorm, fp32 LM head."""
    c = model.config
    y = rms_norm(hc_head(h, fn, scale, base, c), norm, c.rms_norm_eps)
    return quant.dense(y.astype(jnp.float32), model.params.head.astype(jnp.float32))


def run_blocks(model: Model, tokens: jax.Array, cache: Cache, n: jax.Array) -> tuple[list[jax.Array], Cache]:
    """Embedding and all main blocks for ``tokens [B, T]`` continuing ``cache`` (``n[b]`` real tokens per row):
    the streams after the embedding and after each block, and the advanced cache."""
    h = _embed(model, tokens)
    out, layers = [h], []
    for layer, (p, lc) in enumerate(zip(model.params.layers, cache.layers)):
        h, lc = block(p, h, tokens, lc, cache.pos, n, layer, model)
        out.append(h)
        layers.append(lc)
    return out, Cache(pos=cache.pos + n.astype(jnp.int32), layers=tuple(layers), max_len=cache.max_len)


def _whole(model: Model, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A whole sequence from position 0: one chunk into an empty cache of its own length."""
    b, t = tokens.shape
    return init_cache(model.config, b, t, model.dtype), jnp.full((b,), t, jnp.int32)


@jax.jit
def _streams(model: Model, tokens: jax.Array) -> list[jax.Array]:
    return run_blocks(model, tokens, *_whole(model, tokens))[0]


@jax.jit
def _forward(model: Model, tokens: jax.Array) -> jax.Array:
    p = model.params
    h = _streams(model, tokens)[-1]
    return _head(model, h, p.hc_head_fn, p.hc_head_scale, p.hc_head_base, p.norm)


def forward(model: Model, tokens) -> jax.Array:
    """Logits of every position: ``tokens int32 [B, T]`` (positions 0..T-1) -> ``float32 [B, T, V]``."""
    return _forward(model, _check_tokens(model, tokens))


def hidden_streams(model: Model, tokens) -> list[jax.Array]:
    """The residual streams ``[B, T, n, D]`` after the embedding and after each block (``L + 1`` arrays)."""
    return _streams(model, _check_tokens(model, tokens))


@jax.jit
def _forward_mtp(model: Model, tokens: jax.Array) -> list[jax.Array]:
    c, p = model.config, model.params
    h = _streams(model, tokens)[-1]
    b = tokens.shape[0]
    pos0 = jnp.zeros((b,), jnp.int32)
    window = LayerCache(window=jnp.zeros((b, c.sliding_window, c.head_dim), model.dtype))
    logits = []
    for j, m in enumerate(p.mtp):  # depth j: streams h_i of depth j - 1 with Emb(tok_{i+j+1}), i = 0..T-2-j
        nxt = tokens[:, j + 1:]
        h = h[:, :nxt.shape[1]]
        n = jnp.full((b,), nxt.shape[1], jnp.int32)
        e = rms_norm(p.embed[nxt].astype(model.dtype), m.enorm, c.rms_norm_eps)
        hh = rms_norm(h, m.hnorm, c.rms_norm_eps)
        x = (kernels.linear(e, m.e_proj, model.dtype, jnp.float32)[:, :, None, :]
             + kernels.linear(hh, m.h_proj, model.dtype, jnp.float32)).astype(model.dtype)
        x, _ = block(m.block, x, nxt, window, pos0, n, c.num_hidden_layers + j, model)
        logits.append(_head(model, x, m.hc_head_fn, m.hc_head_scale, m.hc_head_base, m.norm))
        h = x
    return logits


def forward_mtp(model: Model, tokens) -> jax.Array | tuple[jax.Array, ...]:
    """Logits of the MTP head (§9.2): ``tokens int32 [B, T]`` -> ``float32 [B, T-1, V]``.

    Row i combines the main model's final streams at position i with the embedding of ``tokens[:, i+1]``
    and predicts token i+2; the MTP block's attention sees positions 0..T-2. The spec (and Flash) has one MTP
    layer. With several, depth j (0-based) follows DeepSeek-V3's sequential MTP: row i combines depth j-1's
    output streams at position i with the embedding of ``tokens[:, i+j+1]`` and predicts token i+j+2; the result
    is a tuple with one ``[B, T-1-j, V]`` array per depth."""
    tokens = _check_tokens(model, tokens)
    n = model.config.num_nextn_predict_layers
    if n == 0:
        raise ValueError("this configuration has no MTP layer (num_nextn_predict_layers = 0)")
    if tokens.shape[1] < n + 1:
        raise ValueError(f"forward_mtp with {n} MTP layer(s) needs at least {n + 1} tokens; got {tokens.shape[1]}")
    out = _forward_mtp(model, tokens)
    return out[0] if n == 1 else tuple(out)
