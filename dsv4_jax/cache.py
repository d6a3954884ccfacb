"""Decoding caches (ARCHITECTURE.md §10): static-shape pytrees, allocated for a batch and a maximum length.

Per layer: the raw-window ring (slot = position mod W), and for compressed layers the compressed rows
(slot = block index), the compressor's open-block state and, for overlapping (CSA) compressors, the first
halves of the last completed block; CSA layers also keep the indexer's rows and compressor state. Every
slot's validity follows from the sequence's position (§10.5), so a cache holds no index lists. Positions are
per sequence: a batch may hold sequences of different lengths.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from .config import Config
from .pytree import pytree_dataclass


@pytree_dataclass
class CompressorState:
    """§10.2. ``pend_a, pend_s [B, m, c*d_c]`` fp32: slot j holds the (A, S) of the token at position
    ``block*m + j`` of the open block (slots at or after ``pos mod m`` are stale). Overlapping compressors add
    ``prev_a, prev_s [B, m, d_c]``: the first halves of the last completed block (``prev_s = -inf`` before
    the first block completes)."""

    pend_a: jax.Array
    pend_s: jax.Array
    prev_a: jax.Array | None = None
    prev_s: jax.Array | None = None


@pytree_dataclass
class LayerCache:
    window: jax.Array  # [B, W, d] ring of raw KV rows, slot = position mod W
    rows: jax.Array | None = None  # [B, ceil(max_len/m), d] compressed rows
    compressor: CompressorState | None = None
    index_rows: jax.Array | None = None  # [B, ceil(max_len/4), d_I] (CSA)
    index_compressor: CompressorState | None = None


@dataclasses.dataclass(frozen=True)
class Cache:
    pos: jax.Array  # [B] int32: tokens processed so far = position of the next token
    layers: tuple[LayerCache, ...]
    max_len: int  # longest sequence the cache can hold (static)

    @property
    def batch(self) -> int:
        return self.pos.shape[0]


jax.tree_util.register_dataclass(Cache, data_fields=["pos", "layers"], meta_fields=["max_len"])


def _state(b: int, m: int, width: int, overlap: bool) -> CompressorState:
    dc = width // 2 if overlap else width
    z = jnp.zeros((b, m, width), jnp.float32)
    if not overlap:
        return CompressorState(z, jnp.full_like(z, -jnp.inf))
    return CompressorState(z, jnp.full_like(z, -jnp.inf), jnp.zeros((b, m, dc), jnp.float32),
                           jnp.full((b, m, dc), -jnp.inf, jnp.float32))


def init_cache(config: Config, batch: int, max_len: int, dtype) -> Cache:
    """An empty cache for ``batch`` sequences of up to ``max_len`` tokens (main layers; MTP is not cached)."""
    c = config
    if max_len > c.max_position_embeddings:
        raise ValueError(f"max_len = {max_len} exceeds the model's max_position_embeddings = "
                         f"{c.max_position_embeddings}")
    layers = []
    for layer in range(c.num_hidden_layers):
        m = c.compress_ratio(layer)
        lc = LayerCache(window=jnp.zeros((batch, c.sliding_window, c.head_dim), dtype))
        if m:
            overlap = m == 4
            lc = dataclasses.replace(
                lc, rows=jnp.zeros((batch, math.ceil(max_len / m), c.head_dim), dtype),
                compressor=_state(batch, m, (2 if overlap else 1) * c.head_dim, overlap))
        if m == 4:
            lc = dataclasses.replace(
                lc, index_rows=jnp.zeros((batch, math.ceil(max_len / m), c.index_head_dim), dtype),
                index_compressor=_state(batch, m, 2 * c.index_head_dim, True))
        layers.append(lc)
    return Cache(pos=jnp.zeros((batch,), jnp.int32), layers=tuple(layers), max_len=max_len)


def bytes_per_token(config: Config, dtype=jnp.bfloat16) -> float:
    """Cache bytes per token of context, excluding the constant window rings and compressor states
    (ARCHITECTURE.md §10.4: 6880 B for Flash in bf16)."""
    size = jnp.dtype(dtype).itemsize
    total = 0.0
    for layer in range(config.num_hidden_layers):
        m = config.compress_ratio(layer)
        if m:
            total += config.head_dim * size / m
        if m == 4:
            total += config.index_head_dim * size / m
    return total
