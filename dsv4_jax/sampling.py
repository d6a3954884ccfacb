"""Sampling from logits: greedy, temperature, top-k, top-p (nucleus)."""

from __future__ import annotations

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np


def _is_int(x) -> bool:
    """A Python or NumPy integer (not a bool)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid option."""
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not (self.temperature >= 0) or self.temperature == float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.seed):
            raise TypeError(f"seed must be an integer, got {self.seed!r}")
        if not -(2**63) <= self.seed < 2**63:
            raise ValueError(f"seed must fit in 64 bits (-2**63 <= seed < 2**63), got {self.seed!r}")
        if isinstance(self.stop_strings, str) or any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError(f"stop_strings must be a sequence of non-empty strings, got {self.stop_strings!r}")
        if _is_int(self.stop_token_ids) or any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")


def filter_logits(logits: jax.Array, temperature, top_k, top_p, use_top_p=None) -> jax.Array:
    """Temperature-scaled logits ``[B, V]`` with everything outside the top-k / top-p set at ``-inf``.
    The most likely token always survives. The options may be Python numbers or traced scalars (so one
    compiled program serves every setting); ``top_k`` 0 (or >= V) and ``top_p`` >= 1 disable the filters.
    Top-p is applied to the distribution that top-k leaves. ``use_top_p`` (default ``top_p < 1`` in the
    precision of the given value) switches the nucleus filter, whose threshold is ``top_p`` in fp32.
    The logits are shifted by their row maximum before the division (the distribution is unchanged), and a
    temperature below fp32's smallest normal number divides as that number: a tiny temperature then keeps the
    most likely token at 0 and pushes the others to -inf (the greedy limit), where an unshifted division
    overflowed every positive logit to +inf."""
    x = logits.astype(jnp.float32)
    top = jnp.max(x, axis=-1, keepdims=True)
    x = (x - jnp.where(jnp.isfinite(top), top, 0.0)) / jnp.maximum(temperature, jnp.finfo(jnp.float32).tiny)
    v = x.shape[-1]
    use_p = jnp.asarray(top_p < 1.0 if use_top_p is None else use_top_p, jnp.bool_)
    top_k = jnp.asarray(top_k, jnp.int32)
    top_p = jnp.asarray(top_p, jnp.float32)
    use_k = (top_k > 0) & (top_k < v)

    def filtered(x):
        order = jnp.argsort(-x, axis=-1)  # stable: equal values keep their index order
        sorted_x = jnp.take_along_axis(x, order, axis=-1)
        kth = jax.lax.dynamic_index_in_dim(sorted_x, jnp.clip(top_k - 1, 0, v - 1), axis=-1)
        x = jnp.where(use_k & (x < kth), -jnp.inf, x)
        sorted_x = jnp.where(use_k & (sorted_x < kth), -jnp.inf, sorted_x)
        probs = jax.nn.softmax(sorted_x, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        keep_sorted = (before < top_p) | ~use_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(x.shape[0])[:, None], order].set(keep_sorted)
        return jnp.where(keep, x, -jnp.inf)

    return jax.lax.cond(use_k | use_p, filtered, lambda x: x, x)


@functools.partial(jax.jit, static_argnames=("greedy",))
def _sample(logits: jax.Array, key: jax.Array, temperature, top_k, top_p, use_top_p, greedy: bool) -> jax.Array:
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = filter_logits(logits, temperature, top_k, top_p, use_top_p)
    return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)


def sampling_args(params: SamplingParams) -> tuple:
    """``(temperature, top_k, top_p, use_top_p)`` as device scalars (``top_k`` capped: any value >= the
    vocabulary disables it; ``use_top_p`` decided in double precision, as ``top_p < 1``) and the static
    ``greedy`` flag of ``_sample``."""
    return (jnp.float32(params.temperature), jnp.int32(min(params.top_k, 2**31 - 1)), jnp.float32(params.top_p),
            jnp.bool_(params.top_p < 1.0), params.temperature == 0)


def sample(logits: jax.Array, key: jax.Array, params: SamplingParams) -> jax.Array:
    """Next token ids ``[B]`` from logits ``[B, V]``: argmax when ``temperature == 0``, else a draw from the
    temperature-scaled distribution restricted to the top-k / top-p set."""
    *opts, greedy = sampling_args(params)
    return _sample(logits, key, *opts, greedy=greedy)
